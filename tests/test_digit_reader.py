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


def paper(height: int, width: int, rng: np.random.Generator, level: float = 215.0, noise: float = 4.0,
          texture: float = 6.0) -> np.ndarray:
    """A sheet of paper as a phone sees it: light falling off across it, blotchy fibre texture, sensor noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    page = level + 25 * (np.cos(angle) * x / width + np.sin(angle) * y / height)
    blotches = cv2.GaussianBlur(rng.normal(0, 1, (height // 16, width // 16)).astype(np.float32), (0, 0), 1.5)
    blotches = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    page += blotches * (texture / (blotches.std() + 1e-6)) + rng.normal(0, noise, (height, width))
    return page


def write_on(page: np.ndarray, digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A real MNIST digit, `size` px tall, written in dark ink somewhere on the page (a float array)."""
    big = np.clip(cv2.resize(digit, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32), 0, 255)
    top, left = int(rng.integers(0, page.shape[0] - size)), int(rng.integers(0, page.shape[1] - size))
    page[top : top + size, left : left + size] -= big * 0.75
    return page


def as_jpeg(image: np.ndarray) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def accuracy(reader: DigitReader, mnist_test, make, count: int, seed: int) -> float:
    """Share of `count` real MNIST test digits read right, each made into a photo by `make(digit, rng)`."""
    x, y = mnist_test
    rng = np.random.default_rng(seed)
    right = 0
    for i in rng.choice(len(x), count, replace=False):
        try:
            right += reader.read(as_jpeg(make(x[i], rng))).digit == y[i]
        except NoDigitError:
            pass
    return right / count


# The photos below are the framing's job, not the model's: the model reads 99.4% of MNIST and each photo is one
# MNIST digit, so with 40 digits a bar of 0.95 leaves room for two misreads (a hard digit, the rendering) while a
# framing that fails one photo in ten fails it. Before these fixes they read 0.0 (large page) and 0.05 (desk).
N_LARGE = 40


