"""In-process throughput probes, each run by the driver in its own fresh process.

    python bench/probes.py PHASE --project DIR --params FILE --images DIR --repeats N --result OUT

PHASE is one of:
  scan       the split stage over every image (scan folders, decode-check each file, write manifests)
  pipeline   decode + resize + batch with no model: ours (`make_dataset`) alternating with
             the naive recipe's `image_dataset_from_directory`; then ours' cached epochs
  forward    backbone forward on in-memory tensors (the ceiling) alternating with the same
             forward fed by the input pipeline; each by Keras and by the TFLite copy the
             feature cache computes with (compiled.py)
  train-head | train-frozen | train-top20 | train-all
             training steps on in-memory tensors: the head on cached features; the whole
             model with the backbone frozen, its top 20 layers or all of it unfrozen

Every probe warms up first (graph tracing, file cache), then times `--repeats` rounds and
writes {"metrics": {name: {"unit", "samples", "images"}}, "info": {...}} to `--result`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transferlab.compiled import CompiledModels
from transferlab.config import Config, load_params
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.paths import StagePaths

BATCH_SIZE = 32
# Each timed pipeline repetition reads at least this many images (the set is repeated).
MIN_PIPELINE_IMAGES = 1200
# Each timed forward repetition runs at least this many images.
MIN_FORWARD_IMAGES = 384
# Training-step repetitions are sized from a warm-up to last about this long, within bounds.
TARGET_STEP_SECONDS = 2.0
MIN_TRAIN_STEPS, MAX_TRAIN_STEPS = 3, 2000
UNFREEZE = {"train-frozen": 0, "train-top20": 20, "train-all": "all"}

Metrics = dict[str, dict[str, Any]]


def timed(action: Callable[[], int]) -> float:
    """Images per second of `action`, which returns how many images it processed."""
    started = time.perf_counter()
    images = action()
    return images / (time.perf_counter() - started)


def metric(unit: str, samples: list[float], images: int) -> dict[str, Any]:
    return {"unit": unit, "samples": samples, "images": images}


def all_images(project: Path, name: str) -> Manifest:
    """Every image of the project's train and val splits as one manifest."""
    paths = StagePaths(project)
    classes = load_classes(paths.classes)
    train, val = (load_manifest(paths.manifest(s), paths.raw_dataset(name), classes) for s in ("train", "val"))
    return Manifest(train.raw_root, train.paths + val.paths, train.labels + val.labels, train.classes)


def probe_scan(args: argparse.Namespace, cfg: Config) -> tuple[Metrics, dict[str, Any]]:
    from transferlab.stages.split import split

    paths = StagePaths(args.project)
    samples, files = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        report = split(cfg, paths)  # rewrites the project's splits with identical content
        files = report["totals"]["images"] + report["totals"]["skipped"]
        samples.append(files / (time.perf_counter() - started))
    return {"split_scan": metric("img/s", samples, files)}, {"files": files}


def probe_pipeline(args: argparse.Namespace, cfg: Config) -> tuple[Metrics, dict[str, Any]]:
    import keras

    from transferlab.pipeline import make_dataset

    size = cfg.image_size
    manifest = all_images(args.project, cfg.data.name)
    passes = max(1, math.ceil(MIN_PIPELINE_IMAGES / len(manifest)))

    def drain(dataset: Any) -> int:
        count = 0
        for _ in range(passes):
            for images, _labels in dataset:
                count += int(images.shape[0])
        return count

    def ours() -> int:
        return drain(make_dataset(manifest, image_size=size, batch_size=BATCH_SIZE, cache=False))

    def naive() -> int:
        ds = keras.utils.image_dataset_from_directory(
            args.images,
            image_size=(size, size),
            batch_size=BATCH_SIZE,
            label_mode="categorical",
            seed=123,
            verbose=False,
        )
        return drain(ds)

    ours(), naive()  # warm-up
    samples: dict[str, list[float]] = {"pipeline_ours": [], "pipeline_naive": []}
    for _ in range(args.repeats):
        samples["pipeline_ours"].append(timed(ours))
        samples["pipeline_naive"].append(timed(naive))
    cached = make_dataset(manifest, image_size=size, batch_size=BATCH_SIZE, cache=True)
    drain(cached)  # fills the in-memory cache, as the first epoch does
    samples["pipeline_cached"] = [timed(lambda: drain(cached)) for _ in range(args.repeats)]
    images = passes * len(manifest)
    return {name: metric("img/s", values, images) for name, values in samples.items()}, {"passes": passes}


def _classifier(cfg: Config, num_classes: int) -> tuple[Any, int]:
    """A `transferlab.model.Classifier` as the train stage builds it, and its input size."""
    from transferlab.model import build_classifier

    size = cfg.image_size
    return build_classifier(cfg.model, num_classes, size), size


def batch_clock() -> Any:
    """A Keras callback that notes when each predict or train batch ends.

    Steady-state throughput is measured from the first batch's end to the last one's, so
    the fixed cost of a `predict`/`fit` call (iterator set-up, callbacks) and the first
    batch are left out; `call_rate` keeps the whole call for comparison.
    """
    import keras

    class BatchClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.started = time.perf_counter()
            self.ticks: list[float] = []

        def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.ticks.append(time.perf_counter())

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.ticks.append(time.perf_counter())

        def steady_rate(self, images_after_first_batch: int) -> float:
            return images_after_first_batch / (self.ticks[-1] - self.ticks[0])

        def call_rate(self, images: int) -> float:
            return images / (self.ticks[-1] - self.started)

    return BatchClock()


