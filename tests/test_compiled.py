"""Frozen forward passes on a TensorFlow Lite copy: the same activations as Keras, converted once,
every output in Keras's order, and Keras again whenever the copy cannot be trusted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import Process

from transferlab import compiled
from transferlab.compiled import CompiledModels
from transferlab.config import ModelConfig, TrainConfig
from transferlab.cut import split_at_cut
from transferlab.feature_cache import FeatureCache, FeatureKey
from transferlab.locks import computing_alone
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.model import Classifier, build_classifier, first_trainable_layer, weights_digest
from transferlab.paths import StagePaths
from transferlab.pipeline import make_dataset

IMAGE_SIZE = 64
# MobileNetV2's depthwise convolutions and residual additions, with random weights (no download).
MOBILENET = ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=None)
# Where the network does not matter: the offline CNN, a few times quicker to convert.
SMALL_CNN = ModelConfig(backbone="small_cnn", weights=None)


# Another process asking for the copy under ASKED_KEY.
ASKED_KEY = {"test": "one copy"}
ASKER = """
import logging, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_compiled import ASKED_KEY, SMALL_CNN, classifier
from transferlab.compiled import CompiledModels
logging.basicConfig(level=logging.INFO, format="%(message)s")
copy = CompiledModels(Path({folder!r})).get(classifier(SMALL_CNN).features, ASKED_KEY)
print("got a copy" if copy is not None else "no copy", flush=True)
"""


def train_manifest(paths: StagePaths) -> Manifest:
    return load_manifest(paths.manifest("train"), paths.raw_dataset("synthetic"), load_classes(paths.classes))


def classifier(model: ModelConfig = MOBILENET) -> Classifier:
    return build_classifier(model, 3, IMAGE_SIZE, seed=0)


def activations(
    cache: FeatureCache, extractor: object, manifest: Manifest, tensor: str = "pool", views: int = 1
) -> list[np.ndarray]:
    key = FeatureKey.of_split(MOBILENET, weights_digest(extractor), IMAGE_SIZE, manifest, tensor=tensor)
    found = cache.activations_for(key, extractor, manifest, image_size=IMAGE_SIZE, batch_size=5, views=views)
    return [array[0] for array in found.arrays]


def keras_outputs(extractor: object, manifest: Manifest) -> list[np.ndarray]:
    dataset = make_dataset(manifest, image_size=IMAGE_SIZE, batch_size=5, cache=False).map(lambda x, y: x)
    outputs = extractor.predict(dataset, verbose=0)
    return outputs if isinstance(outputs, list) else [outputs]


def compiled_cache(paths: StagePaths) -> FeatureCache:
    return FeatureCache.of_project(paths, TrainConfig())


@pytest.fixture(autouse=True)
def new_process() -> None:
    """Each test starts as a new process would: no copy loaded or refused yet."""
    compiled._LOADED.clear()


def test_pooled_features_match_keras_and_the_copy_is_converted_once(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, model = train_manifest(prepared_project), classifier()
    assert len(manifest) % 5, "a last, smaller batch must go through the copy too"
    with caplog.at_level(logging.INFO, logger="transferlab"):
        (pooled,) = activations(compiled_cache(prepared_project), model.features, manifest)
    assert "converting the frozen part to TensorFlow Lite" in caplog.text
    assert "TensorFlow Lite copy matches Keras" in caplog.text
    assert len(list(prepared_project.compiled_models.glob("*.tflite"))) == 1
    (expected,) = keras_outputs(model.features, manifest)
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))

    # Another process (a fresh cache object), other images: the copy on disk is used, not converted again.
    caplog.clear()
    for path in prepared_project.feature_cache.glob("*.npz"):
        path.unlink()
    with caplog.at_level(logging.INFO, logger="transferlab"):
        compiled._LOADED.clear()
        (again,) = activations(compiled_cache(prepared_project), model.features, manifest)
    assert "converting" not in caplog.text
    np.testing.assert_array_equal(again, pooled)


def test_every_tensor_at_a_residual_cut_comes_back_in_keras_order(prepared_project: StagePaths) -> None:
    model = classifier()
    cuts = (split_at_cut(model, first_trainable_layer(model.backbone, n)) for n in range(4, 80))
    cut = next(c for c in cuts if len(c.bottom.outputs) >= 2 and len({t.shape for t in c.bottom.outputs}) >= 2)
    manifest = train_manifest(prepared_project)

    got = activations(compiled_cache(prepared_project), cut.bottom, manifest, tensor=cut.name)
    expected = keras_outputs(cut.bottom, manifest)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


@pytest.mark.parametrize("damage", ["not a flatbuffer", "one weight byte changed"])
def test_a_corrupt_copy_is_converted_again(
    damage: str, prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)
    (first,) = activations(compiled_cache(prepared_project), model.features, manifest)
    (copy,) = prepared_project.compiled_models.glob("*.tflite")
    if damage == "not a flatbuffer":
        copy.write_bytes(b"not a flatbuffer")
    else:  # still loads, computes something else: only its checksum tells
        flatbuffer = bytearray(copy.read_bytes())
        flatbuffer[len(flatbuffer) // 2] ^= 0x40
        copy.write_bytes(bytes(flatbuffer))
    compiled._LOADED.clear()
    for path in prepared_project.feature_cache.glob("*.npz"):
        path.unlink()

    with caplog.at_level(logging.INFO, logger="transferlab"):
        (second,) = activations(compiled_cache(prepared_project), model.features, manifest)
    assert "is unreadable" in caplog.text and "converting the frozen part" in caplog.text
    np.testing.assert_array_equal(second, first)
    assert copy.read_bytes()[4:8] == b"TFL3", "the copy on disk is a TFLite flatbuffer again"


@pytest.mark.parametrize("fault", ["conversion fails", "the copy disagrees"])
def test_keras_runs_the_pass_when_the_copy_cannot_be_trusted(
    fault: str, prepared_project: StagePaths, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if fault == "conversion fails":

        def broken(model: object) -> bytes:
            raise RuntimeError("converter: unsupported op\nloc(...): a long MLIR dump")

        monkeypatch.setattr(compiled, "to_tflite", broken)
    else:
        monkeypatch.setattr(compiled, "TOLERANCE", -1.0)  # no difference is small enough
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)

    with caplog.at_level(logging.INFO, logger="transferlab"):
        (pooled,) = activations(compiled_cache(prepared_project), model.features, manifest)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("transferlab")
    ]
    assert len(warnings) == 1 and "Keras runs the frozen part" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert not list(prepared_project.compiled_models.glob("*.tflite")), "nothing untrusted is kept"
    (expected,) = keras_outputs(model.features, manifest)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    key = FeatureKey.of_split(MOBILENET, weights_digest(model.features), IMAGE_SIZE, manifest)
    assert FeatureCache(prepared_project.feature_cache).path(key).is_file(), "cached as Keras's activations"


def test_frozen_forward_keras_converts_nothing(prepared_project: StagePaths) -> None:
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)
    cache = FeatureCache.of_project(prepared_project, TrainConfig(frozen_forward="keras"))
    assert cache.compiled is None
    (pooled,) = activations(cache, model.features, manifest)
    assert not prepared_project.compiled_models.exists()
    (expected,) = keras_outputs(model.features, manifest)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_each_engine_has_its_own_cached_activations(prepared_project: StagePaths) -> None:
    """The two engines agree to float32 rounding only: a run never trains on the other's numbers."""
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)
    key = FeatureKey.of_split(MOBILENET, weights_digest(model.features), IMAGE_SIZE, manifest)
    keras_cache = FeatureCache.of_project(prepared_project, TrainConfig(frozen_forward="keras"))
    activations(keras_cache, model.features, manifest)
    assert keras_cache.holds(key) and keras_cache.path(key).is_file()

    found = compiled_cache(prepared_project).activations_for(
        key, model.features, manifest, image_size=IMAGE_SIZE, batch_size=5
    )
    assert not found.hit, "Keras's activations are not the TFLite copy's"
    assert len(list(prepared_project.feature_cache.glob("*.npz"))) == 2
    again = compiled_cache(prepared_project).activations_for(
        key, model.features, manifest, image_size=IMAGE_SIZE, batch_size=5
    )
    assert again.hit
    np.testing.assert_array_equal(again.arrays[0][0], found.arrays[0][0])


