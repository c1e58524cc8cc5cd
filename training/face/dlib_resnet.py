"""dlib's face recognition ResNet rebuilt as a Keras model from its public-domain weights.

The distillation teacher (training/teacher.py) scores 98.5% on our LFW evaluation folds; the students we can
train from LFW's 7.7k photos stop near 95%. The teacher's network itself is small enough for a Raspberry Pi once
it is int8 (29 convolutions, 5.6 M parameters, ~0.27 G MACs), so this module reads its weights straight out of
`dlib_face_recognition_resnet_model_v1.dat` (from the `face_recognition_models` package, host extra `host`) and
builds the same network in Keras, which the converter then quantises like any other face model. dlib itself is
not needed: the file is parsed here.

dlib aligns every face with its 5-point landmark model and resamples a 150x150 "chip"; the device does the same
with that landmark model ported to numpy (device/landmarks.py, device.face.Aligner), so the shipped Keras model
takes the aligned grey chip. Without landmarks (`build(align=False)`) it takes our usual grey 128x128 crop of a
Haar box and cuts one fixed square out of it (`Framing`), 1.5 pp less accurate.

The network, as dlib's dnn_face_recognition_ex.cpp declares it (input side first):
  con 7x7/2 (32) → affine → relu → max_pool 3x3/2 → 3 residual blocks of 32 → [down] 64 + 3 of 64 →
  [down] 128 + 2 of 128 → [down] 256 + 2 of 256 → [down] 256 → average over space → fc 128 (no bias).
A block is con 3x3 → affine → relu → con 3x3 → affine, added to its input, then relu. A [down] block's first
con has stride 2 and no padding, and its shortcut is a 2x2/2 average pool; dlib's add_prev sums tensors of
different shapes by zero-extending the smaller one at the end of each axis (channels, rows, columns), which
`_add_prev` reproduces because the shapes do differ (8x8 → 3x3 convolution vs 4x4 pool).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from device.landmarks import DlibReader
from training.face.models import Centre, L2Normalize, PadChannels
from training.teacher import EMBEDDING_SIZE

CHIP = 150  # dlib's chip side (input_rgb_image_sized<150>)
# (blocks, filters) per level, input side first; the first block of every level but the first one downsamples.
LEVELS = ((3, 32), (4, 64), (3, 128), (3, 256), (1, 256))
CONVOLUTIONS = 1 + 2 * sum(blocks for blocks, _ in LEVELS)  # 29


@dataclass
class Conv:
    kernel: np.ndarray  # (rows, cols, in, out): Keras layout
    bias: np.ndarray
    stride: int
    padding: int | str  # dlib's zero padding on every side; "same" (Keras') only in students cut from it (slim.py)


@dataclass
class DlibResnet:
    """The parameters of dlib's face ResNet, affine layers already folded into their convolutions."""

    convs: list[Conv]
    dense: np.ndarray  # (256, 128)
    channel_means: tuple[float, float, float]  # R, G, B subtracted by dlib's input layer (then / 256)
    sha256: str


def _records(data: bytes, name: str) -> list[int]:
    """Offsets just past every serialised string `name` (a layer's version tag) in the file, in file order."""
    tag = bytes([0x01, len(name)]) + name.encode()
    offsets, at = [], data.find(tag)
    while at >= 0:
        offsets.append(at + len(tag))
        at = data.find(tag, at + 1)
    return offsets


def read_dlib_resnet(path: Path) -> DlibResnet:
    """Parse dlib_face_recognition_resnet_model_v1.dat (layers are stored input side first).

    Only the parameters are read, with device.landmarks.DlibReader (dlib's packed integers, floats and tensors); the
    layer order and shapes are checked against the architecture above, so a different network file is refused
    rather than misread.
    """
    data = Path(path).read_bytes()
    inputs = _records(data, "input_rgb_image_sized")
    convs_at, affines_at, fc_at = _records(data, "con_4"), _records(data, "affine_"), _records(data, "fc_2")
    if len(inputs) != 1 or len(convs_at) != CONVOLUTIONS or len(affines_at) != CONVOLUTIONS or len(fc_at) != 1:
        raise ValueError(f"{path} is not dlib's face recognition ResNet v1 (found {len(convs_at)} convolutions, "
                         f"{len(affines_at)} affine layers, {len(fc_at)} fc layers)")

    def reader(at: int) -> DlibReader:
        return DlibReader(data, str(path), "dlib face ResNet", at)

    means = reader(inputs[0]).floats(3)
    convs = []
    for conv_at, affine_at in zip(convs_at, affines_at):
        layer = reader(conv_at)
        params = layer.tensor().reshape(-1)
        filters, rows, cols, stride, _, padding, _ = layer.ints(7)  # stride_x = stride_y and padding_x = _y here
        inputs_n = (params.size - filters) // (filters * rows * cols)
        weights = params[: filters * inputs_n * rows * cols].reshape(filters, inputs_n, rows, cols)
        bias = params[filters * inputs_n * rows * cols :]
        gamma, beta = np.split(reader(affine_at).tensor().reshape(-1), 2)
        convs.append(Conv(kernel=(weights * gamma[:, None, None, None]).transpose(2, 3, 1, 0),
                          bias=bias * gamma + beta, stride=stride, padding=padding))
    fc = reader(fc_at[0])
    outputs, fc_inputs = fc.ints(2)
    dense = fc.tensor()
    if dense.shape[:2] != (fc_inputs, outputs) or outputs != EMBEDDING_SIZE:
        raise ValueError(f"{path}: unexpected fc layer {dense.shape}")
    return DlibResnet(convs, dense.reshape(fc_inputs, outputs), (float(means[0]), float(means[1]), float(means[2])),
                      hashlib.sha256(data).hexdigest())


