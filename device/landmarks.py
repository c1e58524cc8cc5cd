"""dlib's 5-point face landmarks and face-chip alignment in numpy, without dlib.

dlib aligns every face before its face ResNet sees it: its 5-point shape predictor
(`shape_predictor_5_face_landmarks.dat`, public domain; an ensemble of regression trees after Kazemi & Sullivan
2014) finds the eye corners and the base of the nose, and `get_face_chip_details` turns them into a similarity
transform to a 150x150 chip. That network, ported to LiteRT (models/face-resnet), and the student cut from it
(models/face, a 112x112 chip) need exactly that alignment on the device, where dlib is not installed (it compiles
from source for an hour on a Pi). This module reproduces
both from dlib 20's source, bit for bit where it matters:

* the model is the same numbers: `read_dlib_shape_predictor` parses dlib's serialisation (host side, once),
  `ShapePredictor.to_bytes` / `load` keep it as a plain `.npz` for the model bundle (5.8 MB, no pickle);
* `ShapePredictor.predict` follows dlib's `shape_predictor::operator()` step by step, with the same float32
  arithmetic where dlib uses float (the shape, the similarity matrix applied to the feature offsets, the
  sequential sum of the tree outputs) and float64 where dlib uses double (the box transform), the same
  rounding of sampled locations (floor(x + 0.5)) and 0 for feature pixels outside the image. dlib returns
  integer pixel positions (`full_object_detection` holds `point`s), so `predict` does too unless asked for
  the sub-pixel values. Against dlib's own output on 400 LFW crops every landmark is identical;
* `chip_transform` is the affine map `extract_image_chip(img, get_face_chip_details(shape, size, padding))`
  samples with, from image pixel coordinates to chip pixel coordinates, for `cv2.warpAffine` (mean difference
  to dlib's chip ~1 grey level, see there; tests/test_landmarks.py cuts dlib's chip bit for bit with it).

Conventions the integrator must keep (they are dlib's, see `chip_transform`): a dlib rectangle is inclusive
(right = left + width - 1), so an OpenCV box (x, y, w, h) is (x, y, x + w - 1, y + h - 1); pixel centres sit on
integer coordinates in dlib and in OpenCV's warpAffine alike (no half-pixel shift between the two). The chip map
is not simply "the similarity from the landmarks to the template": dlib fits template -> landmarks (the other
direction differs by pixels when the landmarks fit the template poorly), then centres the chip rectangle on the
image of template point (size/2, size/2) but samples it from chip pixel (size-1)/2, with (size*scale - 1) /
(size - 1) image pixels per chip pixel; inverting the fitted similarity instead of using `chip_transform`
shifts the chip by about half a chip pixel (0.43 image px on average on the LFW crops).
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

FORMAT = "dlib-shape-predictor-npz/1"
# float_details marks non-finite values with these exponents (dlib/float_details.h).
_IS_INF, _IS_NINF, _IS_NAN = 32000, 32001, 32002
# dlib's mean face for 5 landmarks, in a unit square (get_face_chip_details, dlib/image_transforms/interpolation.h).
# The predictor's landmarks come in the same order: 0, 1 the outer and inner corner of the eye on the image's right
# (the subject's left eye), 2, 3 the outer and inner corner of the other eye, 4 the base of the nose.
FACE_TEMPLATE_5 = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------------------------
# dlib's serialisation


class DlibReader:
    """Cursor over dlib's binary serialisation (also read by training/face/dlib_resnet.py for dlib's face ResNet).

    A packed integer is one control byte (low nibble: number of little-endian bytes that follow, 1..8;
    bit 0x80: negative; bits 0x70 always 0) and then those bytes. A float is two of them, mantissa and
    exponent (float_details). Anything else — an old ASCII-float file, a file of another kind — breaks
    these rules within the first few bytes, which is how a wrong file is refused quickly.
    """

    def __init__(self, data: bytes, name: str, kind: str = "dlib shape predictor", pos: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.name = name
        self.kind = kind

    def fail(self, why: str) -> ValueError:
        return ValueError(f"{self.name} is not a {self.kind} file: {why} (at byte {self.pos})")

    def ints(self, count: int) -> list[int]:
        """The next `count` packed integers (a tight loop: the file holds ~2.5 million of them)."""
        data, pos, end = self.data, self.pos, len(self.data)
        out = [0] * count
        from_bytes = int.from_bytes
        for k in range(count):
            if pos >= end:
                self.pos = pos
                raise self.fail("it ends in the middle of a value")
            control = data[pos]
            size = control & 0x0F
            if size == 0 or size > 8 or control & 0x70:
                self.pos = pos
                raise self.fail(f"byte 0x{control:02x} is not an integer control byte")
            value = from_bytes(data[pos + 1:pos + 1 + size], "little")
            out[k] = -value if control & 0x80 else value
            pos += 1 + size
        if pos > end:
            raise self.fail("it ends in the middle of a value")
        self.pos = pos
        return out

    def int(self) -> int:
        return self.ints(1)[0]

    def count(self, what: str, limit: int = 1 << 24) -> int:
        """A std::vector size or matrix dimension, refused when negative or absurd (a wrong file's bytes)."""
        value = self.int()
        if not 0 <= value <= limit:
            raise self.fail(f"{what} {value} is out of range")
        return value

    def floats(self, count: int) -> np.ndarray:
        """`count` floats (mantissa * 2**exponent each) as float32, as dlib's deserialize(float&) gives them."""
        pairs = np.array(self.ints(2 * count), dtype=np.int64).reshape(count, 2)
        mantissa, exponent = pairs[:, 0], pairs[:, 1]
        # Written from floats the mantissa has at most 24 bits, so the float64 result is exact before the cast.
        if np.any(np.abs(mantissa) >= 1 << 53) or np.any(np.abs(exponent) >= 1 << 15):
            raise self.fail("a float has an impossible mantissa or exponent")
        special = exponent >= _IS_INF
        values = np.ldexp(mantissa.astype(np.float64), np.where(special, 0, exponent).astype(np.int32))
        if special.any():
            values[exponent == _IS_INF] = np.inf
            values[exponent == _IS_NINF] = -np.inf
            values[exponent == _IS_NAN] = np.nan
        with np.errstate(over="ignore"):
            return values.astype(np.float32)

    def tensor(self) -> np.ndarray:
        """A dlib tensor: version 2, four packed dimensions (samples, k, rows, cols), then raw little-endian float32."""
        if self.int() != 2:
            raise self.fail("a tensor of an unknown version")
        dims = [self.count("a tensor dimension") for _ in range(4)]
        count = int(np.prod(dims))
        if self.pos + 4 * count > len(self.data):
            raise self.fail("it ends in the middle of a tensor")
        values = np.frombuffer(self.data, "<f4", count, self.pos).astype(np.float32).reshape(dims)
        self.pos += 4 * count
        return values

    def column(self, what: str) -> np.ndarray:
        """A dlib matrix<float,0,1>: rows and columns (negated in the newer format), then the values row by row."""
        rows, cols = self.ints(2)
        rows, cols = abs(rows), abs(cols)
        if cols != 1 or rows > 1 << 16:
            raise self.fail(f"{what} is a {rows}x{cols} matrix, not a column vector")
        return self.floats(rows)


def read_dlib_shape_predictor(path: str | Path) -> "ShapePredictor":
    """dlib's serialised `shape_predictor` (e.g. shape_predictor_5_face_landmarks.dat) → `ShapePredictor`.

    Layout (dlib/image_processing/shape_predictor.h): int version (1); the initial shape (matrix<float,0,1>,
    x0 y0 x1 y1 ... in box-normalised coordinates); the forests (one std::vector of regression trees per
    cascade level; a tree is its splits (idx1, idx2, thresh), breadth first, then its leaf vectors); the anchor
    landmark of each feature pixel per level; and each feature pixel's offset from its anchor in the initial
    shape. Only predictors whose levels all have the same number of trees, features and tree depth are
    accepted (every predictor dlib's trainer writes), because that is what makes `predict` vectorise.
    Takes a few seconds: the file is millions of variable-length integers, parsed once on the host.
    """
    path = Path(path)
    data = path.read_bytes()
    reader = DlibReader(data, str(path))
    if reader.int() != 1:
        raise reader.fail("the version is not 1")
    initial = reader.column("the initial shape")
    if len(initial) < 4 or len(initial) % 2:
        raise reader.fail(f"the initial shape has {len(initial)} values")
    n_values = len(initial)

    n_levels = reader.count("the number of cascade levels", 1 << 10)
    forests = []
    for _ in range(n_levels):
        n_trees = reader.count("the number of trees", 1 << 16)
        trees = []
        for _ in range(n_trees):
            n_splits = reader.count("the number of splits", 1 << 16)
            splits = np.array(reader.ints(4 * n_splits), dtype=np.int64).reshape(n_splits, 4)
            if np.any(np.abs(splits[:, 2]) >= 1 << 53) or np.any(splits[:, 3] >= _IS_INF) or \
                    np.any(splits[:, :2] < 0):
                raise reader.fail("a split is malformed")
            thresh = np.ldexp(splits[:, 2].astype(np.float64), splits[:, 3].astype(np.int32)).astype(np.float32)
            n_leaves = reader.count("the number of leaves", 1 << 17)
            leaves = [reader.column("a leaf value") for _ in range(n_leaves)]
            if any(len(leaf) != n_values for leaf in leaves):
                raise reader.fail("a leaf does not have one value per shape coordinate")
            trees.append((splits[:, 0], splits[:, 1], thresh, np.array(leaves, np.float32).reshape(n_leaves, n_values)))
        forests.append(trees)

    if reader.count("the number of anchor lists", 1 << 10) != n_levels:
        raise reader.fail("there is not one anchor list per cascade level")
    anchors = []
    for _ in range(n_levels):
        anchors.append(np.array(reader.ints(reader.count("the number of anchors")), dtype=np.int64))
    if reader.count("the number of delta lists", 1 << 10) != n_levels:
        raise reader.fail("there is not one offset list per cascade level")
    deltas = []
    for _ in range(n_levels):
        n = reader.count("the number of offsets")
        deltas.append(reader.floats(2 * n).reshape(n, 2))
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} bytes follow the predictor")

    shapes = {(len(t), *(v.shape for v in t[0][:4])) if t else None for t in forests}
    if n_levels == 0 or len(shapes) != 1 or None in shapes:
        raise ValueError(f"{path}: cascade levels differ in size; only regular predictors are supported")
    for trees in forests:
        if len({(len(t[0]), len(t[3])) for t in trees}) != 1:
            raise ValueError(f"{path}: trees differ in depth; only regular predictors are supported")
    if len({len(a) for a in anchors} | {len(d) for d in deltas}) != 1:
        raise ValueError(f"{path}: cascade levels use different numbers of feature pixels")
    return ShapePredictor(
        initial_shape=initial.reshape(-1, 2),
        anchor_idx=np.stack(anchors),
        deltas=np.stack(deltas),
        split_idx1=np.stack([np.stack([t[0] for t in trees]) for trees in forests]),
        split_idx2=np.stack([np.stack([t[1] for t in trees]) for trees in forests]),
        split_thresh=np.stack([np.stack([t[2] for t in trees]) for trees in forests]),
        leaf_values=np.stack([np.stack([t[3] for t in trees]) for trees in forests]),
    )


