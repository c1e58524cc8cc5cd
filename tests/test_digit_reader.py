"""The digit reader on real digits presented as photos and scans, and on bad input.

The "photos" are real MNIST test digits re-rendered the way a phone photo of a written digit
looks (dark ink on light paper, larger, off-centre, uneven lighting, noise, JPEG): the reader
must undo all of that to reach the MNIST framing the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from device.digits import DigitReader
from device.images import ImageError
from device.preprocess import NoDigitError, mnist_style
from training.datasets.mnist import load_mnist

N_PHOTOS = 300


@pytest.fixture(scope="module")
def reader(models_dir: Path) -> DigitReader:
    return DigitReader.from_bundle(models_dir / "digits")


@pytest.fixture(scope="module")
def mnist_test(data_dir: Path):
    data = load_mnist(data_dir)
    return data.x_test, data.y_test


def as_photo(digit: np.ndarray, rng: np.random.Generator, dark_on_light: bool) -> np.ndarray:
    """A 28x28 MNIST digit → a ~150 px BGR 'photo' with margins, gradient lighting and sensor noise."""
    size = int(rng.integers(90, 160))
    big = cv2.resize(digit, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    height, width = size + int(rng.integers(20, 80)), size + int(rng.integers(20, 80))
    canvas = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
    canvas[top : top + size, left : left + size] = big
    if dark_on_light:
        paper = 200 + 40 * np.linspace(0, 1, width)[np.newaxis, :]  # light falls off across the page
        canvas = paper - canvas * 0.7
    else:
        canvas = 30 + canvas * 0.8
    canvas += rng.normal(0, 6, canvas.shape)
    return cv2.cvtColor(np.clip(canvas, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


@pytest.mark.parametrize("dark_on_light", [True, False], ids=["ink-on-paper", "chalk-on-board"])
def test_reads_real_digits_rendered_as_photos(reader: DigitReader, mnist_test, tmp_path: Path,
                                              dark_on_light: bool) -> None:
    x, y = mnist_test
    rng = np.random.default_rng(7)
    picks = rng.choice(len(x), N_PHOTOS, replace=False)
    right = 0
    for i in picks:
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), as_photo(x[i], rng, dark_on_light), [cv2.IMWRITE_JPEG_QUALITY, 85])
        right += reader.read(path).digit == y[i]
    assert right / N_PHOTOS >= 0.97


def test_mnist_framing_is_kept_for_images_already_in_mnist_format(reader: DigitReader, mnist_test) -> None:
    x, y = mnist_test
    reads = [reader.read(x[i]).digit for i in range(1000)]
    assert np.mean(np.array(reads) == y[:1000]) >= 0.985


def test_result_has_confidence_and_ranked_top_k(reader: DigitReader, mnist_test) -> None:
    x, y = mnist_test
    result = reader.read(x[0], k=5)
    assert result.digit == y[0] and result.top_k[0] == (result.digit, result.confidence)
    probs = [p for _, p in result.top_k]
    assert len(result.top_k) == 5 and probs == sorted(probs, reverse=True) and 0 < result.confidence <= 1


def test_blank_and_flat_images_are_not_digits() -> None:
    with pytest.raises(NoDigitError, match="no digit found"):
        mnist_style(np.full((100, 80), 255, np.uint8))
    with pytest.raises(NoDigitError):
        mnist_style(np.random.default_rng(0).integers(120, 126, (64, 64), dtype=np.uint8))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"", "file is empty"), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
     (b"hello, I am a text file", "not a readable image")],
    ids=["missing", "empty", "truncated-png", "text"],
)
def test_bad_files_give_clear_errors(reader: DigitReader, tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "input.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        reader.read(path)


def test_cli_reads_images_and_reports_bad_ones_without_traceback(mnist_test, tmp_path: Path) -> None:
    x, y = mnist_test
    good = tmp_path / "seven.png"
    cv2.imwrite(str(good), 255 - x[0])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = run_cli("-m", "device", "read-digit", str(good), str(tmp_path / "broken.jpg"), "--json")
    assert result.returncode == 1  # one image failed
    assert f'"digit": {y[0]}' in result.stdout
    assert "broken.jpg: error: " in result.stderr and "Traceback" not in result.stderr
    assert run_cli("-m", "device", "read-digit", "--help").returncode == 0
    for option in (["--top", "0"], ["--threads", "-1"]):  # were an IndexError and a "not a usable model" message
        bad = run_cli("-m", "device", "read-digit", str(good), *option)
        assert bad.returncode == 2 and "must be 1 or more" in bad.stderr and "Traceback" not in bad.stderr
