"""`transferlab predict`: top-k classes for image files and folders, from a trained `.keras` model
or from an export (SavedModel folder, `.tflite` file), which brings its own class names.

Images are decoded exactly as the training pipeline decodes them (`images.decode_and_resize`),
with a Pillow fallback for formats TensorFlow cannot read (WebP, TIFF...). A file that neither
can read is reported on its own; the rest are still predicted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferlab import inference
from transferlab.errors import DataError
from transferlab.inference import load_image_batch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# Images decoded and scored per model call, so a folder of any size fits in memory.
CHUNK = 64


def collect_images(inputs: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given, folders expanded (recursively, image suffixes only, sorted)."""
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                errors.append((item, "folder holds no image files"))
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            errors.append((item, "no such file or folder"))
    return files, errors


@dataclass(frozen=True)
class Predictor:
    """A trained model or an export, ready to predict: input size, class names, pixels -> probabilities
    (and how many squares of each photo it takes: `images.square_positions`)."""

    image_size: int
    classes: list[str]
    probabilities: Callable[[np.ndarray], np.ndarray]
    crops: int = 1


def find_classes(model_path: Path, num_classes: int) -> list[str]:
    """Class names for a model's outputs (see `inference.find_classes`), else `class_<i>` with a warning."""
    classes = inference.find_classes(model_path, num_classes)
    if classes is None:
        log.warning("no classes.json matches %s; labels are class indices", model_path)
        return [f"class_{i}" for i in range(num_classes)]
    return classes


def load_predictor(path: Path) -> Predictor:
    """A `.keras` model, a SavedModel folder or a `.tflite` file; exports bring their own class names."""
    from transferlab.export import is_export, load_export

    if is_export(path):
        exported = load_export(path)
        probe = exported.probabilities(np.zeros((1, *exported.image_shape), np.float32))
        classes = exported.classes or find_classes(path, int(probe.shape[-1]))
        return Predictor(exported.image_size, classes, exported.probabilities, exported.crops)
    model = inference.load_model(path)
    classes = find_classes(path, int(model.output_shape[-1]))
    return Predictor(
        inference.model_image_size(model),
        classes,
        lambda pixels: inference.predict_pixels(model, pixels),
        inference.model_crops(model),
    )


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (label, probability) pairs, most probable first."""
    k = min(k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probabilities, order, strict=True)]


def predict_files(predictor: Predictor, files: Sequence[Path], k: int) -> list[dict[str, Any]]:
    """One result per file in order: `{"file", "predictions": [{"label", "probability"}]}` or `{"file", "error"}`."""
    classes = predictor.classes
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start : start + CHUNK]
        batch = load_image_batch(chunk, predictor.image_size, predictor.crops)
        probabilities = predictor.probabilities(batch.pixels) if len(batch.paths) else np.zeros((0, len(classes)))
        ranked = dict(zip(batch.paths, top_k_labels(np.asarray(probabilities), classes, k), strict=True))
        failed = dict(batch.errors)
        for path in chunk:
            if path in ranked:
                predictions = [{"label": label, "probability": p} for label, p in ranked[path]]
                results.append({"file": str(path), "predictions": predictions})
            else:
                results.append({"file": str(path), "error": failed[path]})
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """`file  rank  label  probability` rows; the file name is printed on its first row only."""
    rows = [("file", "rank", "label", "probability")]
    for result in results:
        for rank, pred in enumerate(result.get("predictions", []), start=1):
            rows.append((result["file"] if rank == 1 else "", str(rank), pred["label"], f"{pred['probability']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def predict_command(model_path: Path, inputs: Sequence[Path], top_k: int, as_json: bool) -> int:
    """Print top-k predictions (stdout); unreadable inputs are logged (stderr) one line each.

    Exit status 0 if at least one image was predicted, else 1.
    """
    if top_k < 1:
        raise DataError(f"--top-k must be >= 1, got {top_k}")
    files, missing = collect_images(inputs)
    predictor = load_predictor(model_path)
    results = [{"file": str(path), "error": reason} for path, reason in missing]
    results += predict_files(predictor, files, top_k) if files else []
    failures = [r for r in results if "error" in r]
    for failure in failures:
        log.warning("cannot predict %s: %s", failure["file"], failure["error"])
    predicted = len(results) - len(failures)
    if as_json:
        print(json.dumps(results, indent=2))
    elif predicted:
        print(format_table([r for r in results if "predictions" in r]))
    if not predicted:
        log.error("nothing could be predicted")
        return 1
    return 0
