"""Comparing a float and an int8 classifier on the same labelled samples."""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2.

    b = samples only the first model gets right, c = only the second. A small p says the two
    models' error rates really differ; a large one says the disagreements look like noise.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare_classifiers(y_true: np.ndarray, pred_float: np.ndarray, pred_int8: np.ndarray,
                        labels: list[str]) -> dict[str, Any]:
    """Top-1 of both, drop in percentage points, disagreement, McNemar, per-class accuracy."""
    y_true = np.asarray(y_true)
    right_f = pred_float == y_true
    right_q = pred_int8 == y_true
    b = int(np.sum(right_f & ~right_q))
    c = int(np.sum(~right_f & right_q))
    per_class = {}
    for index, label in enumerate(labels):
        mask = y_true == index
        if mask.any():
            per_class[label] = {
                "n": int(mask.sum()),
                "float": float(right_f[mask].mean()),
                "int8": float(right_q[mask].mean()),
            }
    return {
        "n": int(len(y_true)),
        "float_top1": float(right_f.mean()),
        "int8_top1": float(right_q.mean()),
        "drop_pp": float(100 * (right_f.mean() - right_q.mean())),
        "disagreement": float(np.mean(pred_float != pred_int8)),
        "float_only_right": b,
        "int8_only_right": c,
        "mcnemar_p": exact_mcnemar(b, c),
        "per_class": per_class,
    }
