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

from converter.edgetpu import INTEGER_TYPES, op_dtypes
from converter.tflite import LayerError, to_int8, to_mixed, worst_layers
from device.runtime import Model


@dataclass(frozen=True)
class Gate:
    """int8 may lose at most `max_drop_pp` of float's score, and must reach `min_score` itself.

    The drop alone let a useless model through (one that always answers "0" scores 9.8% in both variants, a
    drop of zero); the floor is what a task's model must at least do to be worth shipping.
    """

    metric: str
    max_drop_pp: float
    min_score: float = 0.0

    def passes(self, float_score: float, int8_score: float) -> bool:
        return 100 * (float_score - int8_score) <= self.max_drop_pp + 1e-9 and int8_score >= self.min_score


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
    not_integer: list[str] = field(default_factory=list)  # why the adopted model is not the integer model asked for

    @property
    def drop_pp(self) -> float:
        return 100 * (self.float_score - self.int8_score)

    def record(self, gate: Gate, drop_pp: float) -> dict:
        """The manifest's "gate" entry. `drop_pp` is the drop as the task reports it (full evaluation)."""
        record = {"metric": gate.metric, "max_drop_pp": gate.max_drop_pp, "min_score": gate.min_score,
                  "drop_pp": drop_pp, "passed": self.passed, "not_integer": self.not_integer,
                  "float_ops_kept": self.float_ops, "attempts": self.attempts,
                  "worst_layers": [vars(w) for w in self.worst[:10]]}
        if self.float_ops:
            record["note"] = ("--fix stopped at the first op types whose int8 score passed on this evaluation set, "
                              "so the int8 score reported for it is slightly optimistic")
        return record


def score_bytes(model: bytes, score: Callable[[Path], float]) -> float:
    """Score an in-memory .tflite through a file, as the device runtime loads files."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.tflite"
        path.write_bytes(model)
        return score(path)


def not_integer(model: bytes, io_type: str, float_ops: list[str] = ()) -> list[str]:
    """What makes `model` other than full-integer with `io_type` input and output (empty when it is).

    Ops of the types in `float_ops` (kept in float on purpose by --fix) may hold float tensors. Without this
    check a conversion that quietly fell back to float (e.g. calibrated on no samples) passed the gate as "int8".
    """
    problems = []
    for op in score_bytes(model, op_dtypes):
        floats = sorted(set(op["dtypes"]) - INTEGER_TYPES)
        # around ops kept in float, (DE)QUANTIZE ops convert between int8 and float: that is the point of --fix
        converts = float_ops and op["op"] in ("QUANTIZE", "DEQUANTIZE")
        if floats and op["op"] not in float_ops and not converts:
            problems.append(f"op {op['index']} {op['op']} has {', '.join(floats)} tensors")
    facts = score_bytes(model, lambda p: Model(p).describe())
    for name, tensor in (("input", facts["input"]), *(("output", o) for o in facts["outputs"])):
        if tensor["dtype"] != io_type:
            problems.append(f"{name} is {tensor['dtype']}, not {io_type}")
    return problems


def quantize_with_gate(model: keras.Model, representative: np.ndarray, float_score: float,
                       score: Callable[[Path], float], gate: Gate, io_type: str = "int8",
                       fix: bool = False) -> Quantized:
    """Full-int8 conversion checked against `gate`; on failure diagnose, and with `fix` repair.

    A model that is not the full-integer model asked for never passes, whatever its score.
    """
    if len(representative) == 0:
        raise ValueError("int8 calibration needs representative samples (got none)")
    int8 = to_int8(model, representative, io_type)
    result = Quantized(int8=int8, float_score=float_score, int8_score=score_bytes(int8, score), passed=False)
    result.not_integer = not_integer(int8, io_type)
    result.passed = gate.passes(float_score, result.int8_score) and not result.not_integer
    result.attempts.append({"float_ops": [], "int8_score": result.int8_score, "passed": result.passed})
    if result.passed:
        return result
    if result.not_integer:
        print("gate FAILED: the int8 model is not full-integer: " + "; ".join(result.not_integer[:5]), flush=True)
        return result
    if result.int8_score < gate.min_score:
        print(f"gate FAILED: int8 {gate.metric} {result.int8_score:.4f} is below the floor {gate.min_score} "
              "(a model this weak is not worth shipping, whatever the drop)", flush=True)
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
        wrong = not_integer(candidate, io_type, kept)
        if wrong:  # e.g. TF's debugger drops the uint8 I/O asked for
            print(f"  --fix: the mixed model is not what was asked for ({'; '.join(wrong[:3])}); stopping", flush=True)
            break
        passed = gate.passes(float_score, candidate_score)
        result.attempts.append({"float_ops": list(kept), "int8_score": candidate_score, "passed": passed})
        print(f"  --fix: {', '.join(kept)} in float → {gate.metric} {candidate_score:.4f}"
              f" ({'passes' if passed else 'still fails'})", flush=True)
        if passed:
            result.int8, result.int8_score, result.passed, result.float_ops = candidate, candidate_score, True, kept
            break
    return result