def _conv(x: Any, conv: Conv, name: str) -> Any:
    """dlib's con: zero padding `padding` on every side. Its only paddings here are 0 and, for 3x3 at stride 1, 1,
    which is Keras' "same" (a separate ZeroPadding2D before the convolution would be equivalent, but TensorFlow's
    oneDNN fusion of pad + convolution crashed graph-mode predict in about one process in three). A student cut
    from it for a small chip may also ask for "same" at stride 2 (slim.py)."""
    kernel = conv.kernel.shape[0]
    if conv.padding == "same":
        padding = "same"
    elif conv.padding == 0:
        padding = "valid"
    elif conv.stride == 1 and kernel % 2 == 1 and conv.padding == kernel // 2:
        padding = "same"
    else:
        raise ValueError(f"{name}: padding {conv.padding} for a {kernel}x{kernel} convolution at stride {conv.stride} "
                         "is not in dlib's face ResNet")
    layer = layers.Conv2D(conv.kernel.shape[-1], conv.kernel.shape[:2], strides=conv.stride, padding=padding,
                          name=name)
    y = layer(x)
    layer.set_weights([conv.kernel, conv.bias])
    return y


def _add_prev(a: Any, b: Any, name: str) -> Any:
    """a + b, each zero-extended at the end of rows, columns and channels to the larger shape (dlib's add_prev)."""
    rows, cols, depth = (max(int(a.shape[i]), int(b.shape[i])) for i in (1, 2, 3))
    grown = []
    for i, t in enumerate((a, b)):
        if (int(t.shape[1]), int(t.shape[2])) != (rows, cols):
            t = layers.ZeroPadding2D(((0, rows - int(t.shape[1])), (0, cols - int(t.shape[2]))),
                                     name=f"{name}_grow{i}")(t)
        if int(t.shape[3]) != depth:
            t = PadChannels(depth - int(t.shape[3]), name=f"{name}_deepen{i}")(t)
        grown.append(t)
    return layers.Add(name=name)(grown)


def resnet_body(x: Any, net: DlibResnet) -> Any:
    """dlib's network from its normalised RGB input ((pixel - channel mean) / 256; dlib's chip is 150x150, a student
    cut from it may take less) to the 128-D output."""
    convs = iter(net.convs)
    x = layers.ReLU(name="stem_relu")(_conv(x, next(convs), "stem"))
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_pool")(x)
    for level, (blocks, _) in enumerate(LEVELS):
        for block in range(blocks):
            name = f"l{level}b{block}"
            first, second = next(convs), next(convs)
            y = layers.ReLU(name=f"{name}_relu1")(_conv(x, first, f"{name}_conv1"))
            y = _conv(y, second, f"{name}_conv2")
            shortcut = x
            if first.stride != 1:
                shortcut = layers.AveragePooling2D(2, strides=2, padding="valid", name=f"{name}_pool")(x)
            x = layers.ReLU(name=f"{name}_relu")(_add_prev(y, shortcut, f"{name}_add"))
    x = layers.GlobalAveragePooling2D(name="average")(x)
    dense = layers.Dense(EMBEDDING_SIZE, use_bias=False, name="fc")
    x = dense(x)
    dense.set_weights([net.dense])
    return x


def chip_model(net: DlibResnet) -> keras.Model:
    """The network on dlib's own normalised 150x150 RGB chips (for checking the port against dlib)."""
    inputs = keras.Input((CHIP, CHIP, 3))
    return keras.Model(inputs, resnet_body(inputs, net), name="dlib_resnet_chip")


@dataclass(frozen=True)
class Framing:
    """Where the 150x150 chip is cut from the 128x128 crop: a square of `side` px at (`top`, `left`)."""

    top: int
    left: int
    side: int

    def check(self, crop: int = 128) -> None:
        if self.side < 1 or self.top < 0 or self.left < 0 or max(self.top, self.left) + self.side > crop:
            raise ValueError(f"framing {self} does not fit inside a {crop}x{crop} crop")


