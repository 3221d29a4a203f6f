"""Frozen-feature cache: hits, misses, invalidation, corrupt files, bypass, and exactness.

That training runs reuse the cache across jobs is checked on a real sweep in test_sweep.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import Process, tiny_cfg

from transferlab.feature_cache import FeatureCache, FeatureKey, manifest_digest
from transferlab.locks import computing_alone
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.paths import StagePaths
from transferlab.pipeline import make_dataset

IMAGE_SIZE = 64


class CountingExtractor:
    """A tiny Keras feature extractor that counts its forward passes over a dataset."""

    def __init__(self, seed: int = 0) -> None:
        import keras

        inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
        x = keras.layers.Conv2D(4, 3, strides=4, kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
        outputs = keras.layers.GlobalAveragePooling2D()(x)
        self.model = keras.Model(inputs, outputs)
        self.calls = 0

    def predict(self, *args: object, **kwargs: object) -> np.ndarray:
        self.calls += 1
        return self.model.predict(*args, **kwargs)

    @property
    def digest(self) -> str:
        from transferlab.model import weights_digest

        return weights_digest(self.model)


def train_manifest(paths: StagePaths) -> Manifest:
    classes = load_classes(paths.classes)
    return load_manifest(paths.manifest("train"), paths.raw_dataset("synthetic"), classes)


def key_for(extractor: CountingExtractor, manifest: Manifest) -> FeatureKey:
    return FeatureKey("test_backbone", None, extractor.digest, IMAGE_SIZE, manifest_digest(manifest))


def features(cache: FeatureCache, extractor: CountingExtractor, manifest: Manifest) -> tuple[np.ndarray, bool]:
    found = cache.activations_for(
        key_for(extractor, manifest), extractor, manifest, image_size=IMAGE_SIZE, batch_size=8
    )
    assert found.labels.tolist() == list(manifest.labels) and found.views == 1
    return found.arrays[0][0], found.hit


# Another process asking for the features of `train_manifest` through `CountingExtractor()`.
ASKER = """
import json, logging, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_feature_cache import CountingExtractor, features, train_manifest
from transferlab.feature_cache import FeatureCache
from transferlab.paths import StagePaths
logging.basicConfig(level=logging.INFO, format="%(message)s")
paths = StagePaths(Path({root!r}))
extractor = CountingExtractor()
found, hit = features(FeatureCache(paths.feature_cache), extractor, train_manifest(paths))
print(json.dumps({{"hit": hit, "passes": extractor.calls, "first": float(found.flat[0])}}), flush=True)
"""


def test_second_request_is_a_hit_and_equals_a_fresh_forward_pass(prepared_project: StagePaths) -> None:
    manifest, extractor = train_manifest(prepared_project), CountingExtractor()
    cache = FeatureCache(prepared_project.feature_cache)

    first, hit = features(cache, extractor, manifest)
    assert not hit and extractor.calls == 1
    stored = cache.path(key_for(extractor, manifest))
    mtime = stored.stat().st_mtime_ns

    second, hit = features(cache, extractor, manifest)
    assert hit and extractor.calls == 1, "a hit must not run the backbone"
    assert stored.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, second)

    dataset = make_dataset(manifest, image_size=IMAGE_SIZE, batch_size=8, cache=False).map(lambda x, y: x)
    np.testing.assert_allclose(second, extractor.model.predict(dataset, verbose=0), rtol=1e-5, atol=1e-6)


def test_changed_image_or_label_is_a_miss(prepared_project: StagePaths) -> None:
    from PIL import Image

    manifest, extractor = train_manifest(prepared_project), CountingExtractor()
    cache = FeatureCache(prepared_project.feature_cache)
    features(cache, extractor, manifest)
    before = manifest_digest(manifest)

    image = manifest.raw_root / manifest.paths[0]
    Image.new("RGB", (96, 96), (250, 0, 250)).save(image, format="JPEG")
    changed = train_manifest(prepared_project)
    assert manifest_digest(changed) != before
    _, hit = features(cache, extractor, changed)
    assert not hit and extractor.calls == 2

    relabelled = Manifest(
        changed.raw_root, changed.paths, (1 - changed.labels[0], *changed.labels[1:]), changed.classes
    )
    assert manifest_digest(relabelled) != manifest_digest(changed)
    _, hit = features(cache, extractor, relabelled)
    assert not hit and extractor.calls == 3
    assert len(list(prepared_project.feature_cache.glob("*.npz"))) == 3


def test_other_backbone_weights_are_a_miss(prepared_project: StagePaths) -> None:
    manifest = train_manifest(prepared_project)
    cache = FeatureCache(prepared_project.feature_cache)
    a, b = CountingExtractor(seed=1), CountingExtractor(seed=2)
    assert a.digest != b.digest
    features(cache, a, manifest)
    _, hit = features(cache, b, manifest)
    assert not hit and b.calls == 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_file_is_rebuilt_not_trusted(
    prepared_project: StagePaths, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, extractor = train_manifest(prepared_project), CountingExtractor()
    cache = FeatureCache(prepared_project.feature_cache)
    good, _ = features(cache, extractor, manifest)
    path = cache.path(key_for(extractor, manifest))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00not a zip" * 50}[damage])

    with caplog.at_level(logging.INFO, logger="transferlab.feature_cache"):  # rebuilt: nothing to act on
        rebuilt, hit = features(cache, extractor, manifest)
    assert not hit and extractor.calls == 2
    assert "unreadable" in caplog.text
    np.testing.assert_allclose(rebuilt, good, rtol=1e-5, atol=1e-6)
    assert cache.load(key_for(extractor, manifest), len(manifest)) is not None, "the rebuilt file must be valid"


def test_file_stored_for_another_key_is_stale(prepared_project: StagePaths, caplog: pytest.LogCaptureFixture) -> None:
    manifest = train_manifest(prepared_project)
    cache = FeatureCache(prepared_project.feature_cache)
    a, b = CountingExtractor(seed=1), CountingExtractor(seed=2)
    features(cache, a, manifest)
    # A file under b's name holding a's features (a renamed or half-migrated cache).
    shutil.copy(cache.path(key_for(a, manifest)), cache.path(key_for(b, manifest)))
    with caplog.at_level(logging.INFO, logger="transferlab.feature_cache"):  # rebuilt: nothing to act on
        _, hit = features(cache, b, manifest)
    assert not hit and b.calls == 1
    assert "does not match its key" in caplog.text


def test_file_with_wrong_row_count_is_stale(prepared_project: StagePaths) -> None:
    manifest, extractor = train_manifest(prepared_project), CountingExtractor()
    cache = FeatureCache(prepared_project.feature_cache)
    values, _ = features(cache, extractor, manifest)
    key = key_for(extractor, manifest)
    cache.store(key, [values[None, :-1]], np.asarray(manifest.labels[:-1], dtype="int32"))
    assert cache.load(key, len(manifest)) is None


@pytest.mark.parametrize(
    ("overrides", "sources"),
    [
        pytest.param((), [("pool", 3)], id="defaults-three-cached-flipped-views-at-three-squares"),
        pytest.param(("augment=none", "augment.crops=3", "augment.cached_views=3"), [("pool", 3)], id="squares-alone"),
        pytest.param(("augment.cached_views=0",), [("images", 1)], id="fresh-flips-of-central-squares"),
        pytest.param(("augment=none",), [("pool", 1)], id="frozen-no-augmentation"),
        pytest.param(("augment=light", "augment.cached_views=0"), [("images", 1)], id="fresh-augmentation"),
        pytest.param(("augment=light",), [("pool", 10)], id="cached-augmented-views"),
        pytest.param(("augment=none", "finetune.unfreeze=20"), [("cut", 1)], id="unfrozen-top-from-the-start"),
        pytest.param(("finetune.unfreeze=all",), [("images", 1)], id="everything-unfrozen"),
        pytest.param(("augment=none", "finetune=top20"), [("pool", 1), ("cut", 1)], id="head-then-finetune"),
        pytest.param(
            ("finetune=top20", "augment=light", "augment.cached_views=0"),
            [("images", 1), ("images", 1)],
            id="finetune-fresh-aug",
        ),
        pytest.param(
            ("finetune=top20", "augment=light", "augment.cached_views=3"), [("pool", 3), ("cut", 3)], id="views-at-cut"
        ),
        pytest.param(("train.feature_cache=false",), [("images", 1)], id="switched-off"),
    ],
)
def test_each_phase_is_fed_the_cheapest_exact_way(overrides: tuple[str, ...], sources: list[tuple[str, int]]) -> None:
    from transferlab.trainer import plan_phases

    assert [(phase.source, phase.views) for phase in plan_phases(tiny_cfg(*overrides))] == sources


def test_a_process_asking_while_another_computes_waits_and_reads_its_features(
    prepared_project: StagePaths, tmp_path: Path
) -> None:
    """Two processes of a parallel sweep want the same features at once: the second waits for the
    first, then reads what it stored instead of running the backbone itself."""
    import keras

    keras.backend.clear_session()  # layer names as in a fresh process: they are part of the weights digest
    manifest, extractor = train_manifest(prepared_project), CountingExtractor()
    cache = FeatureCache(prepared_project.feature_cache)
    key = key_for(extractor, manifest)
    asker_script = ASKER.format(tests=str(Path(__file__).parent), root=str(prepared_project.root))
    with computing_alone(cache.lock_path(key), "the features"):  # this process is computing them
        asker = Process(["python", "-c", asker_script], tmp_path)
        asker.wait_for(rf"waiting for pid {os.getpid()} on .*, which is computing pooled .* of {len(manifest)} ")
        marked = np.full((1, len(manifest), 4), 7.0, dtype=np.float32)  # not what a pass would give
        cache.store(key, [marked], np.asarray(manifest.labels, dtype=np.int32))
    assert asker.finish() == 0, asker.output
    assert json.loads(asker.lines[-1]) == {"hit": True, "passes": 0, "first": 7.0}
    assert "computed meanwhile by another process" in asker.output