def test_reads_small_digits_on_large_photos(reader: DigitReader, mnist_test) -> None:
    """A 120-220 px digit on a 1600x1200 page covers well under 0.5% of the pixels; it was refused as blank when
    the contrast peak was the 99.5th percentile, and misread when the polarity came from the border vs the mean."""
    def make(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return write_on(paper(1200, 1600, rng), digit, int(rng.integers(120, 220)), rng)

    assert accuracy(reader, mnist_test, make, N_LARGE, seed=11) >= 0.95


def test_reads_a_digit_on_a_12_megapixel_photo(reader: DigitReader, mnist_test) -> None:
    x, y = mnist_test
    rng = np.random.default_rng(12)
    assert reader.read(as_jpeg(write_on(paper(3000, 4000, rng), x[0], 500, rng))).digit == y[0]


def test_reads_a_sheet_lying_on_a_dark_desk(reader: DigitReader, mnist_test) -> None:
    """The paper does not fill the frame: a dark, textured desk shows around it (20-150 px). Polarity taken from
    the frame's border made the sheet the 'ink' and read, e.g., a 7 as an 8 without complaint."""
    def make(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size, margin = int(rng.integers(120, 260)), int(rng.integers(20, 150))
        sheet = write_on(paper(size + int(rng.integers(100, 240)), size + int(rng.integers(80, 200)), rng, noise=0),
                         digit, size, rng)
        height, width = sheet.shape[0] + 2 * margin, sheet.shape[1] + 2 * margin
        wood = cv2.resize(rng.normal(0, 8, (height // 8, width // 8)).astype(np.float32), (width, height))
        photo = 45 + wood
        photo[margin : margin + sheet.shape[0], margin : margin + sheet.shape[1]] = sheet
        return photo + rng.normal(0, 4, photo.shape)

    assert accuracy(reader, mnist_test, make, N_LARGE, seed=13) >= 0.95


def test_reads_light_digits_on_a_large_dark_board(reader: DigitReader, mnist_test) -> None:
    """Light on dark must still read once photos are framed differently: chalk on a board, unevenly lit; and
    dark on light when the digit fills the frame (inverted MNIST, 10x)."""
    def make(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        board = 45 + 15 * np.linspace(-1, 1, 1600, dtype=np.float32)[np.newaxis, :] + rng.normal(0, 6, (1200, 1600))
        size = int(rng.integers(150, 350))
        top, left = int(rng.integers(0, 1200 - size)), int(rng.integers(0, 1600 - size))
        board[top : top + size, left : left + size] += cv2.resize(digit, (size, size)).astype(np.float32) * 0.7
        return board

    assert accuracy(reader, mnist_test, make, 20, seed=14) >= 0.95
    x, y = mnist_test
    inverted = [255 - cv2.resize(digit, (280, 280), interpolation=cv2.INTER_CUBIC) for digit in x[:20]]
    assert np.mean([reader.read(d).digit == label for d, label in zip(inverted, y[:20])]) >= 0.95  # and the reverse


@pytest.mark.parametrize(
    "make",
    [lambda rng: paper(1200, 1600, rng, noise=8),
     lambda rng: paper(1200, 1600, rng, noise=0, texture=10),
     lambda rng: np.where(rng.random((1200, 1600)) < 0.001, 0.0, paper(1200, 1600, rng)),
     lambda rng: np.pad(paper(600, 450, rng, noise=0), 80, constant_values=45) + rng.normal(0, 4, (760, 610))],
    ids=["noisy-page", "textured-page", "dust-specks", "blank-sheet-on-desk"],
)
def test_blank_photos_are_still_refused(make) -> None:
    """Finding small digits on large pages must not turn noise, paper texture or dust into a digit."""
    with pytest.raises(NoDigitError, match="no digit found"):
        mnist_style(as_jpeg(make(np.random.default_rng(5))))


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


def test_bold_light_digits_on_a_dark_board_are_not_taken_for_a_sheet(reader: DigitReader) -> None:
    """Review finding: a bold white digit (55 px strokes) filling a tight 400x600 photo passed the sheet-on-a-desk
    test, and the reader then read its holes: 0123456789 came out as 0123450720, without an error. The digits
    are rendered with OpenCV's Hershey font, as in the report; a sheet must fill its rotated box like a page."""
    rng = np.random.default_rng(0)
    read = []
    for digit in range(10):
        mask = np.zeros((600, 400), np.uint8)
        (tw, th), _ = cv2.getTextSize(str(digit), cv2.FONT_HERSHEY_SIMPLEX, 14, 55)
        cv2.putText(mask, str(digit), (200 - tw // 2, 300 + th // 2), cv2.FONT_HERSHEY_SIMPLEX, 14, 255, 55,
                    cv2.LINE_AA)
        photo = np.clip(30 + 0.8 * mask + rng.normal(0, 4, mask.shape), 0, 255).astype(np.uint8)
        read.append(reader.read(photo).digit)
    assert read == list(range(10))


@pytest.mark.parametrize("top", [0.5, 0.6, 0.8])
def test_reads_a_sheet_photographed_at_a_slant(reader: DigitReader, mnist_test, top: float) -> None:
    """Review finding: the sheet check wanted a sheet to fill 85% of its rotated box, which a trapezoid whose top
    edge is under ~0.7 of its bottom does not: the whole keystoned sheet was then read as ink. MNIST test digits
    drawn dark on a trapezoid sheet lying on a dark desk."""
    from device.preprocess import _kth_largest

    images, labels = mnist_test
    right = 0
    for i in range(10):
        desk = np.full((600, 800), 60, np.uint8)
        corners = np.array([[400 - 280 * top, 100], [400 + 280 * top, 100], [680, 560], [120, 560]], np.int32)
        cv2.fillPoly(desk, [corners], 200)
        digit = cv2.resize(images[i], (160, 160), interpolation=cv2.INTER_LINEAR)
        region = desk[260:420, 320:480]
        desk[260:420, 320:480] = np.minimum(region, 255 - digit)
        right += reader.read(desk).digit == labels[i]
    assert right >= 9
    assert _kth_largest(np.full((10, 10), 200, np.uint8), 1) == 200.0  # uint8 input must not wrap when scaled
