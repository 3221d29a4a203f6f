"""Head ensembles (`train.ensemble`): heads of several seeds averaged into the saved one."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from helpers import REPO_ROOT, mlflow_client, tiny_cfg, train_killed_after, train_to_the_end

from transferlab.config import MAX_SEED, ConfigError, ModelConfig, compose, write_params
from transferlab.ensemble import Member, mean_affine, member_checkpoints, member_seed, without_learners_of_nothing
from transferlab.paths import StagePaths
from transferlab.stages.train import train

CONF = REPO_ROOT / "conf"


def test_a_head_is_one_affine_map_of_the_pooled_features_with_its_batchnorm_folded_in() -> None:
    from transferlab.model import build_head, head_affine, head_logits, run_head, set_head_affine

    rng = np.random.default_rng(0)
    head = build_head(16, 4, ModelConfig(head_batchnorm=True), seed=1)
    norm = head.get_layer("head_batchnorm")
    gamma, beta, mean = (rng.normal(size=16) for _ in range(3))
    norm.set_weights([w.astype("float32") for w in (gamma, beta, mean, rng.uniform(0.5, 2.0, 16))])
    features = rng.normal(size=(10, 16)).astype("float32")
    kernel, bias = head_affine(head)
    np.testing.assert_allclose(features @ kernel + bias, run_head(head_logits(head), features), rtol=1e-4, atol=1e-4)

    other = build_head(16, 4, ModelConfig(head_batchnorm=True), seed=2)
    set_head_affine(other, kernel, bias)
    np.testing.assert_allclose(run_head(head_logits(other), features), features @ kernel + bias, rtol=1e-4, atol=1e-4)


def test_member_seeds_start_at_the_runs_and_differ_from_each_other_and_from_other_runs() -> None:
    seeds = [member_seed(123, member) for member in range(5)]
    assert seeds[0] == 123 and len(set(seeds)) == 5
    assert seeds == [member_seed(123, member) for member in range(5)], "the same run gets the same members"
    assert set(seeds[1:]).isdisjoint(member_seed(124, member) for member in range(5))
    assert all(0 <= seed <= MAX_SEED for seed in seeds)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("train.ensemble=3", "finetune.unfreeze=20"),
            "train.ensemble=3 averages heads trained on a frozen backbone, but finetune.unfreeze is 20: "
            "set train.ensemble=1 to fine-tune",
        ),
        (("finetune=top20", "train.ensemble=2"), "train.ensemble=2 averages heads trained on a frozen backbone"),
        (
            ("train.ensemble=3", "train.strategy=multi_worker"),
            "train.ensemble=3 cannot train under train.strategy=multi_worker",
        ),
        (("train.ensemble=0",), "train.ensemble must be in [1, 32], got 0"),
        (("train.ensemble=33",), "train.ensemble must be in [1, 32], got 33"),
    ],
)
def test_an_ensemble_that_cannot_be_averaged_is_one_line_at_the_door(overrides, message) -> None:
    with pytest.raises(ConfigError) as raised:
        compose(list(overrides), CONF)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def _member(index: int, accuracy: float, weight: float) -> Member:
    return Member(index, 10 + index, 1, np.full((4, 3), weight), np.full(3, weight), accuracy)


def test_a_member_that_learned_nothing_is_left_out_of_the_average_with_a_one_line_warning(caplog) -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2])  # always answering class 2 scores 3/7
    members = [_member(0, 6 / 7, 1.0), _member(1, 3 / 7, 5.0), _member(2, 4 / 7, 3.0)]
    with caplog.at_level(logging.WARNING, logger="transferlab.ensemble"):
        chosen = without_learners_of_nothing(members, labels)
    assert [member.averaged for member in chosen] == [True, False, True]
    kernel, bias = mean_affine(chosen)
    np.testing.assert_allclose(kernel, 2.0)
    np.testing.assert_allclose(bias, 2.0)
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith("ensemble member 1 (seed 11) learned nothing (validation accuracy 0.4286 alone")
    assert warning.endswith("left out of the average") and "\n" not in warning


def test_when_no_member_learned_anything_all_are_averaged_and_the_warning_says_so(caplog) -> None:
    labels = np.array([0, 1, 2, 2])
    members = [_member(0, 0.5, 1.0), _member(1, 0.25, 3.0)]
    with caplog.at_level(logging.WARNING, logger="transferlab.ensemble"):
        chosen = without_learners_of_nothing(members, labels)
    assert all(member.averaged for member in chosen)
    np.testing.assert_allclose(mean_affine(chosen)[0], 2.0)
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith("no ensemble member beat always answering the most frequent class (validation")


def _head_map(paths: StagePaths) -> np.ndarray:
    """The saved model's logits as one affine map of the pooled features (small_cnn's head has a
    BatchNormalization, folded in), as kernel rows over a bias row."""
    from transferlab.inference import load_model
    from transferlab.model import HEAD_MODEL, head_affine, single_view_model

    kernel, bias = head_affine(single_view_model(load_model(paths.model_file)).get_layer(HEAD_MODEL))
    return np.concatenate([kernel, bias[None]])


ENSEMBLE = ("train.ensemble=3", "train.epochs=4", "train.learning_rate=0.05", "train.deterministic=true")


@pytest.mark.slow
def test_an_ensemble_saves_the_mean_of_its_members_heads_and_logs_every_member(prepared_project: StagePaths) -> None:
    """The saved head is the mean of the heads that single runs with the members' seeds train, and
    MLflow has every member's epochs, kept epoch and validation accuracy."""
    import keras

    from transferlab.small_cnn import SmallCNN

    paths = prepared_project
    weights = paths.root / "small_cnn.weights.h5"  # the same backbone for every seed, as ImageNet weights are
    keras.utils.set_random_seed(0)
    SmallCNN(input_shape=(64, 64, 3)).save_weights(weights)
    # A gentler rate than ENSEMBLE's, at which every member learns: one that learns nothing is left out.
    fixed = (*ENSEMBLE, "train.epochs=8", "train.learning_rate=0.003", f"model.weights={weights}")
    cfg = tiny_cfg(*fixed)
    result = train(cfg, paths)
    ensemble = _head_map(paths)
    client = mlflow_client(paths)
    run = client.get_run(result.run_id)
    assert not paths.checkpoints.exists(), "the members' checkpoints go with the run's"

    singles, histories = [], []
    for member in range(3):
        single = train(tiny_cfg(*fixed, "train.ensemble=1", f"train.seed={member_seed(cfg.train.seed, member)}"), paths)
        singles.append(_head_map(paths))
        histories.append(single.history)
    np.testing.assert_allclose(ensemble, np.mean(singles, axis=0), atol=1e-5)
    assert not np.allclose(singles[0], singles[1], atol=1e-3), "the members differ"

    metrics = run.data.metrics
    assert metrics["ensemble_heads_averaged"] == 3
    assert metrics["member_0/best_epoch"] == metrics["best_epoch"] == result.best_epoch
    for member in range(3):
        assert 0 <= metrics[f"member_{member}/val_accuracy"] <= 1
    for member in (1, 2):
        epochs = int(metrics[f"member_{member}/best_epoch"])
        steps = [m.step for m in client.get_metric_history(result.run_id, f"member_{member}/val_loss")]
        assert sorted(steps) == list(range(1, len(steps) + 1)) and epochs <= len(steps) <= 8
    seeds = ", ".join(str(member_seed(cfg.train.seed, member)) for member in range(3))
    assert f"**Ensemble** of 3 heads (seeds {seeds}; best epochs" in run.data.tags["mlflow.note.content"]
    pd.testing.assert_frame_equal(result.history, histories[0])  # the run's history and curves are member 0's


@pytest.mark.slow
def test_a_run_killed_inside_a_member_resumes_there_and_ends_as_an_uninterrupted_one(
    prepared_project: StagePaths,
) -> None:
    paths = prepared_project
    cfg = tiny_cfg(*ENSEMBLE, "train.epochs=8", "model.dropout=0.0", "mlflow.log_model=false")
    write_params(cfg, paths.root / "params.yaml")
    train_to_the_end(paths)
    uninterrupted = _head_map(paths)

    state_file = member_checkpoints(paths, 1) / "state.json"
    train_killed_after(paths, state_file, epochs=2)
    killed_run = json.loads(state_file.read_text())["run_id"]
    out = train_to_the_end(paths)
    assert "ensemble member 2 of 3" in out and "resuming after epoch" in out

    np.testing.assert_allclose(_head_map(paths), uninterrupted, atol=1e-5)
    client = mlflow_client(paths)
    assert client.get_run(killed_run).info.status == "FINISHED", "the resumed run is the killed one"
    steps = [m.step for m in client.get_metric_history(killed_run, "member_1/val_loss")]
    assert sorted(steps) == list(range(1, len(steps) + 1)), "every epoch of member 1 logged exactly once"
