"""Face embedder: Keras → float and int8 TFLite → verification gate on the evaluation pairs → bundle.

Everything is measured through the device runtime (`device.runtime.Model` + `device.face.face_input`),
on the official LFW pairs of the evaluation folds, whose identities never reached training. The match
thresholds are calibrated per model variant, so the int8 model on the device uses int8 thresholds, and
on the *validation* people's images (all their impostor pairs): the FAR they give on the evaluation
people, strangers to the calibration as a door's visitors are, is then a measurement, not a fit.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from converter.gate import Gate, quantize_with_gate, score_bytes
from converter.package import (FLOAT_FILE, INT8_FILE, device_outputs, load_trained, markdown_table, model_pair,
                               toolchain, write_bundle)
from converter.tflite import to_float
from device.bundle import sha256_file
from device.face import LANDMARKS_FILE, Aligner, Cohort, aligned_spec, embeddings, face_spec
from device.landmarks import read_dlib_shape_predictor
from training.datasets.lfw import find_pairs_file, load_faces
from training.face.data import pair_images, person_of, student_inputs, validation_set
from training.face.metrics import (all_pairs_report, best_threshold, matrix_report, pair_distances, threshold_at_far,
                                   verification_report)
from training.face.dlib_resnet import LANDMARKS_DAT, find_model_file
from training.face.train import embed_keras, load_lfw
from training.teacher import (EMBEDDING_SIZE, TeacherCache, default_workers, load_teacher, teacher_available,
                              teacher_embeddings, teacher_model_bytes)

FAR_STRICT = 0.001
# A door lock compares a stranger with every enrolled embedding (~100 for a household), so its per-attempt
# false-accept rate is up to ~100x the per-pair rate: 0.001% per pair ≈ 0.1% per attempt.
FAR_DOOR = 0.00001
# Cohort score normalisation (device.face.Cohort): one face per training person, top-k similarities.
# Both chosen on the validation people (all 3,884 people beat 500-2,000; k 50 beat 10, 25 and 100 at FAR 0.001%).
COHORT_TOP_K = 50


def embed_file(path: Path, x: np.ndarray, desc: str, spec: dict[str, Any]) -> np.ndarray:
    """Unit embeddings of a .tflite through the device runtime, as `FaceEmbedder.embed` computes them."""
    return embeddings(lambda batch: device_outputs(path, batch, desc), x, spec)


def impostor_mask(identities: np.ndarray) -> np.ndarray:
    """Upper-triangle mask of every pair of images of different people (millions: a FAR of 0.1% needs many)."""
    return np.triu(np.ones((len(identities),) * 2, dtype=bool), k=1) & (identities[:, None] != identities[None, :])


def impostor_distances(embeddings: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """Distances of every pair of images of different people."""
    cosine = embeddings @ embeddings.T
    return np.sqrt(np.maximum(2.0 - 2.0 * cosine[impostor_mask(identities)], 0.0))


class PairSet:
    """Evaluation pairs and their distinct images, with helpers to score any embedding of those images."""

    def __init__(self, pairs: list, keys: list[str]):
        self.pairs = pairs
        self.keys = keys
        self.same = np.array([p.same for p in pairs])
        self.folds = np.array([p.fold for p in pairs])
        self.identities = np.array([person_of(k) for k in keys])

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        return pair_distances(dict(zip(self.keys, embeddings)), [p.keys() for p in self.pairs])

    def report(self, embeddings: np.ndarray) -> dict[str, Any]:
        """Verification on the pairs (accuracy, AUC) plus TAR at low FAR over all pairs of the images."""
        return {**verification_report(self.distances(embeddings), self.same, self.folds),
                "all_pairs": all_pairs_report(embeddings, self.identities)}

    def thresholds(self, embeddings: np.ndarray) -> dict[str, float]:
        """Distance thresholds calibrated on this set (accept when distance <= threshold).

        far_0.1pct / far_0.001pct: accept at most that share of all impostor pairs among this set's images;
        far_0.001pct is the door lock's default because a stranger meets every enrolled embedding (see
        FAR_DOOR). best_accuracy: the accuracy-maximising threshold on this set's pairs.
        """
        impostors = impostor_distances(embeddings, self.identities)
        return {"far_0.1pct": threshold_at_far(impostors, FAR_STRICT),
                "far_0.001pct": threshold_at_far(impostors, FAR_DOOR),
                "best_accuracy": best_threshold(self.distances(embeddings), self.same)[0]}

    def check(self, embeddings: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
        """What distance thresholds (calibrated on other people) do on this set: FAR over all its impostor
        pairs, TAR and accuracy on its pairs."""
        distances = self.distances(embeddings)
        impostors = impostor_distances(embeddings, self.identities)
        return {name: {"threshold": t, "impostor_pairs": int(len(impostors)),
                       "far_all_impostors": float(np.mean(impostors <= t)),
                       "tar_on_pairs": float(np.mean(distances[self.same] <= t)),
                       "far_on_pairs": float(np.mean(distances[~self.same] <= t)),
                       "accuracy_on_pairs": float(np.mean((distances <= t) == self.same))}
                for name, t in thresholds.items()}

    def _scores(self, embeddings: np.ndarray, cohort: Cohort) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised scores of every pair of images, of this set's pairs, and of all its impostor pairs."""
        scores = cohort.scores(embeddings, embeddings)
        index = {k: i for i, k in enumerate(self.keys)}
        pair_scores = np.array([scores[index[a], index[b]] for a, b in (p.keys() for p in self.pairs)])
        return scores, pair_scores, scores[impostor_mask(self.identities)]

    def score_thresholds(self, embeddings: np.ndarray, cohort: Cohort) -> dict[str, float]:
        """Like `thresholds`, on the cohort-normalised score (accept when score >= threshold). The metrics work
        on distances (smaller = same); a negated score orders pairs the same way."""
        _, pair_scores, impostors = self._scores(embeddings, cohort)
        return {"far_0.1pct": -threshold_at_far(-impostors, FAR_STRICT),
                "far_0.001pct": -threshold_at_far(-impostors, FAR_DOOR),
                "best_accuracy": -best_threshold(-pair_scores, self.same)[0]}

    def check_normalised(self, embeddings: np.ndarray, cohort: Cohort, thresholds: dict[str, float]) -> dict[str, Any]:
        """Like `check` on the normalised score, plus the pairs' verification report on that score."""
        scores, pair_scores, impostors = self._scores(embeddings, cohort)
        details: dict[str, Any] = {"pairs_report": {**verification_report(-pair_scores, self.same, self.folds),
                                                    "all_pairs": matrix_report(-scores, self.identities)}}
        for name, t in thresholds.items():
            details[name] = {"threshold": t, "impostor_pairs": int(len(impostors)),
                             "far_all_impostors": float(np.mean(impostors >= t)),
                             "tar_on_pairs": float(np.mean(pair_scores[self.same] >= t)),
                             "accuracy_on_pairs": float(np.mean((pair_scores >= t) == self.same))}
        return details


