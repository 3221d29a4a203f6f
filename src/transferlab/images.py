"""Image files to pixels: the checks of the split stage and the one decode of every model input.

- `MAX_IMAGE_PIXELS`: the one limit on an image's size, checked from its header (`open_image`,
  `first_oversized`) before anything decodes it: in split, the training pipeline, predict and
  serving alike.
- `check_image` / `check_images` (Pillow): does a file fully decode as an image the input
  pipeline can read? The split stage keeps unreadable files out of the manifests with them.
- `decode_and_resize` (TensorFlow, graph-safe): encoded bytes -> the central square, resized,
  as uint8 RGB (or, for a model with test-time crops, several squares along the long side:
  `square_positions`). The training pipeline, evaluate, predict and the served model all call
  it, so what a model sees at serving time is bit-for-bit what it saw in training.
  `decode_image_bytes` is its eager form, with a Pillow fallback for formats TensorFlow
  cannot read (WebP, TIFF...); Pillow reads a JPEG first, so a damaged one fails with a
  message rather than libjpeg's lines on file descriptor 2.
TensorFlow is imported only inside the decode functions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from transferlab.errors import first_line

if TYPE_CHECKING:
    import tensorflow as tf

# Formats `tf.io.decode_image` reads (MPO is the multi-picture JPEG some cameras write).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP"})
# Formats TensorFlow decodes with libjpeg, which writes what it finds wrong in damaged data
# ("Corrupt JPEG data: ...") straight to file descriptor 2.
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_ACCEPTED = "JPEG, PNG, GIF, BMP"
# Names the pixels `resize_to_square` makes: part of every feature-cache key, so a change of
# the decode never reuses features computed by the old one.
DECODE = "central-square-bilinear-antialias"
# Where a square sits along a photo's long side: 0 at its start (left or top), 1 at its end.
CENTRE = 0.5
CENTRAL = (CENTRE,)
# Width x height of the largest image any stage decodes (64 megapixels; about 200 MB as RGB).
# A 250 KB PNG can declare 16000 x 16000 pixels, 768 MB once decoded: the header is checked first.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# Pillow's own decompression-bomb check (a warning above 89 MP, an error above 179 MP) gives way
# to `open_image`, which applies MAX_IMAGE_PIXELS everywhere and names the declared size.
Image.MAX_IMAGE_PIXELS = None


class ImageTooLargeError(ValueError):
    """An image declares more than MAX_IMAGE_PIXELS pixels."""


def open_image(source: Path | IO[bytes]) -> Image.Image:
    """Open an image with Pillow, reading only its header; `ImageTooLargeError` above MAX_IMAGE_PIXELS.

    Every image transferlab reads goes through here (or `first_oversized`) before it is decoded.
    """
    image = Image.open(source)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise ImageTooLargeError(
            f"image is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
            f"({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}): resize it"
        )
    return image


def thumbnail(path: Path, size: int) -> np.ndarray:
    """The central square of an image, `size` pixels a side, as RGB uint8: for figures, by Pillow
    alone (a JPEG is decoded at the smallest scale that still covers the square)."""
    with open_image(path) as image:
        image.draft("RGB", (size, size))
        square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
        return np.asarray(square, dtype=np.uint8)


def first_oversized(paths: Sequence[str | Path], *, workers: int | None = None) -> tuple[str, str] | None:
    """The first file (in order) whose header declares more than MAX_IMAGE_PIXELS, and why.

    Files that are not readable images at all are left to the decoder to report.
    """
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        for path, problem in zip(paths, pool.map(_size_problem, paths), strict=True):
            if problem is not None:
                return str(path), problem
    return None


def _size_problem(path: str | Path) -> str | None:
    try:
        with open_image(Path(path)):
            return None
    except ImageTooLargeError as exc:
        return str(exc)
    except Exception:  # unreadable: the decoder reports it
        return None


def is_hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, .ipynb_checkpoints, editor swap files)."""
    return name.startswith(".")


def check_image(path: Path) -> str | None:
    """None when `path` decodes completely as a supported image, else why it does not.

    `verify()` checks the structure without decoding pixels; a second open and `load()`
    decodes them, which is what catches truncated files. Grayscale, CMYK, palette and alpha
    images pass: the input pipeline converts them to RGB.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with open_image(path) as image:
            if image.format not in SUPPORTED_FORMATS:
                return f"unsupported image format {image.format} (accepted: {_ACCEPTED})"
            if image.format == "BMP" and (problem := _bmp_problem(path, image.mode)):
                return problem
            image.verify()
        with open_image(path) as image:
            _decode_small(image)
    except UnidentifiedImageError:
        return f"not an image ({_ACCEPTED} accepted)"
    except ImageTooLargeError as exc:
        return f"too large to decode safely: {exc}"
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...) on bad data
        return _corrupt(exc)
    return None


def _corrupt(exc: Exception) -> str:
    """Why a file that claims an image format does not decode, as split and predict both say it."""
    return f"corrupt or truncated: {first_line(exc)}"


def _decode_small(image: Image.Image) -> None:
    """Decode every pixel of `image`, a JPEG at 1/8 scale: every compressed byte is still read, so
    truncation and damage show (Pillow raises; it keeps libjpeg's messages off the terminal)."""
    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


def check_images(paths: Sequence[Path], *, workers: int | None = None) -> list[str | None]:
    """`check_image` for many files, in order, on a thread pool (Pillow decodes without the GIL).

    The progress bar shows only when stderr is a terminal.
    """
    if not paths:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(paths), desc="checking images", unit="img", disable=None) as bar,
    ):
        results = []
        for reason in pool.map(check_image, paths):
            results.append(reason)
            bar.update()
    return results


