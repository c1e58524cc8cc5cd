"""Will this .tflite run on a Coral Edge TPU? Checked op by op, without the compiler.

The Edge TPU runs only full-integer ops from a fixed list, with static shapes and at most three
dimensions larger than one; the compiler cuts the graph at the first op it cannot map and
everything after that runs on the CPU. We report that cut point, and run `edgetpu_compiler`
too when it is installed (it is x86-64 Debian only, so usually it is not).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from device.runtime import interpreter_module

# Builtin op names the Edge TPU compiler maps (coral.ai "supported operations").
EDGETPU_OPS = frozenset(
    """ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D EXPAND_DIMS FULLY_CONNECTED
    HARD_SWISH L2_NORMALIZATION LOGISTIC LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MUL PACK PAD PRELU
    QUANTIZE REDUCE_MAX REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR
    RESIZE_NEAREST_NEIGHBOR RSQRT SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SQUARED_DIFFERENCE SQUEEZE
    STRIDED_SLICE SUB SUM TANH TRANSPOSE TRANSPOSE_CONV""".split()
)
INTEGER_TYPES = {"int8", "uint8", "int32"}  # int32 only for biases and shape operands


def op_dtypes(path: Path) -> list[dict[str, Any]]:
    """Each op with the dtypes and shapes of its tensors, read without the default XNNPACK delegate."""
    module = interpreter_module()
    resolver = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = module.Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    details = interpreter._get_ops_details()  # the only op listing LiteRT offers
    # Activations flow between ops; weights are constants. The 3-dimension limit is on activations.
    activations = {d["index"] for d in interpreter.get_input_details()}
    activations |= {i for op in details for i in op["outputs"]}
    ops = []
    for op in details:
        used = [tensors[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0]
        flowing = [t for t in used if t["index"] in activations]
        ops.append({
            "index": op["index"],
            "op": op["op_name"],
            "dtypes": sorted({np.dtype(t["dtype"]).name for t in used}),
            "dynamic": any(-1 in t.get("shape_signature", t["shape"]) for t in used),
            "max_big_dims": max((int(np.sum(np.asarray(t["shape"]) > 1)) for t in flowing), default=0),
        })
    return ops


def check_edgetpu(path: str | Path) -> dict[str, Any]:
    """Edge TPU readiness: `ready`, one entry per op with the reason it would fall back, the cut point."""
    path = Path(path)
    problems = []
    for op in op_dtypes(path):
        reasons = []
        if op["op"] not in EDGETPU_OPS:
            reasons.append("op not supported by the Edge TPU")
        if not set(op["dtypes"]) <= INTEGER_TYPES:
            reasons.append("float tensors (" + ", ".join(sorted(set(op["dtypes"]) - INTEGER_TYPES)) + ")")
        if op["dynamic"]:
            reasons.append("dynamic shape")
        if op["max_big_dims"] > 3:
            reasons.append(f"{op['max_big_dims']} dimensions larger than 1 (limit 3)")
        if reasons:
            problems.append({"index": op["index"], "op": op["op"], "reasons": reasons})
    compiler = run_compiler(path)
    # when the compiler is installed, its verdict counts too: it refuses models this op check lets through
    compiled = compiler is None or (compiler["returncode"] == 0 and compiler["model"] is not None)
    return {
        "ready": not problems and compiled,
        "problems": problems + ([] if compiled else [{"index": None, "op": "edgetpu_compiler",
                                                      "reasons": [f"exit status {compiler['returncode']}"]}]),
        "cpu_from_op": problems[0]["index"] if problems else None,
        "compiler": compiler,
    }


def run_compiler(path: Path) -> dict[str, Any] | None:
    """Run `edgetpu_compiler` if it is on PATH; None when it is not installed.

    On success "model" holds the compiled file's bytes (`<stem>_edgetpu.tflite`), which the bundle keeps as its
    `edgetpu` variant; the caller takes it out before the record goes into a manifest.
    """
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([compiler, "-s", "-o", out, str(path)], capture_output=True, text=True, timeout=300)
        compiled = Path(out) / f"{Path(path).stem}_edgetpu.tflite"
        model = compiled.read_bytes() if proc.returncode == 0 and compiled.is_file() else None
    return {"returncode": proc.returncode, "log": (proc.stdout + proc.stderr)[-4000:], "model": model}
