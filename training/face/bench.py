"""Face embedding latency: the shipped int8 and float models against the dlib teacher, on the same crops.

`python -m training.face.bench` (part of `make bench`). Each timing is one full `embed` call from a 128x128
grey crop: preprocessing + inference (of the crop and its mirror image) for our bundles — models/face, the
student cut from dlib's network and distilled from it, and models/face-resnet, dlib's own network ported to LiteRT;
both align with dlib's 5-point landmarks first — and detection + 5-point
alignment + ResNet for dlib itself, on one thread. The teacher rows appear only where dlib is installed (host
extra `teacher`).
"""

from __future__ import annotations

import argparse
import json
import platform
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from device.face import FaceEmbedder
from device.timing import time_ms
from training.datasets import DATA_ENV, DataNotFoundError
from training.datasets.lfw import find_faces_dir, list_people, load_faces
from training.teacher import teacher_available

MODELS = Path(__file__).resolve().parents[2] / "models"


def time_embed(embed: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, repeats: int) -> dict[str, float]:
    """Median and p90 of one embedding in ms, cycling through real crops (after a short warm-up)."""
    cycle = itertools.cycle(crops)
    runs = repeats * len(crops)
    return {**time_ms(lambda: embed(next(cycle)), runs=runs, warmup=5), "n": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.face.bench", description=__doc__)
    parser.add_argument("--bundles", type=Path, nargs="+", default=[MODELS / "face", MODELS / "face-resnet"],
                        help="face bundles (default: models/face models/face-resnet)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"data directory holding faces/ (default: ${DATA_ENV}, else ../shared/data)")
    parser.add_argument("--crops", type=int, default=40, help="distinct LFW crops timed (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the crops for the bundles (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=MODELS / "face-bench", help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    try:
        people = list_people(find_faces_dir(args.data_dir))
    except DataNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = [path for images in people.values() for path in images.values()]
    paths = paths[:: max(1, len(paths) // args.crops)]  # spread over people, not the first few
    crops = load_faces(paths[: args.crops], progress=False)
    rows = []
    for bundle, variant in itertools.product(args.bundles, ("int8", "float")):
        embedder = FaceEmbedder.from_bundle(bundle, variant=variant, threads=1)
        rows.append({"model": f"{bundle.name} {variant}", "size_kb": embedder.model.path.stat().st_size / 1024,
                     **time_embed(embedder.embed, crops, args.repeats)})
    if teacher_available():
        from training.teacher import load_teacher

        teacher = load_teacher()
        size = sum(f.stat().st_size for f in teacher.model_files.values()) / 1024
        rows.append({"model": "teacher dlib ResNet + 5-pt aligner", "size_kb": size,
                     **time_embed(teacher.embed, crops, 1)})
    else:
        print("teacher not timed: dlib not installed (pip install .[teacher])", flush=True)
    machine = f"{platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}, 1 thread"
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Face embedding, one `embed` call per 128x128 crop, on {machine}.", "",
             "| model | median ms | p90 ms | size KB | timed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['size_kb']:.0f} | {r['n']} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
