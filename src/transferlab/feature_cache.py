"""Activation cache: backbone outputs computed once, reused by every epoch and sweep job.

With the backbone (or its bottom part) frozen and BatchNorm in inference mode, its output
for an image is a fixed function of the image, so training only what comes after on cached
activations is exact and skips the expensive forward pass. Two kinds of activations are
cached: the pooled features the head trains on (`tensor="pool"`), and the tensors crossing
the cut of a partially unfrozen backbone (`tensor="cut:<first trainable layer>"`, see cut.py).

With augmentation, the activations of a fixed number of augmented views of every image are
cached (`views`): a fixed sample of augmentations, not fresh ones each epoch. For test-time
flipping and crops, those of every image's mirror image (`augmentation="mirror"`) and of its
squares off the centre (`"square at 0"`, `"square at 1, mirror"`; `test_time_view`).

Files are keyed by everything the activations depend on (backbone, alpha, weight values,
image size, tensor, augmentation, manifest contents, the engine that computed them), written
atomically, and verified on read: a corrupt or stale file is rebuilt, never trusted. On CPU the
passes run on a TensorFlow Lite copy of the frozen part (compiled.py) unless
`train.frozen_forward=keras`. A missing file is computed under a lock of its own
(`locks.computing_alone`): a process that finds another computing it waits, then reads its file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab import atomic
from transferlab.compiled import CompiledModel, CompiledModels, keras_only_reason
from transferlab.config import ModelConfig, TrainConfig
from transferlab.console import keras_progress, logged_progress
from transferlab.images import CENTRAL, CENTRE, DECODE
from transferlab.locks import LOCKS_DIR, computing_alone
from transferlab.manifests import Manifest
from transferlab.pipeline import make_dataset

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from transferlab.paths import StagePaths

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
POOLED = "pool"
NO_AUGMENTATION = "none"
MIRRORED = "mirror"  # every image flipped left to right (test-time flipping)
KERAS = "keras"  # FeatureKey.engine; a TFLite copy's is `tflite_engine()`


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines the cached activations of one split."""

    backbone: str
    alpha: float | None
    weights_digest: str
    image_size: int
    manifest_digest: str
    tensor: str = POOLED
    # a `test_time_view`, or a digest of the augmentation config, seed and view count
    augmentation: str = NO_AUGMENTATION
    # what computed them: Keras, or a TFLite copy of the frozen part (compiled.py) under this
    # TensorFlow's runtime; they agree to float32 rounding, which training can amplify
    engine: str = KERAS

    @classmethod
    def of_split(
        cls,
        model: ModelConfig,
        weights_digest: str,
        image_size: int,
        manifest: Manifest,
        *,
        tensor: str = POOLED,
        augmentation: str = NO_AUGMENTATION,
    ) -> FeatureKey:
        """The key of `manifest`'s activations through `model`'s backbone with the weights of
        `weights_digest`: one place for training, which writes the cache, and evaluate, which reads it."""
        return cls(
            model.backbone,
            model.alpha,
            weights_digest,
            image_size,
            manifest_digest(manifest),
            tensor=tensor,
            augmentation=augmentation,
        )

    @property
    def digest(self) -> str:
        payload = json.dumps({**asdict(self), "format": FORMAT_VERSION, "decode": DECODE}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Activations:
    """Cached activations of one split: one array per tensor, each shaped (views, images, ...)."""

    arrays: list[np.ndarray]
    labels: np.ndarray
    hit: bool

    @property
    def views(self) -> int:
        return int(self.arrays[0].shape[0])


def describe_tensor(tensor: str) -> str:
    """'pooled backbone features' or 'activations at the cut below block_15_expand'."""
    return "pooled backbone features" if tensor == POOLED else f"activations at the cut below {tensor.split(':', 1)[1]}"


def manifest_digest(manifest: Manifest) -> str:
    """Digest of a split's file list, labels and the files' sizes and modification times."""
    digest = hashlib.sha256()
    for rel, label in zip(manifest.paths, manifest.labels, strict=True):
        stat = (manifest.raw_root / rel).stat()
        digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def test_time_view(position: float, mirrored: bool) -> str:
    """The `augmentation` of a key for one view a model scores at test time: the central square
    (`NO_AUGMENTATION`), its mirror image (`MIRRORED`), or another square along the long side
    (`images.square_positions`), mirrored or not."""
    if position == CENTRE:
        return MIRRORED if mirrored else NO_AUGMENTATION
    square = f"square at {position:g}"
    return f"{square}, {MIRRORED}" if mirrored else square


def augmentation_digest(settings: dict[str, object], seed: int, views: int) -> str:
    """The `augmentation` part of a key: what the views were drawn with."""
    payload = json.dumps({"settings": settings, "seed": seed, "views": views}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class FeatureCache:
    """A folder of `<key>.npz` files: the activations and labels of one split each."""

    def __init__(self, directory: Path, compiled: CompiledModels | None = None) -> None:
        self.directory = directory
        self.compiled = compiled  # None: Keras runs every forward pass

    @classmethod
    def of_project(cls, paths: StagePaths, train: TrainConfig) -> FeatureCache:
        """The project's cache, its forward passes run as `train.frozen_forward` says."""
        compiled = CompiledModels(paths.compiled_models) if train.frozen_forward == "tflite" else None
        return cls(paths.feature_cache, compiled)

    def path(self, key: FeatureKey) -> Path:
        return self.directory / f"{key.digest}.npz"

    def lock_path(self, key: FeatureKey) -> Path:
        """The lock a process holds while it computes the activations under `key` (locks.py)."""
        return self.directory / LOCKS_DIR / f"{key.digest}.lock"

    def holds(self, key: FeatureKey) -> bool:
        """Whether activations under `key` are cached, computed by either engine."""
        engines = (KERAS, tflite_engine())
        return any(self.path(dataclasses.replace(key, engine=engine)).is_file() for engine in engines)

    def load(self, key: FeatureKey, expected_rows: int) -> tuple[list[np.ndarray], np.ndarray] | None:
        """Cached (arrays, labels), or None when absent, corrupt or not matching `key`."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = json.loads(str(data["key"]))
                labels = data["labels"]
                arrays = [data[f"array_{i}"] for i in range(int(data["count"]))]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            log.info("feature cache %s is unreadable (%s): rebuilding", path.name, exc)
            return None
        rows_ok = labels.shape == (expected_rows,) and all(a.ndim >= 2 and a.shape[1] == expected_rows for a in arrays)
        if stored_key != asdict(key) or not arrays or not rows_ok:
            log.info("feature cache %s does not match its key: rebuilding", path.name)
            return None
        return arrays, labels

    def store(self, key: FeatureKey, arrays: list[np.ndarray], labels: np.ndarray) -> None:
        """Write atomically: a temp file in the same folder, renamed when complete."""
        named = {f"array_{i}": array for i, array in enumerate(arrays)}

        def write(tmp: Path) -> None:
            np.savez(tmp, labels=labels, key=json.dumps(asdict(key)), count=len(arrays), **named)

        atomic.write_file(self.path(key), write)

    def activations_for(
        self,
        key: FeatureKey,
        extractor: keras.Model,
        manifest: Manifest,
        *,
        image_size: int,
        batch_size: int,
        views: int = 1,
        augmenter: Callable[[], keras.Layer] | None = None,
        positions: Sequence[float] = CENTRAL,
        views_described: str | None = None,
    ) -> Activations:
        """From the cache, or computed in one streaming pass per view (with a progress bar) and stored.

        `augmenter` builds the augmentation layers; without it a view is the image itself. View v
        takes the square at `positions[v % len(positions)]` along each photo's long side (see
        `images.square_positions`). `views_described` names the views in the log ("the mirror images of ").
        """
        rows = len(manifest)
        keras_reason = self._keras_reason(extractor)
        compiled = None
        if keras_reason is None:
            tflite_key = dataclasses.replace(key, engine=tflite_engine())
            cached = self.load(tflite_key, rows)
            if cached is not None:
                return Activations(*cached, hit=True)
            compiled = self._compiled_copy(key, extractor)
            if compiled is None:
                keras_reason = "no TensorFlow Lite copy could be made"
            else:
                key = tflite_key
        if compiled is None:  # Keras computes them, under their own key
            key = dataclasses.replace(key, engine=KERAS)
            cached = self.load(key, rows)
            if cached is not None:
                return Activations(*cached, hit=True)
        if views_described is None:
            squares = f" (at {len(positions)} squares along the long side)" if len(positions) > 1 else ""
            views_described = "" if views == 1 and augmenter is None else f"{views} augmented views{squares} of "
        described = describe_tensor(key.tensor)
        what = f"{described} of {views_described}{rows} images"
        with computing_alone(self.lock_path(key), what) as waited:  # another process may be computing them
            cached = self.load(key, rows) if waited else None
            if cached is not None:
                log.info("%s: computed meanwhile by another process", what)
                return Activations(*cached, hit=True)
            engine = f"Keras ({keras_reason})" if compiled is None else "a TensorFlow Lite copy of the frozen part"
            log.info("computing %s with %s (cached for later runs)", what, engine)
            layers = augmenter() if augmenter is not None else None
            per_view: list[list[np.ndarray]] = []
            for view in range(views):
                dataset = make_dataset(
                    manifest,
                    image_size=image_size,
                    batch_size=batch_size,
                    cache=False,
                    augmenter=layers,
                    positions=(positions[view % len(positions)],),
                )
                images = dataset.map(lambda x, y: x)
                if compiled is None:
                    outputs = _keras_forward(extractor, images, described)
                else:
                    outputs = _compiled_forward(compiled, images, described, math.ceil(rows / batch_size))
                per_view.append([np.asarray(o, dtype="float32") for o in outputs])
            arrays = [np.stack(tensors) for tensors in zip(*per_view, strict=True)]
            labels = np.asarray(manifest.labels, dtype="int32")
            self.store(key, arrays, labels)
        return Activations(arrays, labels, hit=False)

    def _keras_reason(self, extractor: keras.Model) -> str | None:
        """Why Keras computes `extractor`'s activations, or None when a TFLite copy may (see compiled.py)."""
        if self.compiled is None:
            return "train.frozen_forward=keras"
        return keras_only_reason(extractor)

    def _compiled_copy(self, key: FeatureKey, extractor: keras.Model) -> CompiledModel | None:
        """The TFLite copy of `extractor` (converted now, or earlier), or None if none can be made."""
        assert self.compiled is not None
        # The extractor is a function of the key's model part alone: not of the images, their views or the engine.
        model_part = {**asdict(key), "manifest_digest": None, "augmentation": None, "engine": None}
        return self.compiled.get(extractor, model_part)

    def test_time_activations_for(
        self,
        key: FeatureKey,
        extractor: keras.Model,
        manifest: Manifest,
        *,
        image_size: int,
        batch_size: int,
        position: float = CENTRE,
        mirrored: bool = False,
    ) -> Activations:
        """`activations_for` one view a model scores at test time: the square at `position` along
        each photo's long side, or its mirror image, under `key` with that `test_time_view`."""
        from transferlab.layers import MirrorImage

        view = dataclasses.replace(key, augmentation=test_time_view(position, mirrored))
        square = "" if position == CENTRE else f"the squares at {position:g} along the long side of "
        return self.activations_for(
            view,
            extractor,
            manifest,
            image_size=image_size,
            batch_size=batch_size,
            augmenter=MirrorImage if mirrored else None,
            positions=(position,),
            views_described=("the mirror images of " if mirrored else "") + square,
        )


def _keras_forward(extractor: keras.Model, images: tf.data.Dataset, described: str) -> list[np.ndarray]:
    with keras_progress(described) as progress:
        outputs = extractor.predict(images, verbose=0, callbacks=[progress])
    return outputs if isinstance(outputs, list) else [outputs]


def _compiled_forward(
    compiled: CompiledModel, images: tf.data.Dataset, described: str, batches: int
) -> list[np.ndarray]:
    with logged_progress(batches, described, "batch") as bar:
        return compiled.predict(images.as_numpy_iterator(), on_batch=bar.update)


def tflite_engine() -> str:
    """`FeatureKey.engine` of activations computed by a TFLite copy under this TensorFlow's runtime."""
    import tensorflow as tf

    return f"tflite {tf.__version__}"
