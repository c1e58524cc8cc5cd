"""The accuracy gate, and what the converter does when int8 fails it.

A gate compares one metric (higher is better) of the float and the int8 model, both measured
through the device runtime. On failure the quantisation debugger names the layers that lose the
most, and with `fix` the op types of those layers are kept in float one at a time until the
gate passes: accuracy is bought back at the price of Edge TPU compatibility, and the report says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from converter.tflite import LayerError, to_int8, to_mixed, worst_layers


@dataclass(frozen=True)
class Gate:
    metric: str
    max_drop_pp: float

    def passes(self, float_score: float, int8_score: float) -> bool:
        return 100 * (float_score - int8_score) <= self.max_drop_pp + 1e-9


@dataclass
class Quantized:
    """The int8 model that came out of the gate, and how it got there."""

    int8: bytes
    float_score: float
    int8_score: float
    passed: bool
    worst: list[LayerError] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)  # op types kept in float in the adopted model
    attempts: list[dict] = field(default_factory=list)

    @property
    def drop_pp(self) -> float:
        return 100 * (self.float_score - self.int8_score)

    def record(self, gate: Gate, drop_pp: float) -> dict:
        """The manifest's "gate" entry. `drop_pp` is the drop as the task reports it (full evaluation)."""
        return {"metric": gate.metric, "max_drop_pp": gate.max_drop_pp, "drop_pp": drop_pp, "passed": self.passed,
                "float_ops_kept": self.float_ops, "attempts": self.attempts,
                "worst_layers": [vars(w) for w in self.worst[:10]]}


def score_bytes(model: bytes, score: Callable[[Path], float]) -> float:
    """Score an in-memory .tflite through a file, as the device runtime loads files."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.tflite"
        path.write_bytes(model)
        return score(path)


def quantize_with_gate(model: keras.Model, representative: np.ndarray, float_score: float,
                       score: Callable[[Path], float], gate: Gate, io_type: str = "int8",
                       fix: bool = False) -> Quantized:
    """Full-int8 conversion checked against `gate`; on failure diagnose, and with `fix` repair."""
    int8 = to_int8(model, representative, io_type)
    result = Quantized(int8=int8, float_score=float_score, int8_score=score_bytes(int8, score), passed=False)
    result.passed = gate.passes(float_score, result.int8_score)
    result.attempts.append({"float_ops": [], "int8_score": result.int8_score, "passed": result.passed})
    if result.passed:
        return result
    print(f"gate FAILED: {gate.metric} drop {result.drop_pp:.2f} pp > {gate.max_drop_pp} pp; "
          "running the quantization debugger", flush=True)
    result.worst = worst_layers(model, representative, io_type)
    for layer in result.worst[:5]:
        print(f"  {layer.op:<20} {layer.rmse_per_step:6.3f} steps RMSE  {layer.tensor}", flush=True)
    if not fix:
        return result
    kept: list[str] = []
    for layer in result.worst:
        if layer.op in kept:
            continue
        try:
            candidate = to_mixed(model, representative, [*kept, layer.op], io_type)
        except (ValueError, RuntimeError) as exc:  # e.g. nothing quantised is left to keep in float
            print(f"  --fix: cannot keep {layer.op} in float as well ({exc}); stopping", flush=True)
            break
        kept.append(layer.op)
        candidate_score = score_bytes(candidate, score)
        passed = gate.passes(float_score, candidate_score)
        result.attempts.append({"float_ops": list(kept), "int8_score": candidate_score, "passed": passed})
        print(f"  --fix: {', '.join(kept)} in float → {gate.metric} {candidate_score:.4f}"
              f" ({'passes' if passed else 'still fails'})", flush=True)
        if passed:
            result.int8, result.int8_score, result.passed, result.float_ops = candidate, candidate_score, True, kept
            break
    return result