# --------------------------------------------------------------------------------------------------------------
# the predictor


def _similarity_m(from_xy: list[float], to_xy: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares similarity x' = [[a, -b], [b, a]] x + t mapping from-points onto to-points.

    dlib's find_similarity_transform computes this with Umeyama's SVD recipe in double; for 2-D points the
    rotation-and-scale it finds is exactly this closed form (the set of scaled rotations is a linear space),
    equal up to the last bit of a double, which the float32 cast that follows in dlib removes.
    """
    n = len(from_xy) // 2
    fx, fy, tx, ty = from_xy[0::2], from_xy[1::2], to_xy[0::2], to_xy[1::2]
    mfx, mfy, mtx, mty = sum(fx) / n, sum(fy) / n, sum(tx) / n, sum(ty) / n
    sigma = dot = cross = 0.0
    for i in range(n):
        ux, uy, vx, vy = fx[i] - mfx, fy[i] - mfy, tx[i] - mtx, ty[i] - mty
        sigma += ux * ux + uy * uy
        dot += vx * ux + vy * uy
        cross += vy * ux - vx * uy
    if sigma == 0.0:
        return 1.0, 0.0
    return dot / sigma, cross / sigma


def _leaf_table(depth: int) -> np.ndarray:
    """Leaf reached for every combination of split outcomes: bit j of the index = 'go left' at node j.

    Evaluating all splits of all trees at once and looking the path up here replaces `depth` rounds of
    per-tree gathers by one, which is most of what makes `predict` fast in numpy.
    """
    n_splits = (1 << depth) - 1
    codes = np.arange(1 << n_splits, dtype=np.int64)
    node = np.zeros_like(codes)
    for _ in range(depth):
        left = (codes >> node) & 1
        node = 2 * node + 2 - left  # dlib: left child 2i+1 when diff > thresh, else right child 2i+2
    return (node - n_splits).astype(np.uint8 if depth <= 8 else np.uint16)


@dataclass
class ShapePredictor:
    """dlib shape predictor as arrays (C cascade levels, T trees per level, F feature pixels per level, S splits
    and L = S + 1 leaves per tree, P landmarks).

    initial_shape (P, 2) float32: the mean shape in box-normalised coordinates (box corners at 0 and 1).
    anchor_idx (C, F): the landmark each feature pixel is placed relative to; deltas (C, F, 2) float32 its offset
    in the initial shape. split_idx1/split_idx2 (C, T, S): the two feature pixels a split compares, and
    split_thresh (C, T, S) float32 the threshold on their difference, nodes breadth first (children of i are
    2i+1 when the difference exceeds the threshold, else 2i+2); leaf_values (C, T, L, 2P) float32 the shape
    increments, x0 y0 x1 y1 ...
    """

    initial_shape: np.ndarray
    anchor_idx: np.ndarray
    deltas: np.ndarray
    split_idx1: np.ndarray
    split_idx2: np.ndarray
    split_thresh: np.ndarray
    leaf_values: np.ndarray

    def __post_init__(self) -> None:
        self.initial_shape = np.ascontiguousarray(self.initial_shape, np.float32)
        self.deltas = np.ascontiguousarray(self.deltas, np.float32)
        self.split_thresh = np.ascontiguousarray(self.split_thresh, np.float32)
        self.leaf_values = np.ascontiguousarray(self.leaf_values, np.float32)
        n_parts = self.initial_shape.shape[0]
        if self.initial_shape.shape != (n_parts, 2) or n_parts < 2:
            raise ValueError(f"initial_shape must be (P, 2) with P >= 2, got {self.initial_shape.shape}")
        levels, n_features = self.anchor_idx.shape
        _, n_trees, n_splits = self.split_thresh.shape
        depth = int(n_splits + 1).bit_length() - 1
        if (1 << depth) - 1 != n_splits or depth < 1:
            raise ValueError(f"trees must be complete binary trees, got {n_splits} splits")
        if depth > 4:  # dlib's default and its 5- and 68-point models; deeper trees would need another leaf lookup
            raise ValueError(f"trees of depth {depth} are not supported (at most 4)")
        expect = {
            "deltas": (self.deltas.shape, (levels, n_features, 2)),
            "split_idx1": (self.split_idx1.shape, (levels, n_trees, n_splits)),
            "split_idx2": (self.split_idx2.shape, (levels, n_trees, n_splits)),
            "split_thresh": (self.split_thresh.shape, (levels, n_trees, n_splits)),
            "leaf_values": (self.leaf_values.shape, (levels, n_trees, n_splits + 1, 2 * n_parts)),
        }
        for name, (got, want) in expect.items():
            if got != want:
                raise ValueError(f"{name} has shape {got}, expected {want}")
        for name, values, bound in (("anchor_idx", self.anchor_idx, n_parts),
                                    ("split_idx1", self.split_idx1, n_features),
                                    ("split_idx2", self.split_idx2, n_features)):
            if values.size and (values.min() < 0 or values.max() >= bound):
                raise ValueError(f"{name} holds an index outside 0..{bound - 1}")
        if not (np.isfinite(self.leaf_values).all() and np.isfinite(self.deltas).all()
                and np.isfinite(self.initial_shape).all()):
            raise ValueError("the predictor holds non-finite values")
        index = np.uint16 if n_features <= 1 << 16 else np.int64
        self.anchor_idx = np.ascontiguousarray(self.anchor_idx, np.intp)
        self.split_idx1 = np.ascontiguousarray(self.split_idx1, index)
        self.split_idx2 = np.ascontiguousarray(self.split_idx2, index)
        # Working copies laid out for predict (per level): feature offsets x and y as rows, the two pixels of
        # every split of every tree as a (2, T * S) index, integer thresholds (the pixel difference is an
        # integer, so `diff > t` is `diff > floor(t)`; NaN never sends left), leaves flat (T * L, 2P), and
        # each tree's first leaf row.
        self._dx = np.ascontiguousarray(self.deltas[..., 0])
        self._dy = np.ascontiguousarray(self.deltas[..., 1])
        self._pairs = np.stack([self.split_idx1.reshape(levels, -1), self.split_idx2.reshape(levels, -1)],
                               axis=1).astype(np.intp)
        with np.errstate(invalid="ignore"):
            floor = np.floor(np.nan_to_num(self.split_thresh.reshape(levels, -1), nan=np.inf))
        self._thresh = np.clip(floor, -256, 256).astype(np.int16)
        self._leaves = self.leaf_values.reshape(levels, n_trees * (n_splits + 1), 2 * n_parts)
        self._leaf_base = np.arange(n_trees, dtype=np.intp) * (n_splits + 1)
        # Bit j of a tree's code = "went left at node j"; codes of up to 15 bits are exact in float32, so a
        # float32 matrix-vector product packs them, and a 32768-entry table turns a code into the leaf.
        self._table = _leaf_table(depth)
        self._powers = (2.0 ** np.arange(n_splits)).astype(np.float32)
        initial = self.initial_shape.astype(np.float64)
        centred = initial - initial.mean(axis=0)
        sigma = float((centred ** 2).sum())
        if sigma == 0:
            raise ValueError("the initial shape has all its points in one place")
        # find_tform_between_shapes(initial, current) as two dot products with the current shape: a = sum of
        # current . centred initial, b = sum of their cross products, over sigma (as _similarity_m; the current
        # shape's mean drops out because the centred initial points sum to zero)
        self._sim = np.stack([centred.reshape(-1), np.stack([-centred[:, 1], centred[:, 0]], 1).reshape(-1)], 1) / sigma

    @property
    def num_parts(self) -> int:
        return int(self.initial_shape.shape[0])

    # ---- storage ---------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The `.npz` that `load` reads: the arrays as they are (float32, small integers), no pickle."""
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(FORMAT), initial_shape=self.initial_shape,
                 anchor_idx=self.anchor_idx.astype(np.uint16 if self.num_parts <= 1 << 16 else np.int64),
                 deltas=self.deltas, split_idx1=self.split_idx1, split_idx2=self.split_idx2,
                 split_thresh=self.split_thresh, leaf_values=self.leaf_values)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path | BinaryIO) -> "ShapePredictor":
        """A predictor saved by `to_bytes` (a path or an open binary file, e.g. bytes read from a bundle)."""
        if isinstance(path, (bytes, bytearray)):
            path = io.BytesIO(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data.files or str(data["format"]) != FORMAT:
                    raise ValueError(f"not a {FORMAT} file")
                arrays = {name: data[name] for name in ("initial_shape", "anchor_idx", "deltas", "split_idx1",
                                                        "split_idx2", "split_thresh", "leaf_values")}
        except (OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read a shape predictor from {path!r}: {exc}") from exc
        return cls(**arrays)

    # ---- prediction ------------------------------------------------------------------------------------------

    def predict(self, image: np.ndarray, box: Box, subpixel: bool = False) -> np.ndarray:
        """Landmarks (P, 2) float32 (x, y) in image pixels for the face in `box`, exactly as dlib finds them.

        `image`: uint8 grey (H, W), or colour (H, W, 3), whose intensity is taken as dlib takes it: the integer
        mean (c0 + c1 + c2) // 3 (not luma; channel order does not matter). `box`: (left, top, right, bottom)
        in dlib's inclusive convention (right = left + width - 1), normally integers as dlib's `rectangle` is.
        The result holds dlib's integer positions (its `point`s: floor(x + 0.5)); with `subpixel=True` the
        unrounded positions instead (not dlib's output, but a steadier input for alignment).
        """
        flat, height, width = _pixels(image)
        colour = flat.ndim == 2
        left, top, right, bottom = (float(v) for v in box)
        # unnormalizing_tform(rect): (0,0) -> (left, top), (1,1) -> (right, bottom); in double, as dlib's
        # point_transform_affine. dlib fits it by pseudo-inverse; its entries are these up to the last bit.
        scale = np.array([[right - left], [bottom - top]])
        offset = np.array([[left], [top]]) + 0.5  # + 0.5: dlib's float -> long conversion is floor(v + 0.5)
        bounds = np.array([[width], [height]], np.uintp)
        row_step = np.array([1, width], np.intp)

        shape = self.initial_shape.reshape(-1).copy()  # float32, like dlib's matrix<float,0,1>
        table, base, powers = self._table, self._leaf_base, self._powers
        n_trees = base.size
        accumulate = np.empty((n_trees + 1, shape.size), np.float32)
        for level in range(self.anchor_idx.shape[0]):
            # find_tform_between_shapes(initial, current): only its 2x2 part [[a, -b], [b, a]] is used, as float.
            a, b = (shape.astype(np.float64) @ self._sim).tolist()
            column0 = np.array([[a], [b]], np.float32)
            column1 = np.array([[-b], [a]], np.float32)
            # feature pixels (2, F) = tform * delta + location(current_shape, anchor), all float32 like dlib
            points = (column0 * self._dx[level] + column1 * self._dy[level]) \
                + shape.reshape(-1, 2).T.take(self.anchor_idx[level], axis=1)
            # to image pixels in double, rounded to the nearest pixel; pixels outside the image read 0
            pixels = np.multiply(points, scale)
            pixels += offset
            pixels = np.floor(pixels, out=pixels).astype(np.intp)
            ok = pixels.view(np.uintp) < bounds  # negative coordinates wrap to huge unsigned ones
            values = flat.take(row_step @ pixels, axis=0, mode="clip")
            if colour:  # dlib's intensity of a colour pixel, computed only where a feature reads one
                values = values.sum(axis=1, dtype=np.int16) // 3
            values = np.where(ok[0] & ok[1], values, np.int16(0))
            # every split of every tree at once: go left when values[idx1] - values[idx2] > thresh
            pair = values.take(self._pairs[level])
            left_bits = ((pair[0] - pair[1]) > self._thresh[level]).reshape(n_trees, -1)
            leaf = table.take((left_bits.astype(np.float32) @ powers).astype(np.intp))
            # current_shape += each tree's leaf, one tree after the other in float32 (dlib's rounding order;
            # numpy reduces over the slow axis row by row, never pairwise)
            accumulate[0] = shape
            np.take(self._leaves[level], base + leaf, axis=0, out=accumulate[1:])
            shape = np.add.reduce(accumulate, axis=0)

        points = shape.reshape(-1, 2).astype(np.float64) * scale.T + (offset.T - 0.5)
        if not subpixel:
            points = np.floor(points + 0.5)
        return points.astype(np.float32)


def _pixels(image: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The image's pixels as a flat (H*W,) grey or (H*W, 3) colour array, plus its height and width.

    Colour stays colour: dlib's intensity of a colour pixel, (c0 + c1 + c2) // 3 (get_pixel_intensity), is taken
    only at the few hundred pixels a cascade level reads, not over a whole camera frame (~6x faster at 640x480).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or image.size == 0:
        raise ValueError(f"image must be (H, W) grey or (H, W, 3) colour, got shape {image.shape}")
    height, width = image.shape[:2]
    image = np.ascontiguousarray(image)
    return image.reshape(height * width, -1) if image.ndim == 3 else image.reshape(-1), height, width


# --------------------------------------------------------------------------------------------------------------
# face chips


class ChipDetails(NamedTuple):
    """dlib's chip_details for a face: the chip's rectangle in the image before rotation, and its rotation.

    left/top/right/bottom are a dlib drectangle (its width is right - left + 1); angle in radians, the chip's
    x axis turned by `angle` in the image (positive: from image x towards image y). rows/cols: chip size.
    """

    left: float
    top: float
    right: float
    bottom: float
    angle: float
    rows: int
    cols: int


def face_chip_details(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's get_face_chip_details(shape, size, padding) for a 5-point shape (dlib gives it its integer
    landmarks, `predict`'s default output; sub-pixel landmarks give a slightly different, not dlib's, chip).

    The 5 template points, padded and scaled to the chip, are mapped onto the landmarks by a least-squares
    similarity (in double, like dlib); the chip rectangle is centred on where the chip centre (size/2, size/2)
    lands, with sides size * scale (dlib's centered_drect makes right - left = size * scale - 1).
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need the 5 landmarks of the 5-point predictor, got shape {landmarks.shape}")
    if size <= 0 or padding < 0:
        raise ValueError(f"need size > 0 and padding >= 0, got size={size}, padding={padding}")
    template = (padding + FACE_TEMPLATE_5) / (2 * padding + 1) * size
    a, b = _similarity_m(template.reshape(-1).tolist(), landmarks.reshape(-1).tolist())
    mean_from, mean_to = template.mean(axis=0), landmarks.mean(axis=0)
    tx = mean_to[0] - (a * mean_from[0] - b * mean_from[1])
    ty = mean_to[1] - (b * mean_from[0] + a * mean_from[1])
    angle = math.atan2(b, a)
    scale = math.hypot(a, b)
    cx = a * (size / 2.0) - b * (size / 2.0) + tx
    cy = b * (size / 2.0) + a * (size / 2.0) + ty
    half_w = (size * scale - 1) / 2
    half_h = (size * scale - 1) / 2
    return ChipDetails(cx - half_w, cy - half_h, cx + half_w, cy + half_h, angle, int(size), int(size))


def chip_to_image(details: ChipDetails) -> np.ndarray:
    """(2, 3) affine from chip pixel (col, row) to image pixel (x, y), as dlib's extract_image_chip samples.

    dlib maps chip (0, 0), (cols-1, 0) and (0, rows-1) onto the rectangle's tl, tr and bl corners rotated by
    `angle` about the rectangle's centre, and reads the image by bilinear interpolation at the result, with
    pixel centres at integer coordinates.
    """
    left, top, right, bottom, angle, rows, cols = details
    cos, sin = math.cos(angle), math.sin(angle)
    sx = (right - left) / max(cols - 1, 1)
    sy = (bottom - top) / max(rows - 1, 1)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    # image = centre + R @ ((col * sx, row * sy) - half extents)
    ox, oy = left - cx, top - cy
    return np.array([
        [cos * sx, -sin * sy, cx + cos * ox - sin * oy],
        [sin * sx, cos * sy, cy + sin * ox + cos * oy],
    ])


def chip_transform(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """(2, 3) float64 affine from image (x, y) to chip pixel coordinates for dlib's aligned face chip.

    `cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR)` then gives the chip that dlib's
    `extract_image_chip(img, get_face_chip_details(shape, size, padding), chip)` makes, up to interpolation
    details: both put pixel centres on integer coordinates (no half-pixel shift between them), but dlib
    truncates the interpolated value to an integer where OpenCV rounds (OpenCV's chip is ~0.5 grey level
    brighter on average), dlib writes 0 wherever any of the four pixels it interpolates lies outside the image
    (so the last image row and column are never read) where OpenCV blends with its border value, and
    OpenCV quantises sampling positions to 1/32 pixel. And when the face's chip rectangle is over twice the
    chip size (a face ~300+ px wide for a 150 px chip) dlib first halves the image with its pyramid_down<2>
    filter; warpAffine would alias there — shrink the frame first (e.g. cv2.pyrDown) and scale M to match
    (device.face.Aligner needs neither: it aligns within the 128x128 crop, where the chip is ~127 px across).
    """
    to_image = np.vstack([chip_to_image(face_chip_details(landmarks, size, padding)), [0.0, 0.0, 1.0]])
    return np.linalg.inv(to_image)[:2]