def test_the_key_covers_the_model_not_the_images(tmp_path: object) -> None:
    models = CompiledModels(tmp_path)  # type: ignore[arg-type]
    key = {"backbone": "mobilenet_v2", "weights_digest": "a", "image_size": 64, "tensor": "pool"}
    assert models.key_digest(key) == models.key_digest(dict(key))
    for change in ({"weights_digest": "b"}, {"image_size": 96}, {"tensor": "cut:block_5_add"}):
        assert models.key_digest({**key, **change}) != models.key_digest(key)


def test_a_frozen_part_that_cannot_be_converted_is_tried_once_per_process(
    prepared_project: StagePaths, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = []

    def broken(model: object) -> bytes:
        attempts.append(model)
        raise compiled.ConversionError("'tf.Svd' op is neither a custom op nor a flex op")

    monkeypatch.setattr(compiled, "to_tflite", broken)
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)
    with caplog.at_level(logging.INFO, logger="transferlab"):
        for _ in range(3):  # train, evaluate, the next sweep job: each its own cache object
            for path in prepared_project.feature_cache.glob("*.npz"):
                path.unlink()
            activations(compiled_cache(prepared_project), model.features, manifest)
    assert len(attempts) == 1
    assert caplog.text.count("TensorFlow Lite conversion failed") == 1
    assert caplog.text.count("with Keras (no TensorFlow Lite copy could be made)") == 3


