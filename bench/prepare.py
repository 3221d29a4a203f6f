"""Prepare the benchmark's scratch projects once, outside every timing.

Two projects share one image folder:
- `e2e/`: split 80/20 (val 0.2, test 0), the same proportions as the naive recipe's
  `validation_split=0.2`, so both train and validate on the same number of images;
- `sweep/`: the default 70/15/15 split, because every sweep job also runs evaluate on test.
Both have their MLflow store created up front: the first run in a fresh store spends ~10 s
creating tables, which is a one-off cost of a new project, not of a training run. For the same
reason the backbone is converted to TFLite up front (compiled.py), once per backbone, weights
and image size; that one-off is timed and reported.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from settings import BATCH_SIZE, REPO_ROOT, SYNTHETIC_CLASSES, BenchSettings

from transferlab import tracking
from transferlab.config import Config, SyntheticConfig, compose, write_params
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.paths import StagePaths

log = logging.getLogger("bench")

DATA_NAME = "bench"
CONF_DIR = REPO_ROOT / "conf"
# The published recipe as this project names it (conf/experiment/reference.yaml): BN head,
# dropout 0.2, Adam 1e-2, 2 epochs, no smoothing, no early stopping, no calibration.
RECIPE = ("+experiment=reference",)
E2E_SPLIT = ("data.val_fraction=0.2", "data.test_fraction=0")
COMPILE_PROBE_IMAGES = 4


@dataclass(frozen=True)
class Prepared:
    """Paths and facts the measurements need."""

    images: Path
    e2e: StagePaths
    sweep: StagePaths
    base_overrides: tuple[str, ...]
    num_images: int
    num_classes: int
    split_sizes: dict[str, int]
    compile_s: float  # converting the backbone to TFLite, once

    def params_file(self, variant: str) -> Path:
        return self.e2e.root / f"params-{variant}.yaml"

    @property
    def feature_caches(self) -> list[Path]:
        return [self.e2e.feature_cache, self.sweep.feature_cache]


def base_overrides(settings: BenchSettings, images: Path) -> tuple[str, ...]:
    """Hydra overrides naming the data, model and batch size every variant shares."""
    alpha = "null" if settings.alpha is None else f"{settings.alpha:g}"
    weights = "null" if settings.weights is None else f"'{settings.weights}'"
    return (
        "data=folder",
        f"data.source='{images}'",
        f"data.name={DATA_NAME}",
        f"data.image_size={settings.image_size}",
        f"model={settings.backbone}",
        f"model.alpha={alpha}",
        f"model.weights={weights}",
        f"train.batch_size={BATCH_SIZE}",
    )


def e2e_variants(finetune_epochs: int) -> dict[str, tuple[str, ...]]:
    """Every `transferlab train` variant the benchmark runs, by name: exactly what each compares.

    - `ours-2`: the recipe's settings, as the naive script runs them;
    - `finetune-cut` / `finetune-images`: the recipe's head phase, then `finetune=top20` for
      `finetune_epochs` epochs, from the cut-point cache or (`train.feature_cache=false`) through
      the whole network on images; same seed, the frozen part computed by Keras in both;
    - `ours-defaults`: this project's defaults (early stopping within 100 epochs, calibration).
    """
    # Keras computes the frozen part in both fine-tuning runs, so the pair isolates the cut-point
    # cache: the uncached run has no frozen pass a TFLite copy could compute (compiled.py).
    finetune = (*RECIPE, "finetune=top20", f"finetune.epochs={finetune_epochs}", "train.frozen_forward=keras")
    return {
        "ours-2": RECIPE,
        "finetune-cut": finetune,
        "finetune-images": (*finetune, "train.feature_cache=false"),
        "ours-defaults": (),
    }


def sweep_overrides(jobs: int) -> tuple[str, ...]:
    """The recipe with a head-only grid of `jobs` configs (8: 4 learning rates x 2 dropouts), 2 epochs each."""
    rates = ("1e-2", "3e-3", "1e-3", "3e-4")[: max(1, jobs // 2)]
    dropouts = ("0.2", "0.5") if jobs >= 2 else ("0.2",)
    return (
        *RECIPE,
        "sweep.skip_finished=false",
        f"train.learning_rate={','.join(rates)}",
        f"model.dropout={','.join(dropouts)}",
    )


def prepare(settings: BenchSettings) -> Prepared:
    """Fresh workdir, images, both projects split, params files written, MLflow stores created,
    the backbone converted to TFLite (in this process: its time is reported, not its memory)."""
    if settings.workdir.exists():
        shutil.rmtree(settings.workdir)
    settings.workdir.mkdir(parents=True)
    images = settings.data or _synthetic_images(settings)
    base = base_overrides(settings, images)
    e2e = _project(settings.workdir / "e2e", [*base, *E2E_SPLIT])
    sweep = _project(settings.workdir / "sweep", list(base))
    for variant, extra in e2e_variants(settings.finetune_epochs).items():
        write_params(compose([*base, *E2E_SPLIT, *extra], CONF_DIR), e2e.root / f"params-{variant}.yaml")
    classes = load_classes(e2e.classes)
    sizes = {name: len(_manifest(e2e, name, classes)) for name in ("train", "val")}
    return Prepared(
        images=images,
        e2e=e2e,
        sweep=sweep,
        base_overrides=base,
        num_images=sum(sizes.values()),
        num_classes=len(classes),
        split_sizes=sizes,
        compile_s=_compile_backbone(compose([*base, *E2E_SPLIT, *RECIPE], CONF_DIR), e2e, sweep),
    )


def _compile_backbone(cfg: Config, e2e: StagePaths, sweep: StagePaths) -> float:
    """Convert the backbone up to the pooled features to TFLite, as a project's first run does,
    through the feature cache itself on a few images; the copy goes to both projects. Seconds
    taken (the conversion and TensorFlow's import)."""
    from transferlab.console import quiet_imports

    quiet_imports()  # TensorFlow's start-up chatter, as in every transferlab command
    from transferlab.feature_cache import FeatureCache, FeatureKey
    from transferlab.model import build_classifier, weights_digest
    from transferlab.seeding import seed_everything

    started = time.perf_counter()
    seed_everything(cfg.train.seed)  # random backbone weights (no BENCH_WEIGHTS) then match the runs'
    classes = load_classes(e2e.classes)
    val = _manifest(e2e, "val", classes)
    few = Manifest(val.raw_root, val.paths[:COMPILE_PROBE_IMAGES], val.labels[:COMPILE_PROBE_IMAGES], val.classes)
    classifier = build_classifier(cfg.model, len(classes), cfg.image_size, seed=cfg.train.seed)
    key = FeatureKey.of_split(cfg.model, weights_digest(classifier.backbone), cfg.image_size, few)
    FeatureCache.of_project(e2e, cfg.train).activations_for(
        key, classifier.features, few, image_size=cfg.image_size, batch_size=BATCH_SIZE
    )
    seconds = time.perf_counter() - started
    if not any(e2e.compiled_models.glob("*.tflite")):
        raise RuntimeError("the TFLite conversion of the backbone failed; see the log")
    shutil.rmtree(e2e.feature_cache)
    shutil.copytree(e2e.compiled_models, sweep.compiled_models)
    log.info("converted the backbone to TFLite in %.1f s", seconds)
    return seconds


def _synthetic_images(settings: BenchSettings) -> Path:
    from transferlab.synthetic import generate

    images = settings.workdir / "images"
    cfg = SyntheticConfig(
        num_classes=SYNTHETIC_CLASSES,
        images_per_class=settings.synthetic_images_per_class,
        image_size=settings.image_size,
        seed=0,
    )
    generate(cfg, images)
    return images


def _project(root: Path, overrides: Sequence[str]) -> StagePaths:
    """Download (copy) and split the images into a new project; create its MLflow store."""
    from transferlab.stages.download import download
    from transferlab.stages.split import split

    cfg: Config = compose(list(overrides), CONF_DIR)
    paths = StagePaths(root)
    root.mkdir(parents=True)
    write_params(cfg, root / "params.yaml")
    download(cfg, paths)
    split(cfg, paths)
    tracking.open_store(cfg.mlflow, root)
    return paths


def _manifest(paths: StagePaths, split_name: str, classes: list[str]) -> Manifest:
    return load_manifest(paths.manifest(split_name), paths.raw_dataset(DATA_NAME), classes)
