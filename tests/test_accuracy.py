"""Real accuracy: ImageNet MobileNetV2-0.35 on 600 real flower photos from ../shared.

The default frozen config (the head fitted by L-BFGS on square-rooted features, L2 chosen on
validation, temperature scaling, 288 px, 3 cached flipped views at the 3 squares along each
photo's long side, test-time flipping and 3 crops) must keep a floor on the sample
and beat the published recipe (BN head, Adam 1e-2, 2 epochs, 224 px) on the same split and
seeds. Validation and test hold 90 images each, so one
image is 1.1 points: both are compared as means over three seeds rather than on one lucky or
unlucky seed. The study on 1,500 photos (README, "How the defaults were chosen") is
`make study`; this is its guard rail.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from transferlab.config import compose
from transferlab.paths import StagePaths
from transferlab.stages.download import download
from transferlab.stages.evaluate import evaluate
from transferlab.stages.split import split
from transferlab.stages.train import train

pytestmark = [pytest.mark.slow, pytest.mark.shared]

SEEDS = (0, 1, 2)
# Measured on the sample, seeds 0-2: the defaults of 2026-12-01 (the L-BFGS head on square roots)
# val 90.0 %, test 90.7 %, test ECE 0.066. Before them (2026-11-29): the Adam head (3 cached
# flipped views at the 3 squares, 3 test-time crops, 288 px, test-time flipping) val 90.0 %,
# test 90.7 %, test ECE 0.083; the defaults before it (central squares: 2 cached flipped views, no
# crops) val 90.7 %, test 89.6 %, test ECE 0.077; those without test-time flipping val 89.6 %,
# test 88.9 %, ECE 0.075; at 224 px val 89.3 %, test 87.8 %, ECE 0.076; the published recipe
# (224 px) val 83.0 %, test 80.4 %, ECE 0.145. The accuracy floors leave about two points (two
# images) for other CPUs and library versions; the ECE floor, set for the Adam head, 0.024.
MIN_VAL_ACCURACY = 0.86
MIN_TEST_ACCURACY = 0.84
MAX_TEST_ECE = 0.09


def test_defaults_keep_their_floor_and_beat_the_published_recipe(shared_dir: Path, tmp_path: Path) -> None:
    weights = shared_dir / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    base = [
        "data=folder",
        f"data.source={shared_dir / 'data' / 'flower_photos_sample'}",
        "data.name=flowers_sample",
        "model=mobilenet_v2",
        "model.alpha=0.35",
        f"model.weights={weights}",
        "mlflow.log_model=false",
        "mlflow.system_metrics=false",
    ]
    paths = StagePaths(tmp_path)
    cfg = compose(base, config_dir=REPO_ROOT / "conf")
    assert cfg.image_size == 288  # the size the floors were measured at
    download(cfg, paths)
    split(cfg, paths)

    def mean_scores(*overrides: str) -> dict[str, float]:
        scores: dict[str, list[float]] = {"val": [], "test": [], "ece": []}
        for seed in SEEDS:
            run_cfg = compose([*base, *overrides, f"train.seed={seed}"], config_dir=REPO_ROOT / "conf")
            result = train(run_cfg, paths)
            metrics = evaluate(run_cfg, paths, model=result.classifier.model if result.classifier else None)
            scores["val"].append(result.val_accuracy)
            scores["test"].append(metrics["test_accuracy"])
            scores["ece"].append(metrics["test_ece"])
        return {name: statistics.mean(values) for name, values in scores.items()}

    ours = mean_scores()
    published = mean_scores("+experiment=reference")
    summary = f"defaults {ours} vs published recipe {published} over seeds {SEEDS}"
    assert ours["val"] >= MIN_VAL_ACCURACY and ours["test"] >= MIN_TEST_ACCURACY, summary
    assert ours["ece"] <= MAX_TEST_ECE, summary
    assert ours["val"] > published["val"] and ours["test"] > published["test"], summary
    assert ours["ece"] < published["ece"], summary