def grey_embedder(net: DlibResnet, framing: Framing | None, crop: int = 128, chip: int = CHIP,
                  centre: np.ndarray | None = None) -> keras.Model:
    """Grey input normalised as device.face.FACE_SPEC ((pixel / 127.5) - 1) → unit 128-D embedding.

    framing=None: the input is already an aligned `chip` x `chip` chip (device.face.Aligner makes it; dlib's network
    takes 150, a student cut from it may take less). Otherwise the input is a `crop`-sized crop and the chip is one
    fixed square of it, cut and resized inside the model (two int8 ops). Either way the grey level becomes dlib's
    three normalised channels by a 1x1 convolution set to ((x + 1) * 127.5 - mean_c) / 256 (a student trains it
    along with the rest; the ported network is never trained). With `centre` (a
    student's: the teacher's mean embedding on the training chips) the unit output is moved off that mean and
    normalised again, which is the centred target the student learns (train.centred says why).
    """
    if framing is None:
        x = inputs = keras.Input((chip, chip, 1))
    else:
        framing.check(crop)
        inputs = keras.Input((crop, crop, 1))
        bottom, right = crop - framing.top - framing.side, crop - framing.left - framing.side
        x = layers.Cropping2D(((framing.top, bottom), (framing.left, right)), name="chip_crop")(inputs)
        if framing.side != CHIP:
            x = layers.Resizing(CHIP, CHIP, interpolation="bilinear", name="chip_resize")(x)
    to_rgb = layers.Conv2D(3, 1, name="grey_to_dlib_rgb")
    x = to_rgb(x)
    to_rgb.set_weights([np.full((1, 1, 1, 3), 127.5 / 256, np.float32),
                        np.array([(127.5 - m) / 256 for m in net.channel_means], np.float32)])
    x = resnet_body(x, net)
    if centre is not None:
        x = L2Normalize(name="teacher_direction")(x)
        shift = Centre(name="centre")
        x = shift(x)
        shift.set_weights([np.asarray(centre, np.float32)])
    outputs = L2Normalize(name="embedding")(x)
    return keras.Model(inputs, outputs, name="dlib_resnet" if centre is None else "dlib_resnet_slim")


# Without landmarks (--no-align), the fixed square of the 128 crop taken as the chip. Chosen on the validation people
# (training/DECISIONS.md, 2026-12-02): of six squares around the mean dlib chip on LFW crops (centre 64.6, 75.2; side
# 127.6, which overhangs the crop's bottom by 11 px), the chip's top and left edges cut off at the crop's bottom scored
# best (balanced accuracy 96.81%; the whole crop 93.78%; aligned chips, the default: 98.27%).
FRAMING = Framing(top=11, left=5, side=117)
WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_DAT = "shape_predictor_5_face_landmarks.dat"
WEIGHTS_MISSING = ("dlib's face ResNet and 5-point landmark models come from the PyPI package "
                   "face_recognition_models (host extra: pip install .[host])")


def find_model_file(name: str) -> Path:
    """A model file inside the installed face_recognition_models package, located without importing it (its
    __init__ needs pkg_resources, which setuptools >= 81 no longer has)."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found; {WEIGHTS_MISSING}")


def find_weights() -> Path:
    return find_model_file(WEIGHTS_FILE)


def build(out: Path, weights: Path | None = None, align: bool = True) -> Path:
    """Write the ported embedder as a training run (model.keras + train_info.json) for `converter face`.

    align=True (the shipped model): the model takes dlib's aligned 150x150 chip, and the converter ships dlib's
    5-point landmark model in the bundle for the device to align with. align=False: it takes the 128 crop and
    cuts FRAMING from it (no landmarks on the device; 1.5 pp less accurate on the validation people).
    """
    from training.common import count_macs, save_run, toolchain_versions

    path = Path(weights) if weights else find_weights()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {WEIGHTS_MISSING}")
    net = read_dlib_resnet(path)
    model = grey_embedder(net, None if align else FRAMING)
    info = {"task": "face", "arch": "dlib-resnet", "recipe": "ported from dlib (no training)",
            "parameters": int(model.count_params()), "macs": count_macs(model),
            "source": {"file": WEIGHTS_FILE, "sha256": net.sha256, "package": "face_recognition_models",
                       "license": "public domain (dlib's model files)",
                       "trained_on": "dlib's ~3M faces of ~7.5k people, not LFW's identities (per dlib's author); "
                                     "aligned 150x150 chips"},
            "input": "aligned-chip" if align else "crop",
            "framing": None if align else {**vars(FRAMING), "chip": CHIP, "crop": 128},
            "toolchain": toolchain_versions()}
    return save_run(Path(out), model, {}, info)
