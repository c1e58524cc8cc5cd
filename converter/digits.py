"""Digits: Keras model → float and int8 TFLite → accuracy gate on the full MNIST test set → bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from converter.gate import Gate, quantize_with_gate, score_bytes
from converter.metrics import compare_classifiers
from converter.package import (FLOAT_FILE, INT8_FILE, device_outputs, load_trained, markdown_table, model_pair,
                               toolchain, write_bundle)
from converter.tflite import to_float
from device.preprocess import MNIST_SPEC, normalize
from training.datasets.mnist import load_mnist

LABELS = [str(d) for d in range(10)]


def predict_labels(path: Path, x: np.ndarray, desc: str) -> np.ndarray:
    """Class predictions of a .tflite file through the device runtime (what ships is what we measure)."""
    return device_outputs(path, x, desc).argmax(axis=1)


def quantize_digits(keras_path: Path, out: Path, data_dir: Path | None = None, representative: int = 300,
                    max_drop_pp: float = 0.3, io_type: str = "int8", fix: bool = False, seed: int = 0,
                    min_accuracy: float = 0.98) -> bool:
    """Build the digits bundle; returns whether it passed the gate (the CLI turns False into exit 1)."""
    model, train_info = load_trained(keras_path, "digits", len(LABELS))
    data = load_mnist(data_dir)
    rng = np.random.default_rng(seed)
    calibration = normalize(data.x_train[rng.choice(len(data.x_train), representative, replace=False)], MNIST_SPEC)
    x_test = normalize(data.x_test, MNIST_SPEC)
    y_test = data.y_test

    print(f"evaluating Keras float on {len(x_test):,} test images …", flush=True)
    keras_pred = model.predict(x_test, batch_size=512, verbose=0).argmax(axis=1)
    print("converting to float32 TFLite …", flush=True)
    float_bytes = to_float(model)
    float_pred = score_bytes(float_bytes, lambda p: predict_labels(p, x_test, "float TFLite"))

    def top1(path: Path) -> float:
        return float(np.mean(predict_labels(path, x_test, "int8 TFLite") == y_test))

    print(f"calibrating int8 on {representative} training images and checking the gate …", flush=True)
    gate = Gate(metric="top1", max_drop_pp=max_drop_pp, min_score=min_accuracy)
    result = quantize_with_gate(model, calibration, float(np.mean(float_pred == y_test)), top1, gate, io_type, fix)
    int8_pred = score_bytes(result.int8, lambda p: predict_labels(p, x_test, "int8 TFLite (final)"))
    comparison = compare_classifiers(y_test, float_pred, int8_pred, LABELS)
    pair = model_pair(float_bytes, result.int8, io_type)

    metrics = {
        "keras_float_top1": float(np.mean(keras_pred == y_test)),
        "float_top1": comparison["float_top1"],
        "int8_top1": comparison["int8_top1"],
        "comparison": comparison,
    }
    manifest: dict[str, Any] = {
        "task": "digits-classification",
        "name": out.name,
        "description": "Handwritten digit 0-9 from a 28x28 MNIST-framed grey image",
        "models": pair.models,
        "default_model": "int8",
        "preprocessing": {**MNIST_SPEC, "photo_pipeline": "device.preprocess.mnist_style"},
        "labels": LABELS,
        "thresholds": {},
        "metrics": metrics,
        "gate": result.record(gate, comparison["drop_pp"]),
        "calibration": {"samples": representative, "source": "MNIST training split", "seed": seed},
        "evaluation": {"data": "MNIST test split", "n": int(len(y_test))},
        "training": {k: v for k, v in train_info.items() if k not in ("data", "toolchain", "preprocessing")},
        "data": {"dataset": "MNIST", **{k: v for k, v in data.source.items() if k != "path"}},
        "toolchain": {**train_info.get("toolchain", {}), **toolchain()},
        "edgetpu": pair.edgetpu,
    }
    summary_rows = [
        ["Keras float", metrics["keras_float_top1"], "-", "-"],
        ["TFLite float32", comparison["float_top1"], f"{len(float_bytes) / 1024:.0f}",
         f"{pair.latency[FLOAT_FILE]['median_ms']:.3f}"],
        [f"TFLite int8 ({io_type} I/O)", comparison["int8_top1"], f"{len(result.int8) / 1024:.0f}",
         f"{pair.latency[INT8_FILE]['median_ms']:.3f}"],
    ]
    summary = markdown_table(["model", "top-1 (10k test)", "size KB", "latency ms (1 thread)"], summary_rows)
    report_md = _report(manifest, summary, comparison, result.passed)
    target = write_bundle(out, pair.files, manifest, report_md,
                          {"summary": summary_rows, **{k: manifest[k] for k in ("metrics", "gate", "edgetpu")}},
                          result.passed)
    print("\n" + summary + "\n")
    verdict = "PASSED" if result.passed else "FAILED"
    print(f"gate {verdict}: int8 top-1 drop {comparison['drop_pp']:+.2f} pp (limit {max_drop_pp} pp), "
          f"disagreement {comparison['disagreement']:.2%}, McNemar p = {comparison['mcnemar_p']:.3f}")
    if result.float_ops:
        print(f"note: {', '.join(result.float_ops)} kept in float by --fix: this model is NOT Edge TPU-ready")
    print(f"bundle written to {target} (report: {target / 'report.md'})")
    return result.passed


def _report(manifest: dict[str, Any], summary: str, comparison: dict[str, Any], passed: bool) -> str:
    gate, edgetpu = manifest["gate"], manifest["edgetpu"]
    per_class = markdown_table(
        ["digit", "n", "float", "int8"],
        [[label, v["n"], v["float"], v["int8"]] for label, v in comparison["per_class"].items()],
    )
    lines = [
        "# Digits bundle report",
        "",
        f"Gate: **{'PASSED' if passed else 'FAILED'}** — top-1 drop {comparison['drop_pp']:+.2f} pp "
        f"(limit {gate['max_drop_pp']} pp), measured through the device runtime on {comparison['n']:,} MNIST test images.",
        "",
        summary,
        "",
        f"- Float and int8 disagree on {comparison['disagreement']:.2%} of images; only float right: "
        f"{comparison['float_only_right']}, only int8 right: {comparison['int8_only_right']}, "
        f"exact McNemar p = {comparison['mcnemar_p']:.3f}.",
        f"- Training: {manifest['training'].get('arch', '?')} architecture, "
        f"{manifest['training'].get('parameters', '?')} parameters, {manifest['training'].get('macs', '?')} MACs.",
        f"- Edge TPU ready: **{edgetpu['ready']}**"
        + ("" if edgetpu["ready"] else f"; CPU fallback from op {edgetpu['cpu_from_op']}: "
           + "; ".join(f"{p['op']} ({', '.join(p['reasons'])})" for p in edgetpu["problems"][:5])),
        f"- edgetpu_compiler: {'not installed' if edgetpu['compiler_run'] is None else edgetpu['compiler_run']['returncode']}",
    ]
    if gate["float_ops_kept"]:
        lines.append(f"- `--fix` kept {', '.join(gate['float_ops_kept'])} in float: not Edge TPU-ready.")
    if gate["worst_layers"]:
        lines += ["", "## Worst layers (quantization debugger)", "",
                  markdown_table(["op", "RMSE / step", "tensor"],
                                 [[w["op"], w["rmse_per_step"], w["tensor"]] for w in gate["worst_layers"]])]
    lines += ["", "## Per-class accuracy", "", per_class, ""]
    return "\n".join(lines)