def test_a_copy_that_cannot_be_kept_still_serves_its_run(
    prepared_project: StagePaths, caplog: pytest.LogCaptureFixture
) -> None:
    prepared_project.compiled_models.parent.mkdir(parents=True, exist_ok=True)
    prepared_project.compiled_models.write_text("a file where the folder should be\n")  # writes fail
    manifest, model = train_manifest(prepared_project), classifier(SMALL_CNN)
    with caplog.at_level(logging.INFO, logger="transferlab"):
        (pooled,) = activations(compiled_cache(prepared_project), model.features, manifest)
    assert "cannot keep the TensorFlow Lite copy" in caplog.text
    assert "with a TensorFlow Lite copy of the frozen part" in caplog.text
    (expected,) = keras_outputs(model.features, manifest)
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_the_probe_check_holds_for_tiny_activations() -> None:
    """Random-init networks have activations far below 1: each output is judged on its own scale."""
    model = classifier()
    probe = model.features(compiled._probe_batch(model.features), training=False)
    assert 0 < float(np.abs(probe).max()) < 1e-3, "the point: activations far below 1"
    zeros = compiled.disagreement(model.features, lambda batch: [np.zeros((len(batch), probe.shape[-1]))])
    assert zeros > compiled.TOLERANCE
    exact = compiled.disagreement(model.features, lambda batch: [np.asarray(model.features(batch, training=False))])
    assert exact == 0.0


def test_a_process_asking_while_another_converts_waits_and_loads_its_copy(
    prepared_project: StagePaths, tmp_path: Path
) -> None:
    """The first jobs of a parallel sweep each converted the backbone (tens of seconds each)."""
    models = CompiledModels(prepared_project.compiled_models)
    digest = models.key_digest(ASKED_KEY)
    asker_script = ASKER.format(tests=str(Path(__file__).parent), folder=str(prepared_project.compiled_models))
    with computing_alone(models.lock_path(digest), "the copy"):  # this process is converting it
        asker = Process(["python", "-c", asker_script], tmp_path)
        asker.wait_for(rf"waiting for pid {os.getpid()} on .*, which is computing a TensorFlow Lite copy")
        assert models._compile(classifier(SMALL_CNN).features, models.path(digest)) is not None
    assert asker.finish() == 0, asker.output
    assert asker.lines[-1] == "got a copy\n"
    assert "converting" not in asker.output, "the asker converted the backbone too"
