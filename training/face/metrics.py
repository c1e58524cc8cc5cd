"""Verification metrics the way LFW reports them, on distances between unit embeddings (smaller = same).

Accuracy uses a threshold chosen on the *other* folds and is reported as mean ± std over the evaluated
folds; ROC AUC and TAR at a fixed FAR use every pair at once. A pair is accepted when distance <= threshold.
Pure numpy so the converter, the tests and the teacher evaluation share one implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from device.face import threshold_at_far  # the device's lock calibrates with the same rule


def pair_distances(embeddings: dict[str, np.ndarray], keys: Sequence[tuple[str, str]]) -> np.ndarray:
    """Euclidean distance of each (key1, key2) pair of unit embeddings."""
    return np.array([float(np.linalg.norm(embeddings[a] - embeddings[b])) for a, b in keys], dtype=np.float64)


def candidate_thresholds(distances: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct distances, plus one below and one above all of them."""
    values = np.unique(distances)
    inner = (values[:-1] + values[1:]) / 2
    return np.concatenate([[values[0] - 1e-6], inner, [values[-1] + 1e-6]])


def accuracy_at(distances: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((distances <= threshold) == same))


def best_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy; among ties the middle one, which generalises best."""
    thresholds = candidate_thresholds(distances)
    accuracies = np.array([accuracy_at(distances, same, t) for t in thresholds])
    best = np.flatnonzero(accuracies == accuracies.max())
    choice = best[len(best) // 2]
    return float(thresholds[choice]), float(accuracies[choice])


def cross_fold_accuracy(distances: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Per fold: threshold chosen on the other folds, accuracy on this one; mean, sample std and standard error.

    LFW's protocol reports mean ± standard error, S_E = std / sqrt(folds) with the sample std (n - 1), which is
    what published figures (FaceNet's 99.63 ± 0.09) mean by "±".
    """
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fold accuracy needs pairs from at least 2 folds (the threshold of each fold is "
                         "chosen on the others); use best_threshold for one fold, knowing it is in sample")
    per_fold = {}
    for fold in np.unique(folds):
        test = folds == fold
        threshold, _ = best_threshold(distances[~test], same[~test])
        per_fold[int(fold)] = {"threshold": threshold, "accuracy": accuracy_at(distances[test], same[test], threshold)}
    accuracies = np.array([v["accuracy"] for v in per_fold.values()])
    std = float(accuracies.std(ddof=1))
    return {"mean": float(accuracies.mean()), "std": std, "standard_error": std / np.sqrt(len(accuracies)),
            "per_fold": per_fold}


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(values)]])
    ranks = np.empty(len(values))
    ranks[order] = ((first + 1 + last) / 2)[group]
    return ranks


def roc_auc(distances: np.ndarray, same: np.ndarray) -> float:
    """Probability that a random same pair is closer than a random different pair (ties count half)."""
    positive, negative = distances[same], distances[~same]
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("ROC AUC needs both same and different pairs")
    # Mann-Whitney U on average ranks (ties count half); smaller distance means "more same".
    ranks = average_ranks(np.concatenate([positive, negative]))
    negative_u = ranks[len(positive):].sum() - len(negative) * (len(negative) + 1) / 2
    return float(negative_u / (len(positive) * len(negative)))


def tar_at_far(distances: np.ndarray, same: np.ndarray, far: float) -> dict[str, float]:
    """True accept rate at the threshold that accepts at most `far` of the different pairs (no interpolation)."""
    threshold = threshold_at_far(distances[~same], far)
    return {"tar": float(np.mean(distances[same] <= threshold)),
            "far": float(np.mean(distances[~same] <= threshold)), "threshold": threshold}


def resolved_tar_at_far(distances: np.ndarray, same: np.ndarray, far: float) -> float | None:
    """TAR at `far`, or None when there are fewer than 1/far different pairs: LFW's ~850 different pairs of
    three folds cannot show a 0.1% false accept rate, and the threshold that allows none is not "at 0.1%"."""
    if (~np.asarray(same, dtype=bool)).sum() * far < 1:
        return None
    return tar_at_far(distances, same, far)["tar"]


def verification_report(distances: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Everything the tables show for one model on one set of pairs (a TAR the pairs cannot resolve is None)."""
    same = np.asarray(same, dtype=bool)
    accuracy = cross_fold_accuracy(distances, same, folds)
    return {
        "pairs": int(len(distances)),
        "same_pairs": int(same.sum()),
        "folds": sorted(int(f) for f in np.unique(folds)),
        "accuracy_mean": accuracy["mean"],
        "accuracy_std": accuracy["std"],
        "accuracy_se": accuracy["standard_error"],
        "per_fold": accuracy["per_fold"],
        "auc": roc_auc(distances, same),
        "tar_far_1pct": resolved_tar_at_far(distances, same, 0.01),
        "tar_far_0.1pct": resolved_tar_at_far(distances, same, 0.001),
    }


def balanced_accuracy(distances: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising (TAR + TNR) / 2: verification accuracy as if same and different
    pairs were equally many, which all-pairs sets (a few thousand genuine among ~0.5 M) are far from."""
    same = np.asarray(same, dtype=bool)
    order = np.argsort(distances, kind="mergesort")
    ordered, genuine = np.asarray(distances)[order], same[order]
    # Accepting the first k pairs (k = 0..n); only cut where the distance changes, so ties stay together.
    tar = np.concatenate([[0.0], np.cumsum(genuine) / max(1, genuine.sum())])
    far = np.concatenate([[0.0], np.cumsum(~genuine) / max(1, (~genuine).sum())])
    cuts = np.concatenate([[True], ordered[1:] != ordered[:-1], [True]])
    scores = np.where(cuts, (tar + 1.0 - far) / 2, -1.0)
    k = int(np.argmax(scores))
    edges = np.concatenate([[ordered[0] - 1e-6], ordered, [ordered[-1] + 1e-6]])
    return float((edges[k] + edges[k + 1]) / 2), float(scores[k])


def all_pairs_report(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Verification over every pair of the given unit embeddings (pair i<j is genuine when labels match)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return matrix_report(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (embeddings @ embeddings.T))), labels)


def matrix_report(matrix: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Verification over every pair i<j of a square matrix of distances (smaller = same; a negated similarity
    score works too): thousands of genuine and millions of impostor pairs resolve a FAR of 0.1%, which the
    few hundred different pairs of LFW's pairs.txt folds cannot."""
    first, second = np.triu_indices(len(matrix), k=1)
    distances = np.asarray(matrix)[first, second]
    same = np.asarray(labels)[first] == np.asarray(labels)[second]
    threshold, accuracy = balanced_accuracy(distances, same)
    return {"pairs": int(len(distances)), "same_pairs": int(same.sum()), "balanced_accuracy": accuracy,
            "threshold": threshold, "auc": roc_auc(distances, same),
            "tar_far_1pct": resolved_tar_at_far(distances, same, 0.01),
            "tar_far_0.1pct": resolved_tar_at_far(distances, same, 0.001)}
