"""Frozen-feature cache: backbone features computed once, reused by every epoch and sweep job.

With the backbone frozen and no augmentation, the backbone's output for an image never
changes, so training the head on cached pooled features is exact and skips the expensive
forward pass. Files are keyed by everything the features depend on (backbone, alpha, weight
values, image size, preprocessing, manifest contents), written atomically, and verified on
read: a corrupt or stale file is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab import atomic
from transferlab.console import keras_progress
from transferlab.manifests import Manifest
from transferlab.pipeline import make_dataset

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines the features of one split."""

    backbone: str
    alpha: float | None
    weights_digest: str
    image_size: int
    manifest_digest: str

    @property
    def digest(self) -> str:
        payload = json.dumps({**self.__dict__, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def manifest_digest(manifest: Manifest) -> str:
    """Digest of a split's file list, labels and the files' sizes and modification times."""
    digest = hashlib.sha256()
    for rel, label in zip(manifest.paths, manifest.labels, strict=True):
        stat = (manifest.raw_root / rel).stat()
        digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class FeatureCache:
    """A folder of `<key>.npz` files, each the pooled features and labels of one split."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: FeatureKey) -> Path:
        return self.directory / f"{key.digest}.npz"

    def load(self, key: FeatureKey, expected_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Cached (features, labels), or None when absent, corrupt or not matching `key`."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = json.loads(str(data["key"]))
                features, labels = data["features"], data["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            log.info("feature cache %s is unreadable (%s): rebuilding", path.name, exc)
            return None
        if stored_key != key.__dict__ or features.shape[0] != expected_rows or labels.shape != (expected_rows,):
            log.info("feature cache %s does not match its key: rebuilding", path.name)
            return None
        return features, labels

    def store(self, key: FeatureKey, features: np.ndarray, labels: np.ndarray) -> None:
        """Write atomically: a temp file in the same folder, renamed when complete."""
        atomic.write_file(
            self.path(key),
            lambda tmp: np.savez(tmp, features=features, labels=labels, key=json.dumps(key.__dict__)),
        )

    def features_for(
        self,
        key: FeatureKey,
        extractor: keras.Model,
        manifest: Manifest,
        image_size: int,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """(features, labels, hit): from the cache, or computed in one streaming pass and stored."""
        cached = self.load(key, len(manifest))
        if cached is not None:
            return (*cached, True)
        log.info("computing backbone features for %d images (cached for later runs)", len(manifest))
        dataset = make_dataset(manifest, image_size=image_size, batch_size=batch_size, cache=False)
        with keras_progress("backbone features") as progress:
            features = extractor.predict(dataset.map(lambda x, y: x), verbose=0, callbacks=[progress])
        features = features.astype("float32")
        labels = np.asarray(manifest.labels, dtype="int32")
        self.store(key, features, labels)
        return features, labels, False
