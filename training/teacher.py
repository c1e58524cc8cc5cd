"""The distillation teacher (dlib's 128-D face ResNet with its 5-point aligner) and its embedding cache.

The teacher runs on the host only, once per training image (and per augmented version of it): ~85 ms
per encoding on one core is far too slow to call inside a training loop, so every embedding is cached
under build/ keyed by a sha256 of the exact input pixels *and* the teacher's model files. Changing a
pixel, the augmentation, or the model file therefore misses the cache instead of returning a stale
target. dlib is an optional host extra (`pip install .[teacher]`); nothing else in the project needs it.
The 5-point landmark and ResNet models are public domain; dlib's 68-point model is deliberately unused.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

EMBEDDING_SIZE = 128
# Changing how a crop is handed to dlib changes every embedding: bump this to invalidate old caches.
TEACHER_PIPELINE = "dlib-5pt-resnet/v1: grey->RGB, HOG detect (no upsampling) else box inset 6%, chip 150 px, no jitter"
TEACHER_MISSING = (
    "the distillation teacher needs dlib and its model files, which are host-only extras: "
    "run `pip install .[teacher]` (dlib compiles from source, ~10-15 min)"
)


class TeacherUnavailable(RuntimeError):
    """dlib or face_recognition_models is not installed."""


def pixels_key(pixels: np.ndarray, model_digest: str) -> str:
    """sha256 over the teacher identity and the exact pixels (shape and dtype included)."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(model_digest.encode())
    digest.update(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


class TeacherCache:
    """Teacher embeddings on disk, one file per teacher model: {sha256(model + pixels): 128-D vector}.

    The file records the model digest it was made with; a cache made by another model is ignored (and
    overwritten on save), so a replaced model file can never feed old targets to a new training run.
    """

    def __init__(self, directory: Path, model_digest: str):
        self.model_digest = model_digest
        self.path = Path(directory) / f"teacher-{model_digest[:16]}.npz"
        self.entries: dict[str, np.ndarray] = {}
        self.dirty = False
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["model_digest"]) == model_digest:
                    self.entries = dict(zip((str(k) for k in data["keys"]), data["embeddings"]))

    @classmethod
    def existing(cls, directory: Path) -> "TeacherCache":
        """The cache already in `directory`, for training without dlib installed (cache-only mode).

        Pixels are still checked entry by entry; only the model digest is taken from the file, since
        without dlib there is no model file to hash.
        """
        files = sorted(Path(directory).glob("teacher-*.npz"), key=lambda f: f.stat().st_mtime)
        if not files:
            raise TeacherUnavailable(f"no teacher cache in {directory}; {TEACHER_MISSING}")
        with np.load(files[-1], allow_pickle=False) as data:
            return cls(directory, str(data["model_digest"]))

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, pixels: np.ndarray) -> np.ndarray | None:
        return self.entries.get(pixels_key(pixels, self.model_digest))

    def put(self, pixels: np.ndarray, embedding: np.ndarray) -> None:
        self.entries[pixels_key(pixels, self.model_digest)] = np.asarray(embedding, np.float32).reshape(-1)
        self.dirty = True

    def save(self) -> None:
        """Write atomically (temp file + rename) so an interrupted run never leaves a corrupt cache."""
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self.entries))
        embeddings = np.stack([self.entries[k] for k in keys]) if len(keys) else np.zeros((0, EMBEDDING_SIZE))
        temp = self.path.with_name(f".partial-{self.path.name}")  # np.savez wants the .npz suffix
        np.savez(temp, model_digest=np.array(self.model_digest), keys=keys, embeddings=embeddings.astype(np.float32))
        temp.replace(self.path)
        self.dirty = False


