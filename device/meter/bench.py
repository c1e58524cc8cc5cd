"""`make bench` part of the meter reader: time per frame, from camera frame to checked value.

What a user's Pi spends per reading: align (template matching of 4 marks), crop 8 wheel ROIs,
classify them with the int8 model (one batch-1 inference per wheel), assemble and post-process. The frame is composed
from real crops (device/meter/compose.py), 640x480 like a typical camera setting. Needs the data
set for the crops ($EDGE_DATA_DIR, else ../shared/data beside the repository); without it the
section is left out with a note, the rest of the benchmark still runs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
import time
from pathlib import Path
from typing import Any

import numpy as np

from device.meter.compose import Layout, choose_crops, distort, render, write_config
from device.meter.config import load_config
from device.meter.postprocess import PostProcessor
from device.meter.reader import MeterReader

GROUP = Path("meter-digits") / "collected" / "powermeter" / "unknown" / "miboe"
LABELS = ["0.0", "1.0", "2.0", "3.9", "4.0", "5.0", "6.8", "7.2"]  # 8 wheels, two of them rolling


def _data_root() -> Path:
    return Path(os.environ.get("EDGE_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")


def _percentiles(times: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def bench_reader(models: Path, runs: int = 100, threads: tuple[int, ...] = (1, 2)) -> tuple[list[dict[str, Any]], str]:
    """Rows (one per model variant and thread count) and a Markdown section; empty without a bundle or data."""
    bundle = Path(models) / "meter-digits"
    group = _data_root() / GROUP
    if not (bundle / "manifest.json").is_file() or not group.is_dir():
        print(f"meter reader benchmark skipped: needs {bundle} and the crops in {group}")
        return [], ""
    rows = []
    layout = Layout(band=(100, 200))
    with tempfile.TemporaryDirectory() as tmp:
        reference = render(choose_crops(group, LABELS), layout)
        config_path = write_config(Path(tmp), reference, layout, len(LABELS), bundle.resolve(),
                                   meter="decimals = 3", extra=f'[postprocess]\nstate_file = "{tmp}/state.json"\n')
        frames = [distort(reference, seed=s) for s in range(10)]
        base = load_config(config_path)
        for variant in ("int8", "float"):
            for n in threads:
                config = replace(base, variant=variant, threads=n)
                reader = MeterReader.from_config(config)
                post = PostProcessor(config.postprocess, config.resolution)
                for frame in frames[:3]:  # warm-up
                    reader.read(frame)
                total, align, classify = [], [], []
                for i in range(runs):
                    frame = frames[i % len(frames)]
                    start = time.perf_counter()
                    reading = reader.read(frame)
                    post.process(reading.value, timestamp=1e9 + 60 * i)
                    total.append((time.perf_counter() - start) * 1000)
                    t0 = time.perf_counter()
                    alignment = reader.aligner.align(frame)
                    crops = [reader.aligner.crop(frame, alignment, roi) for roi in config.digits]
                    t1 = time.perf_counter()
                    reader.model.classify(crops)
                    align.append((t1 - t0) * 1000)
                    classify.append((time.perf_counter() - t1) * 1000)
                rows.append({"variant": variant, "threads": n, "wheels": len(LABELS), "frame": list(layout.size),
                             **_percentiles(total), "align_crop_median_ms": float(np.median(align)),
                             "classify_median_ms": float(np.median(classify)),
                             "refused": sum(reader.read(f).value is None for f in frames)})
    lines = ["", f"Meter reader: time per frame ({layout.size[0]}x{layout.size[1]}, 4 reference marks, "
             f"{len(LABELS)} wheels): align + crop + {len(LABELS)} inferences + assembly + "
             "post-processing. Frames composed from real crops (device/meter/compose.py).", "",
             "| model | threads | median ms/frame | p90 ms | align+crop ms | classify ms |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['threads']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['align_crop_median_ms']:.2f} | {r['classify_median_ms']:.2f} |" for r in rows]
    return rows, "\n".join(lines) + "\n"
