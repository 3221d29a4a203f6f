"""`transferlab predict`: top-k classes for image files and folders.

Images are decoded exactly as the training pipeline decodes them (`images.decode_and_resize`),
with a Pillow fallback for formats TensorFlow cannot read (WebP, TIFF...). A file that neither
can read is reported on its own; the rest are still predicted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferlab.errors import DataError
from transferlab.inference import load_image_batch, load_model, model_image_size

if TYPE_CHECKING:
    import keras

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


def find_classes(model_path: Path, num_classes: int) -> list[str]:
    """Class names for a model's outputs: `classes.json` beside it, or the project's splits."""
    from transferlab.manifests import load_classes

    model_dir = model_path.resolve().parent
    candidates = [
        model_dir / "classes.json",
        model_dir.parent / "data" / "splits" / "classes.json",
        Path.cwd() / "data" / "splits" / "classes.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            try:
                classes = load_classes(candidate)
            except DataError:
                continue
            if len(classes) == num_classes:
                return classes
            log.warning("%s lists %d classes but the model has %d outputs", candidate, len(classes), num_classes)
    log.warning("no classes.json matches %s; labels are class indices", model_path)
    return [f"class_{i}" for i in range(num_classes)]


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (label, probability) pairs, most probable first."""
    k = min(k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probabilities, order, strict=True)]


def predict_files(model: keras.Model, classes: Sequence[str], files: Sequence[Path], k: int) -> list[dict[str, Any]]:
    """One result per file in order: `{"file", "predictions": [{"label", "probability"}]}` or `{"file", "error"}`."""
    image_size = model_image_size(model)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start : start + CHUNK]
        batch = load_image_batch(chunk, image_size)
        probabilities = model.predict(batch.pixels, verbose=0) if len(batch.paths) else np.zeros((0, len(classes)))
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
    model = load_model(model_path)
    num_classes = int(model.output_shape[-1])
    classes = find_classes(model_path, num_classes)
    results = [{"file": str(path), "error": reason} for path, reason in missing]
    results += predict_files(model, classes, files, top_k) if files else []
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