class DlibTeacher:
    """dlib's face recognition ResNet on our 128x128 grey crops: align with 5 landmarks, embed to 128-D."""

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise TeacherUnavailable(f"{TEACHER_MISSING} ({exc})") from exc
        from device.bundle import sha256_file

        predictor = Path(face_recognition_models.pose_predictor_five_point_model_location())
        resnet = Path(face_recognition_models.face_recognition_model_location())
        self.model_files = {"landmarks_5pt": predictor, "resnet": resnet}
        self.model_digest = hashlib.sha256(
            (TEACHER_PIPELINE + sha256_file(predictor) + sha256_file(resnet)).encode()
        ).hexdigest()
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(predictor))
        self._resnet = dlib.face_recognition_model_v1(str(resnet))
        self._rectangle = dlib.rectangle

    def __reduce__(self) -> tuple:
        """Pickled as "load the teacher again": dlib's objects cannot be pickled, but worker processes
        (see `teacher_embeddings(workers=...)`) can load their own copy of the same model files."""
        return (DlibTeacher, ())

    def embed(self, crop: np.ndarray) -> np.ndarray:
        """One grey crop framed like lfw-crop-gray-128 → unit 128-D embedding.

        Detection gives the 5-point aligner the box it was trained with; when the detector finds no face
        (profile, blur) the crop itself is the box, slightly inset, because our crops are centred on a face.
        """
        rgb = np.ascontiguousarray(np.repeat(crop[:, :, np.newaxis], 3, axis=2))
        height, width = crop.shape
        boxes = self._detector(rgb, 0)
        if len(boxes):
            centre = np.array([width / 2, height / 2])
            box = min(boxes, key=lambda b: np.hypot(*(np.array([b.center().x, b.center().y]) - centre)))
        else:
            inset = int(round(0.06 * width))
            box = self._rectangle(inset, inset, width - inset, height - inset)
        shape = self._predictor(rgb, box)
        vector = np.array(self._resnet.compute_face_descriptor(rgb, shape, 0), dtype=np.float32)
        return vector / np.linalg.norm(vector)


def load_teacher() -> DlibTeacher:
    """The teacher, or TeacherUnavailable with the install command."""
    return DlibTeacher()


def teacher_model_bytes() -> int:
    """Size of the teacher's two model files (landmarks + ResNet); needs face_recognition_models."""
    import face_recognition_models

    return sum(Path(f()).stat().st_size for f in (face_recognition_models.pose_predictor_five_point_model_location,
                                                  face_recognition_models.face_recognition_model_location))


def teacher_available() -> bool:
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
    except ImportError:
        return False
    return True


_worker_embed: Callable[[np.ndarray], np.ndarray] | None = None


def _start_worker(embed: Callable[[np.ndarray], np.ndarray]) -> None:
    global _worker_embed
    _worker_embed = embed


def _embed_in_worker(image: np.ndarray) -> np.ndarray:
    assert _worker_embed is not None, "worker started without an embed function"
    return _worker_embed(image)


def _embedded(images: list[np.ndarray], embed: Callable[[np.ndarray], np.ndarray], workers: int) -> Iterator[np.ndarray]:
    """Embeddings of `images` in order; with workers > 1, from that many spawned processes.

    dlib runs one encoding per core, so the teacher's hours scale down with cores. Processes are
    *spawned* (not forked) because the caller usually has TensorFlow's thread pools running; `embed`
    is pickled once per worker (a DlibTeacher pickles as "load the model files again").
    """
    if workers <= 1:
        yield from (embed(image) for image in images)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(embed,)) as pool:
        yield from pool.map(_embed_in_worker, images, chunksize=32)


def default_workers() -> int:
    """Cores this process may use (affinity and container limits included)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def teacher_embeddings(images: Sequence[np.ndarray] | np.ndarray, cache: TeacherCache,
                       embed: Callable[[np.ndarray], np.ndarray] | None, desc: str = "teacher",
                       save_every: int = 500, workers: int = 1) -> np.ndarray:
    """Embeddings for every image, computing only what the cache lacks (saved as it goes).

    `embed=None` means "cache only": a missing entry raises TeacherUnavailable, so training without
    dlib works exactly when the cache is complete. `workers` > 1 computes in that many processes.
    """
    from tqdm import tqdm

    missing = [i for i, image in enumerate(images) if cache.get(image) is None]
    if missing and embed is None:
        raise TeacherUnavailable(f"{len(missing)} of {len(images)} teacher embeddings are not cached; "
                                 + TEACHER_MISSING)
    if missing:
        workers = max(1, min(workers, len(missing) // 64 or 1))
        print(f"{desc}: {len(images) - len(missing):,} cached, computing {len(missing):,} "
              f"(~{len(missing) * 0.09 / 60 / workers:.0f} min at ~85 ms each on {workers} core(s))", flush=True)
        started = time.time()
        vectors = _embedded([images[i] for i in missing], embed, workers)
        try:
            for done, (i, vector) in enumerate(tqdm(zip(missing, vectors), total=len(missing), desc=desc,
                                                    unit="img", mininterval=5), start=1):
                cache.put(images[i], vector)
                if done % save_every == 0:
                    cache.save()
        finally:  # an error or Ctrl-C keeps every embedding finished so far
            cache.save()
        print(f"{desc}: {len(missing):,} encodings in {time.time() - started:.0f} s", flush=True)
    return np.stack([cache.get(image) for image in images])