def probe_forward(args: argparse.Namespace, cfg: Config) -> tuple[Metrics, dict[str, Any]]:
    import tensorflow as tf

    from transferlab.pipeline import make_dataset

    manifest = all_images(args.project, cfg.data.name)
    classifier, size = _classifier(cfg, len(manifest.classes))
    features = classifier.features
    # Enough batches that the prefetch buffer filled during the first batch cannot flatter the rate.
    # Whole batches only, so the warm-up traces the one batch shape the timed runs use.
    passes = math.ceil(MIN_FORWARD_IMAGES / len(manifest))
    keep = passes * len(manifest) // BATCH_SIZE * BATCH_SIZE
    repeated = dataclasses.replace(
        manifest, paths=(manifest.paths * passes)[:keep], labels=(manifest.labels * passes)[:keep]
    )

    def fed_dataset() -> tf.data.Dataset:
        ds = make_dataset(repeated, image_size=size, batch_size=BATCH_SIZE, cache=False)
        return ds.map(lambda x, y: x)

    batch = next(iter(fed_dataset()))  # real images, held in memory
    steps = math.ceil(MIN_FORWARD_IMAGES / BATCH_SIZE)
    in_memory = tf.data.Dataset.from_tensors(batch).repeat(steps)
    sources = {
        "forward_memory": (lambda: in_memory, steps * BATCH_SIZE),
        "forward_fed": (fed_dataset, len(repeated)),  # the feature cache's pass, over `passes` copies
    }
    with tempfile.TemporaryDirectory(prefix="bench-compiled-") as folder:
        copy = CompiledModels(Path(folder)).get(features, {"probe": "forward"})  # as the feature cache converts it
    if copy is None:
        raise RuntimeError("the TFLite conversion of the backbone failed; see the log")
    for make, _ in sources.values():  # warm-up: traces the predict step, plans the copy's kernels
        features.predict(make().take(2), verbose=0)
        copy.predict(make().take(2).as_numpy_iterator())
    samples: dict[str, list[float]] = {f"{name}{engine}": [] for name in sources for engine in ("", "_tflite")}
    whole_calls: dict[str, list[float]] = {name: [] for name in samples}
    for _ in range(args.repeats):
        for name, (make, images) in sources.items():
            clock = batch_clock()
            features.predict(make(), verbose=0, callbacks=[clock])
            samples[name].append(clock.steady_rate(images - BATCH_SIZE))
            whole_calls[name].append(clock.call_rate(images))
            clock = batch_clock()
            copy.predict(make().as_numpy_iterator(), on_batch=lambda clock=clock: clock.on_predict_batch_end(0))
            samples[f"{name}_tflite"].append(clock.steady_rate(images - BATCH_SIZE))
            whole_calls[f"{name}_tflite"].append(clock.call_rate(images))
    metrics = {
        f"{name}{engine}": metric("img/s", samples[f"{name}{engine}"], images)
        for name, (_, images) in sources.items()
        for engine in ("", "_tflite")
    }
    return metrics, {"feature_dim": int(features.output.shape[-1]), "whole_predict_call_img_s": whole_calls}


def probe_train(args: argparse.Namespace, cfg: Config) -> tuple[Metrics, dict[str, Any]]:
    import keras
    import numpy as np
    import tensorflow as tf

    from transferlab.model import set_trainable_layers

    classes = load_classes(StagePaths(args.project).classes)
    classifier, size = _classifier(cfg, len(classes))
    pixels = np.random.default_rng(0).uniform(0, 255, (BATCH_SIZE, size, size, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(BATCH_SIZE) % len(classes), len(classes))
    if args.phase == "train-head":
        model, inputs = classifier.head, classifier.features.predict(pixels, verbose=0)
        trainable_layers = None
    else:
        model, inputs = classifier.model, pixels
        trainable_layers = set_trainable_layers(classifier.backbone, UNFREEZE[args.phase])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )

    def fit(steps: int) -> float:
        clock = batch_clock()
        model.fit(tf.data.Dataset.from_tensors((inputs, labels)).repeat(steps), verbose=0, callbacks=[clock])
        return clock.steady_rate((steps - 1) * BATCH_SIZE)

    rate = fit(3)  # warm-up: traces the train step; sizes the timed repetitions
    steps = min(MAX_TRAIN_STEPS, max(MIN_TRAIN_STEPS, math.ceil(TARGET_STEP_SECONDS * rate / BATCH_SIZE)))
    samples = [fit(steps) for _ in range(args.repeats)]
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    info = {"trainable_params": trainable, "trainable_backbone_layers": trainable_layers, "steps_per_rep": steps}
    return {args.phase.replace("-", "_"): metric("img/s", samples, steps * BATCH_SIZE)}, info


PROBES = {
    "scan": probe_scan,
    "pipeline": probe_pipeline,
    "forward": probe_forward,
    **dict.fromkeys(("train-head", *UNFREEZE), probe_train),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=sorted(PROBES))
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics, info = PROBES[args.phase](args, load_params(args.params))
    args.result.write_text(json.dumps({"metrics": metrics, "info": info}, indent=1))


if __name__ == "__main__":
    main()
