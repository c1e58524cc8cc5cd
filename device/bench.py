"""Benchmarks of the shipped bundles: latency (median, p90) per model and thread count, size, peak memory.

Speed is measured here, never asserted in unit tests. `python -m device bench` writes a JSON file
for machines and a Markdown table that the README quotes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from device.bundle import MANIFEST_NAME, Bundle
from device.meter.bench import bench_reader
from device.meter.model import bench_meter
from device.runtime import Model, interpreter_module
from device.timing import time_ms

_MEMORY_PROBE = """
import resource, sys, numpy as np
from device.runtime import Model
model = Model(sys.argv[1], threads=int(sys.argv[2]))
x = np.random.default_rng(0).uniform(0, 1, model.input_shape[1:]).astype(np.float32)
for _ in range(50):
    model.run(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def latency_ms(model: Model, runs: int = 200, warmup: int = 20) -> dict[str, float]:
    """Median and 90th percentile of one inference (set input, invoke, read output), in ms."""
    x = np.random.default_rng(0).uniform(0, 1, model.input_shape[1:]).astype(np.float32)
    return time_ms(lambda: model.run(x), runs, warmup)


def peak_memory_mb(path: Path, threads: int) -> float:
    """Peak resident memory of a fresh process that loads the model and runs it (MB, includes Python)."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(threads)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def bench_bundle(root: Path, runs: int, threads: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """One row per model variant and thread count."""
    bundle = Bundle.load(root)
    rows = []
    for variant in bundle.variants(runnable=True):
        path = bundle.model_path(variant)
        for n in threads:
            model = Model(path, threads=n)
            rows.append({
                "bundle": root.name,
                "variant": variant,
                "threads": n,
                **latency_ms(model, runs=runs),
                "size_kb": path.stat().st_size / 1024,
                "peak_memory_mb": peak_memory_mb(path, n),
            })
    return rows


def _markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| bundle | model | threads | median ms | p90 ms | size KB | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['variant']} | {r['threads']} | {r['median_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {r['size_kb']:.0f} | {r['peak_memory_mb']:.0f} |")
    ratios = []
    by_key = {(r["bundle"], r["variant"], r["threads"]): r for r in rows}
    for (name, variant, n), r in by_key.items():
        if variant == "int8" and (name, "float", n) in by_key:
            ratios.append(f"- {name}, {n} thread(s): int8 / float latency = "
                          f"{r['median_ms'] / by_key[(name, 'float', n)]['median_ms']:.2f}")
    return "\n".join(lines + [""] + ratios) + "\n"


def main(args: argparse.Namespace) -> int:
    # <name>.rejected/ holds a candidate that failed its gate: evidence, not a shipped model
    bundles = sorted(p.parent for p in Path(args.models).glob(f"*/{MANIFEST_NAME}") if p.parent.suffix != ".rejected")
    if not bundles:
        print(f"no bundles in {args.models}", file=sys.stderr)
        return 2
    rows = []
    for root in bundles:
        print(f"benchmarking {root.name} …", flush=True)
        rows.extend(bench_bundle(root, args.runs))
    machine = f"{platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}, " \
              f"interpreter {interpreter_module().__name__}"
    out = Path(args.out)
    meter_rows, meter_table = bench_meter(bundles, args.runs)
    reader_rows, reader_table = bench_reader(Path(args.models), args.runs)
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "rows": rows, "meter_batch": meter_rows, "meter_reader": reader_rows}, indent=2) + "\n")
    table = _markdown(rows, machine) + meter_table + reader_table
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0