def _bmp_problem(path: Path, mode: str) -> str | None:
    """TensorFlow's BMP decoder reads 24- and 32-bit pixels, and 8-bit ones as gray levels."""
    with path.open("rb") as f:
        header = f.read(30)
    header_size = int.from_bytes(header[14:18], "little")
    bits = int.from_bytes(header[24:26] if header_size == 12 else header[28:30], "little")
    if bits in (24, 32) or (bits == 8 and mode == "L"):
        return None
    kind = "8-bit palette" if bits == 8 else f"{bits}-bit"
    return f"{kind} BMP is not readable by the input pipeline (save it as 24-bit BMP, PNG or JPEG)"


def square_positions(crops: int) -> tuple[float, ...]:
    """Where a model with `crops` test-time crops takes its squares: the central one alone, or
    `crops` squares spread evenly from one end of the long side to the other (3: start, centre, end)."""
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    return CENTRAL if crops == 1 else tuple(i / (crops - 1) for i in range(crops))


def input_shape(image_size: int, crops: int) -> tuple[int, ...]:
    """One photo's model input: (size, size, 3), or (crops, size, size, 3) with test-time crops."""
    square = (image_size, image_size, 3)
    return square if crops == 1 else (crops, *square)


def test_time_views(crops: int, flip: bool) -> list[tuple[float, bool]]:
    """(position, mirrored) of every view a saved model averages, in the order it runs them:
    each square of `square_positions(crops)`, and after each its mirror image when `flip`."""
    mirrors = (False, True) if flip else (False,)
    return [(position, mirrored) for position in square_positions(crops) for mirrored in mirrors]


def resize_to_square(image: tf.Tensor, image_size: int, position: float = CENTRE) -> tf.Tensor:
    """(h, w, 3) pixels -> (size, size, 3) uint8: a square as wide as the short side, at `position`
    along the long side (0.5: the central square), resized bilinearly with antialiasing and
    rounded to whole pixel values.

    Cropping keeps the aspect ratio (a squashed flower is not what ImageNet features were
    learned on); antialiasing keeps the downscaling of large photos from aliasing. Both were
    chosen by the study in the README ("How the defaults were chosen").
    """
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)

    def offset(extent: tf.Tensor) -> tf.Tensor:
        # position 0.5 gives (extent - side) // 2, the central square's offset, exactly
        return tf.cast(tf.math.floor(tf.cast(extent - side, tf.float32) * position), tf.int32)

    square = tf.image.crop_to_bounding_box(image, offset(height), offset(width), side, side)
    resized = tf.image.resize(square, [image_size, image_size], method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def resize_to_squares(image: tf.Tensor, image_size: int, positions: Sequence[float] = CENTRAL) -> tf.Tensor:
    """`resize_to_square` at each of `positions`: (size, size, 3) for one, (n, size, size, 3) for several."""
    import tensorflow as tf

    if len(positions) == 1:
        return resize_to_square(image, image_size, positions[0])
    return tf.stack([resize_to_square(image, image_size, position) for position in positions])


def decode_and_resize(data: tf.Tensor, image_size: int, positions: Sequence[float] = CENTRAL) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> (size, size, 3) uint8 RGB (grayscale, CMYK, alpha converted);
    (n, size, size, 3) for several `positions`."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return resize_to_squares(image, image_size, positions)


def decode_image_bytes(data: bytes, image_size: int, positions: Sequence[float] = CENTRAL) -> np.ndarray:
    """Image file bytes -> (size, size, 3) float32 RGB in [0, 255] ((n, size, size, 3) for several `positions`).

    `ValueError` if unreadable, `ImageTooLargeError` (a ValueError) if the header declares more than
    MAX_IMAGE_PIXELS: then nothing is decoded.
    """
    import tensorflow as tf

    _check_readable(data)
    try:
        pixels = decode_and_resize(tf.constant(data), image_size, positions)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
        pixels = resize_to_squares(tf.constant(_decode_with_pillow(data)), image_size, positions)
    return pixels.numpy().astype(np.float32)


def _check_readable(data: bytes) -> None:
    """The header (its declared size), and for a JPEG every pixel, read by Pillow first: a damaged
    JPEG is reported in the split stage's words, without libjpeg's messages on the terminal."""
    if not data:
        raise ValueError("empty file")
    try:
        with open_image(io.BytesIO(data)) as image:
            if image.format in JPEG_FORMATS:
                _decode_small(image)
    except UnidentifiedImageError as exc:  # predict reads any format Pillow reads, not only split's
        raise ValueError("not an image (no format Pillow can read)") from exc
    except ImageTooLargeError:
        raise
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise ValueError(_corrupt(exc)) from exc


def _decode_with_pillow(data: bytes) -> np.ndarray:
    try:
        with open_image(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ValueError(_corrupt(exc)) from exc