def nearest_neighbour_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of images whose nearest other image is the same under both embeddings."""
    def nearest(e: np.ndarray) -> np.ndarray:
        similarity = e @ e.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    return float(np.mean(nearest(a) == nearest(b)))


def teacher_on_pairs(crops: np.ndarray, cache_dir: Path) -> np.ndarray | None:
    """Teacher embeddings of the evaluation images (cached), or None where dlib and the cache are missing."""
    try:
        if teacher_available():
            teacher = load_teacher()
            return teacher_embeddings(crops, TeacherCache(cache_dir, teacher.model_digest), teacher.embed,
                                      desc="teacher (eval)", workers=default_workers())
        return teacher_embeddings(crops, TeacherCache.existing(cache_dir), None)
    except RuntimeError as exc:
        print(f"teacher not measured: {exc}", flush=True)
        return None


def input_spec(model: Any, train_info: dict[str, Any]) -> tuple[dict[str, Any], Aligner | None, dict[str, bytes]]:
    """The preprocessing a model was made for, its aligner, and the files that go into the bundle with it.

    A model trained on aligned chips (train_info input "aligned-chip": the ported dlib network at 150 px, or a student
    cut from it at its own chip size) gets dlib's 5-point landmark model as a bundle file, and every measurement here
    aligns with an Aligner built from exactly those bytes.
    """
    if train_info.get("input") != "aligned-chip":
        return face_spec(model.input_shape[1]), None, {}  # the input size the model was trained at
    source = find_model_file(LANDMARKS_DAT)
    files = {LANDMARKS_FILE: read_dlib_shape_predictor(source).to_bytes()}
    chip = aligned_spec(model.input_shape[1])
    spec = {**chip, "align": {**chip["align"],
                              "source": {"file": source.name, "sha256": sha256_file(source),
                                         "package": "face_recognition_models"}}}
    return spec, Aligner.from_spec(spec, files.__getitem__), files


def quantize_face(keras_path: Path, out: Path, data_dir: Path | None = None, representative: int = 300,
                  max_drop_pp: float = 0.5, io_type: str = "int8", fix: bool = False, seed: int = 0,
                  cache_dir: Path = Path("build/face/teacher-eval"), recipes: Path | None = None,
                  teacher: bool = True, min_accuracy: float = 0.90) -> bool:
    """Build the face bundle; returns whether int8 passed the gate (the CLI turns False into exit 1)."""
    model, train_info = load_trained(keras_path, "face", EMBEDDING_SIZE)
    spec, aligner, extra_files = input_spec(model, train_info)
    people, split = load_lfw(data_dir)
    rng = np.random.default_rng(seed)
    training = split.training_images(people)
    train_paths = [path for name in split.train_people for path in training[name].values()]
    chosen = rng.choice(len(train_paths), min(representative, len(train_paths)), replace=False)
    calibration = student_inputs(load_faces([train_paths[i] for i in sorted(chosen)], progress=False), spec, aligner)
    keys, crops = pair_images(split.eval_pairs, people)
    pairs = PairSet(split.eval_pairs, keys)
    x_eval = student_inputs(crops, spec, aligner)
    print(f"evaluation: folds {list(split.eval_folds)}, {len(pairs.pairs):,} pairs "
          f"({split.missing_pairs} lack an image), {len(keys):,} images of {len(set(pairs.identities)):,} people",
          flush=True)

    keras_report = pairs.report(embed_keras(model, x_eval, spec))
    print("converting to float32 TFLite …", flush=True)
    float_bytes = to_float(model)
    float_emb = score_bytes(float_bytes, lambda p: embed_file(p, x_eval, "float TFLite", spec))
    float_report = pairs.report(float_emb)

    def accuracy(path: Path) -> float:
        return pairs.report(embed_file(path, x_eval, "int8 TFLite", spec))["accuracy_mean"]

    print(f"calibrating int8 on {len(calibration)} crops of training identities and checking the gate …", flush=True)
    gate = Gate(metric="lfw_verification_accuracy", max_drop_pp=max_drop_pp, min_score=min_accuracy)
    result = quantize_with_gate(model, calibration, float_report["accuracy_mean"], accuracy, gate, io_type, fix)
    int8_emb = score_bytes(result.int8, lambda p: embed_file(p, x_eval, "int8 TFLite (final)", spec))
    int8_report = pairs.report(int8_emb)
    cosine = np.sum(float_emb * int8_emb, axis=1)
    agreement = {"mean_cosine_int8_vs_float": float(cosine.mean()), "min_cosine_int8_vs_float": float(cosine.min()),
                 "nearest_neighbour_agreement": nearest_neighbour_agreement(float_emb, int8_emb)}
    teacher_emb = teacher_on_pairs(crops, cache_dir) if teacher else None
    teacher_report = pairs.report(teacher_emb) if teacher_emb is not None else None

    # Thresholds: calibrated on the validation people, checked on the evaluation people (strangers to it).
    validation = validation_set(split, people)
    calibrate = PairSet(split.validation_pairs, validation.keys)
    x_val = student_inputs(validation.crops, spec, aligner)
    val_emb = {variant: score_bytes(tflite, lambda p: embed_file(p, x_val, f"validation ({variant})", spec))
               for variant, tflite in (("float", float_bytes), ("int8", result.int8))}
    thresholds, threshold_details = {}, {}
    for variant, emb in (("float", float_emb), ("int8", int8_emb)):
        thresholds[variant] = calibrate.thresholds(val_emb[variant])
        threshold_details[variant] = pairs.check(emb, thresholds[variant])
    pair = model_pair(float_bytes, result.int8, io_type)
    pair.files.update(extra_files)
    # Cohort for score normalisation: the first image of every training person, embedded by each variant.
    cohort_x = student_inputs(load_faces([next(iter(training[n].values())) for n in split.train_people],
                                         progress=False), spec, aligner)
    normalised = {}
    for variant, tflite in (("float", float_bytes), ("int8", result.int8)):
        vectors = score_bytes(tflite, lambda p: embed_file(p, cohort_x, f"cohort ({variant})", spec))
        stored = Cohort(vectors, COHORT_TOP_K).to_bytes()
        cohort = Cohort.load(io.BytesIO(stored), COHORT_TOP_K)  # calibrate on exactly what the device will read
        emb = float_emb if variant == "float" else int8_emb
        score_thresholds = calibrate.score_thresholds(val_emb[variant], cohort)
        normalised[variant] = pairs.check_normalised(emb, cohort, score_thresholds)
        pair.files[f"cohort_{variant}.npz"] = stored
        pair.models[variant]["thresholds"] = thresholds[variant]
        pair.models[variant]["score_normalisation"] = {
            "method": "as-norm (device.face.Cohort)", "cohort": f"cohort_{variant}.npz", "top_k": COHORT_TOP_K,
            "cohort_faces": len(vectors), "cohort_source": "first image of every training person",
            "thresholds": score_thresholds}
    if "edgetpu" in pair.models:  # the int8 model compiled for the TPU: the same integer arithmetic and calibration
        pair.models["edgetpu"] |= {k: pair.models["int8"][k] for k in ("thresholds", "score_normalisation")}
    recipe_rows = json.loads(recipes.read_text()) if recipes and recipes.is_file() else []

    metrics = {"keras_float": keras_report, "float": float_report, "int8": int8_report, "teacher": teacher_report,
               "int8_vs_float": agreement}
    drop_pp = 100 * (float_report["accuracy_mean"] - int8_report["accuracy_mean"])
    manifest: dict[str, Any] = {
        "task": "face-embedding",
        "name": out.name,  # models/face (the distilled student) or models/face-resnet (dlib's network, ported)
        "description": "128-D unit face embedding of a grey face crop (device.face.crop_face of a Haar box gives "
                       f"128x128, made the model's {spec['size'][0]}x{spec['size'][1]} input by device.face.face_input"
                       f"{', aligned with the bundled landmark model' if aligner else ''}); "
                       "same person when the Euclidean distance is <= a threshold, or when the score normalised "
                       "against the bundled cohort (device.face.Cohort) is >= its threshold",
        "models": pair.models,
        "default_model": "int8",
        "preprocessing": spec,
        "labels": [],
        "thresholds": thresholds["int8"],
        "calibration_set": {"people": "validation: LFW fold-7 people (all impostor pairs among their images for "
                                      "the FAR thresholds, their pairs.txt pairs for best_accuracy)",
                            "images": len(validation.keys),
                            "impostor_pairs": int(impostor_mask(calibrate.identities).sum()),
                            "checked_on": "the evaluation people below: strangers to training and calibration"},
        "threshold_calibration": threshold_details,  # per variant: what the thresholds do on the evaluation people
        "normalised_calibration": normalised,
        "metrics": metrics,
        "gate": result.record(gate, drop_pp),
        "calibration": {"samples": int(len(calibration)), "source": "original crops of training identities",
                        "seed": seed},
        "evaluation": {"data": "LFW View 2 pairs (lfw-crop-gray-128)",
                       "pairs_sha256": sha256_file(find_pairs_file(data_dir)), "folds": list(split.eval_folds),
                       "pairs": len(pairs.pairs), "pairs_missing_image": split.missing_pairs,
                       "images": len(keys), "split": split.describe()},
        "training": {k: v for k, v in train_info.items() if k not in ("toolchain", "preprocessing", "split")},
        "training_toolchain": train_info.get("toolchain"),  # e.g. Keras on JAX when trained on a GPU machine
        "recipes": recipe_rows,
        "toolchain": {**train_info.get("toolchain", {}), **toolchain()},
        "edgetpu": pair.edgetpu,
    }
    side_by_side = _side_by_side(metrics, {"float": len(float_bytes), "int8": len(result.int8)}, pair.latency)
    report_md = _report(manifest, side_by_side, recipe_rows, result.passed)
    target = write_bundle(out, pair.files, manifest, report_md,
                          {"summary": side_by_side, **{k: manifest[k] for k in ("metrics", "gate", "thresholds")}},
                          result.passed)
    print("\n" + side_by_side + "\n")
    print(f"gate {'PASSED' if result.passed else 'FAILED'}: int8 accuracy drop {drop_pp:+.2f} pp (limit {max_drop_pp} pp); "
          f"cosine int8 vs float {agreement['mean_cosine_int8_vs_float']:.4f}, nearest-neighbour agreement "
          f"{agreement['nearest_neighbour_agreement']:.2%}")
    print(f"int8 thresholds: {thresholds['int8']}; on the normalised score: "
          f"{manifest['models']['int8']['score_normalisation']['thresholds']}")
    print(f"bundle written to {target} (report: {target / 'report.md'})")
    return result.passed


def _row(name: str, r: dict[str, Any] | None, size: str, ms: str) -> list[Any]:
    if r is None:
        return [name, "not measured (no dlib / --no-teacher)", "-", "-", "-", "-", size, ms]
    every = r["all_pairs"]
    return [name, f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_se']:.2f}", f"{r['auc']:.4f}",
            f"{100 * every['tar_far_1pct']:.1f}", f"{100 * every['tar_far_0.1pct']:.1f}", r["pairs"], size, ms]


def _side_by_side(metrics: dict[str, Any], sizes: dict[str, int], latency: dict[str, dict[str, float]]) -> str:
    teacher_kb = teacher_model_bytes() / 1024 if teacher_available() else None
    rows = [
        _row("teacher: dlib ResNet + 5-pt aligner (host)", metrics["teacher"],
             f"{teacher_kb:,.0f} KB" if teacher_kb else "-", "see models/face-bench.md"),
        _row("Keras float", metrics["keras_float"], "-", "-"),
        _row("TFLite float32", metrics["float"], f"{sizes['float'] / 1024:.0f} KB",
             f"{latency[FLOAT_FILE]['median_ms']:.2f}"),
        _row("TFLite int8", metrics["int8"], f"{sizes['int8'] / 1024:.0f} KB",
             f"{latency[INT8_FILE]['median_ms']:.2f}"),
    ]
    return markdown_table(["model", "accuracy % (mean ± SE over folds)", "ROC AUC", "TAR@FAR1% %",
                           "TAR@FAR0.1% %", "pairs", "size", "latency ms (1 thread)"], rows)


def _report(manifest: dict[str, Any], side_by_side: str, recipes: list[dict[str, Any]], passed: bool) -> str:
    gate, agreement = manifest["gate"], manifest["metrics"]["int8_vs_float"]
    every = manifest["metrics"]["int8"]["all_pairs"]
    calibration = manifest["threshold_calibration"]
    lines = [
        "# Face embedder bundle report",
        "",
        f"Gate: **{'PASSED' if passed else 'FAILED'}** — LFW verification accuracy drop int8 vs float "
        f"{gate['drop_pp']:+.2f} pp (limit {gate['max_drop_pp']} pp), measured through the device runtime on the "
        f"{manifest['evaluation']['pairs']:,} official pairs of folds {manifest['evaluation']['folds']} "
        "(people kept out of training, validation and calibration; on LFW's own errata see the README).",
        "",
        side_by_side,
        "",
        "Accuracy and AUC on the official pairs; accuracy with the threshold chosen on the other evaluation folds, "
        "mean ± standard error over the folds (sample std / sqrt(folds), as LFW reports it). TAR at FAR over every pair of the "
        f"{manifest['evaluation']['images']:,} evaluation images ({every['same_pairs']:,} same-person, "
        f"{every['pairs'] - every['same_pairs']:,} different-person pairs): the threshold "
        "accepting at most that share of the different-person pairs (no interpolation). The official pairs' "
        f"{manifest['evaluation']['pairs'] - manifest['metrics']['int8']['same_pairs']:,} different pairs cannot "
        "resolve a FAR of 0.1%.",
        "",
        f"- int8 vs float: mean cosine {agreement['mean_cosine_int8_vs_float']:.4f} (min "
        f"{agreement['min_cosine_int8_vs_float']:.4f}), nearest-neighbour agreement "
        f"{agreement['nearest_neighbour_agreement']:.2%} over {manifest['evaluation']['images']:,} images.",
        f"- Training: {manifest['training'].get('arch', '?')} architecture, recipe "
        f"{manifest['training'].get('recipe', '?')}, {manifest['training'].get('parameters', '?')} parameters, "
        f"{manifest['training'].get('macs', '?')} MACs.",
        f"- Edge TPU ready: **{manifest['edgetpu']['ready']}**",
        "",
        "## Thresholds (Euclidean distance between unit embeddings; accept when distance <= threshold)",
        "",
        f"Calibrated on the validation people ({manifest['calibration_set']['images']:,} images, "
        f"{manifest['calibration_set']['impostor_pairs']:,} impostor pairs), measured below on the evaluation "
        "people, whom neither training nor calibration saw: the FAR column is out of sample.",
        "",
        markdown_table(
            ["variant", "threshold", "distance", "FAR on all impostor pairs", "TAR on pairs"],
            [[v, name, c[name]["threshold"], f"{100 * c[name]['far_all_impostors']:.4f}% of "
              f"{c[name]['impostor_pairs']:,}", f"{100 * c[name]['tar_on_pairs']:.1f}%"]
             for v, c in calibration.items() for name in ("far_0.1pct", "far_0.001pct")]),
        "",
        "best_accuracy (accuracy-maximising distance on the validation pairs; accuracy on the evaluation pairs): "
        + "; ".join(f"{v} {c['best_accuracy']['threshold']:.4f} ({100 * c['best_accuracy']['accuracy_on_pairs']:.2f}%)"
                    for v, c in calibration.items())
        + ". A stranger at a door is compared with every enrolled embedding, so the per-attempt rate is up to "
        "(gallery size) x the per-pair rate; the door lock therefore uses far_0.001pct, on the normalised score "
        "below.",
        "",
        "## Cohort-normalised score (what the door lock matches with; accept when score >= threshold)",
        "",
        "Each pair's cosine is measured against both faces' top-k similarities to a cohort of training people "
        "(device.face.Cohort; the cohort file is in the bundle). Metrics on that score (accuracy and AUC on the "
        "official pairs, TAR at FAR over every pair of the evaluation images, as above):",
        "",
        markdown_table(
            ["variant", "accuracy % (mean ± SE)", "ROC AUC", "TAR@FAR1% %", "TAR@FAR0.1% %"],
            [[v, f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_se']:.2f}", r["auc"],
              f"{100 * r['all_pairs']['tar_far_1pct']:.1f}", f"{100 * r['all_pairs']['tar_far_0.1pct']:.1f}"]
             for v, r in ((v, c["pairs_report"]) for v, c in manifest["normalised_calibration"].items())]),
        "",
        markdown_table(
            ["variant", "threshold", "score", "FAR on all impostor pairs", "TAR on pairs"],
            [[v, name, c[name]["threshold"], f"{100 * c[name]['far_all_impostors']:.4f}% of "
              f"{c[name]['impostor_pairs']:,}", f"{100 * c[name]['tar_on_pairs']:.1f}%"]
             for v, c in manifest["normalised_calibration"].items() for name in ("far_0.1pct", "far_0.001pct")]),
    ]
    if recipes:
        lines += ["", "## Training recipes (short runs on the same split, same training subset and budget; "
                  "Keras float on the evaluation pairs)", "",
                  markdown_table(["recipe", "arch", "epochs", "val acc %", "eval acc % (mean over folds)", "AUC",
                                  "TAR@FAR1% %", "pairs", "train s"],
                                 [[r["recipe"], r["arch"], r["epochs"], f"{100 * r['validation_accuracy']:.1f}",
                                   f"{100 * r['accuracy_mean']:.2f}", r["auc"],
                                   f"{100 * r['tar_far_1pct']:.1f}", r["pairs"], f"{r['seconds']:.0f}"]
                                  for r in recipes])]
    if gate["worst_layers"]:
        lines += ["", "## Worst layers (quantization debugger)", "",
                  markdown_table(["op", "RMSE / step", "tensor"],
                                 [[w["op"], w["rmse_per_step"], w["tensor"]] for w in gate["worst_layers"]])]
    return "\n".join(lines) + "\n"
