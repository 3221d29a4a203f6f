"""images.py: the one decode of every model input, identical in training, predict and serving."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import damaged_jpeg, declared_png
from PIL import Image

from transferlab.errors import DataError
from transferlab.images import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    ImageTooLargeError,
    check_image,
    decode_image_bytes,
    first_oversized,
    open_image,
    square_positions,
    thumbnail,
)

RED = (230, 20, 20)


def _noise(path: Path, size: tuple[int, int] = (70, 50)) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("name", ["noise.jpg", "noise.png"])
def test_training_predict_and_serving_see_identical_pixels(tmp_path: Path, name: str) -> None:
    """The same file through the training pipeline, `transferlab predict` and the served model."""
    from transferlab.inference import load_image_batch
    from transferlab.manifests import Manifest
    from transferlab.pipeline import make_dataset
    from transferlab.serving import ImageClassifierModel

    (tmp_path / "cls").mkdir()
    path = _noise(tmp_path / "cls" / name)
    manifest = Manifest(tmp_path, (f"cls/{name}",), (0,), ("cls", "other"))
    training = next(iter(make_dataset(manifest, image_size=64, batch_size=1)))[0].numpy()[0]
    predicted = load_image_batch([path], 64).pixels[0]
    served_model = ImageClassifierModel()
    served_model.image_size = 64
    served = served_model._decode(base64.b64encode(path.read_bytes()).decode(), row=0)

    assert training.shape == (64, 64, 3) and training.dtype == np.float32
    np.testing.assert_array_equal(training, predicted)
    np.testing.assert_array_equal(training, served)


def test_decode_converts_grayscale_and_alpha_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (10, 10), 200).save(tmp_path / "grey.png")
    Image.new("RGBA", (10, 10), (10, 20, 30, 128)).save(tmp_path / "alpha.png")
    assert decode_image_bytes((tmp_path / "grey.png").read_bytes(), 16).shape == (16, 16, 3)
    assert decode_image_bytes((tmp_path / "alpha.png").read_bytes(), 16)[0, 0].tolist() == [10, 20, 30]


def test_decode_falls_back_to_pillow_for_formats_tensorflow_lacks(tmp_path: Path) -> None:
    Image.new("RGB", (12, 12), RED).save(tmp_path / "red.tiff")
    pixels = decode_image_bytes((tmp_path / "red.tiff").read_bytes(), 8)
    assert pixels[4, 4].tolist() == list(RED)


def test_unreadable_bytes_raise_value_error_in_the_split_stages_words() -> None:
    with pytest.raises(ValueError, match=r"^not an image \(no format Pillow can read\)$"):
        decode_image_bytes(b"\x00\x01 not an image", 8)
    with pytest.raises(ValueError, match=r"^empty file$"):
        decode_image_bytes(b"", 8)


def test_a_damaged_jpeg_is_refused_without_libjpeg_messages(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """New-user report: predict printed libjpeg's "Corrupt JPEG data: ..." lines (C code, file
    descriptor 2) before its own warning; Pillow reads the JPEG first, as the split stage does."""
    damaged = damaged_jpeg(tmp_path / "damaged.jpg")
    reason = check_image(damaged)
    assert reason is not None and reason.startswith("corrupt or truncated: ")
    with pytest.raises(ValueError) as refused:
        decode_image_bytes(damaged.read_bytes(), 16)
    assert str(refused.value) == reason, "predict says what split says"
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("landscape", [True, False])
def test_decode_keeps_the_central_square(tmp_path: Path, landscape: bool) -> None:
    """A 3:1 photo keeps its middle third whole, not the whole photo squashed to a square."""
    thirds = np.zeros((30, 90, 3), dtype=np.uint8)
    thirds[:, :30], thirds[:, 30:60], thirds[:, 60:] = RED, (20, 20, 230), (20, 230, 20)
    Image.fromarray(thirds if landscape else thirds.transpose(1, 0, 2)).save(tmp_path / "thirds.png")
    pixels = decode_image_bytes((tmp_path / "thirds.png").read_bytes(), 16)
    assert np.all(pixels == (20, 20, 230)), "only the blue middle third is left"


@pytest.mark.parametrize("landscape", [True, False])
def test_test_time_crops_take_squares_from_one_end_of_the_long_side_to_the_other(
    tmp_path: Path, landscape: bool
) -> None:
    """3 crops of a 3:1 photo are its three thirds, in order (left to right, top to bottom), and
    the middle one is the central square every other model sees."""
    thirds = np.zeros((30, 90, 3), dtype=np.uint8)
    thirds[:, :30], thirds[:, 30:60], thirds[:, 60:] = RED, (20, 20, 230), (20, 230, 20)
    Image.fromarray(thirds if landscape else thirds.transpose(1, 0, 2)).save(tmp_path / "thirds.png")
    data = (tmp_path / "thirds.png").read_bytes()
    assert square_positions(1) == (0.5,) and square_positions(3) == (0.0, 0.5, 1.0) and square_positions(2) == (0, 1)
    squares = decode_image_bytes(data, 16, square_positions(3))
    assert squares.shape == (3, 16, 16, 3)
    for square, colour in zip(squares, [RED, (20, 20, 230), (20, 230, 20)], strict=True):
        assert np.all(square == colour)
    np.testing.assert_array_equal(squares[1], decode_image_bytes(data, 16))
    with pytest.raises(ValueError, match="crops must be >= 1"):
        square_positions(0)


def test_training_predict_and_serving_see_identical_squares_with_test_time_crops(tmp_path: Path) -> None:
    """A model with 3 test-time crops gets the same stack of squares from evaluate's pipeline,
    `transferlab predict` and the served model."""
    from transferlab.inference import load_image_batch
    from transferlab.manifests import Manifest
    from transferlab.pipeline import make_dataset
    from transferlab.serving import ImageClassifierModel

    (tmp_path / "cls").mkdir()
    path = _noise(tmp_path / "cls" / "noise.jpg", size=(90, 50))
    manifest = Manifest(tmp_path, ("cls/noise.jpg",), (0,), ("cls", "other"))
    positions = square_positions(3)
    dataset = make_dataset(manifest, image_size=32, batch_size=1, positions=positions)
    evaluated = next(iter(dataset))[0].numpy()[0]
    predicted = load_image_batch([path], 32, crops=3).pixels[0]
    served_model = ImageClassifierModel()
    served_model.image_size, served_model.positions = 32, positions
    served = served_model._decode(base64.b64encode(path.read_bytes()).decode(), row=0)

    assert evaluated.shape == (3, 32, 32, 3) and not np.array_equal(evaluated[0], evaluated[2])
    np.testing.assert_array_equal(evaluated, predicted)
    np.testing.assert_array_equal(evaluated, served)
    assert load_image_batch([tmp_path / "missing.jpg"], 32, crops=3).pixels.shape == (0, 3, 32, 32, 3)


def test_thumbnail_is_the_central_square(tmp_path: Path) -> None:
    """A 300x100 photo: red, then green in the middle third, then blue; its thumbnail is green."""
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100, 0] = pixels[:, 100:200, 1] = pixels[:, 200:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "strip.png")
    square = thumbnail(tmp_path / "strip.png", 20)
    assert square.shape == (20, 20, 3) and square.dtype == np.uint8
    assert (square[2:-2, 2:-2] == (0, 255, 0)).all()


def test_downscaling_is_antialiased(tmp_path: Path) -> None:
    """A checkerboard of 3-pixel squares shrunk to 8 px averages to grey; without antialiasing
    bilinear sampling hits whole squares and returns pure black and white."""
    checkerboard = ((np.indices((60, 60)) // 3).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checkerboard] * 3, axis=-1)).save(tmp_path / "checks.png")
    pixels = decode_image_bytes((tmp_path / "checks.png").read_bytes(), 8)
    assert np.all(np.abs(pixels - 127.5) <= 3)


def test_one_pixel_limit_read_from_the_header(tmp_path: Path) -> None:
    """Issue 12: a 32 KB PNG declaring 16000 x 16000 pixels was decoded (768 MB) by predict and serving."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(declared_png(16000, 16000))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError, match=r"image is 16000x16000 pixels, over the limit of 67,108,864"):
        decode_image_bytes(bomb.read_bytes(), 64)
    reason = check_image(bomb)  # the split stage: skipped with this reason in report.json
    assert reason is not None and reason.startswith("too large to decode safely: image is 16000x16000 pixels")
    assert MAX_IMAGE_PIXELS == MAX_IMAGE_SIDE**2
    with open_image(io.BytesIO(declared_png(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))) as image:  # the limit itself is fine
        assert image.size == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE)
    with pytest.raises(ImageTooLargeError):
        open_image(io.BytesIO(declared_png(MAX_IMAGE_SIDE + 1, MAX_IMAGE_SIDE)))
    ok = _noise(tmp_path / "ok.png")
    assert first_oversized([ok, tmp_path / "missing.png", bomb, ok]) == (str(bomb), reason.split(": ", 1)[1])
    assert first_oversized([ok]) is None


def test_training_pipeline_refuses_an_oversized_image_before_decoding(tmp_path: Path) -> None:
    """A file replaced after the split (which would have skipped it) stops training with one line."""
    from transferlab.manifests import Manifest
    from transferlab.pipeline import make_dataset

    (tmp_path / "cls").mkdir()
    _noise(tmp_path / "cls" / "ok.png")
    (tmp_path / "cls" / "bomb.png").write_bytes(declared_png(16000, 16000))
    manifest = Manifest(tmp_path, ("cls/ok.png", "cls/bomb.png"), (0, 0), ("cls", "other"))
    with pytest.raises(DataError, match=r"bomb\.png: image is 16000x16000 pixels.*run `dvc repro split`"):
        make_dataset(manifest, image_size=64, batch_size=2)
