"""Config: every file in conf/ composes and validates; bad values are rejected in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferlab.config import Config, compose, compose_raw, missing_inputs, validate
from transferlab.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"

# Options that cannot compose alone: what a user must add.
REQUIRED_WITH = {"data/folder": ["data.source=/path/to/my_images", "data.name=my_images"]}


def _defaulted_groups() -> set[str]:
    """Groups in config.yaml's defaults list (selected as `group=x`; the others need `+group=x`)."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {next(iter(item)) for item in defaults if isinstance(item, dict)}


GROUP_OPTIONS = sorted(f"{p.parent.name}/{p.stem}" for p in CONF.glob("*/*.yaml"))


def _compose(*overrides: str) -> Config:
    return compose(list(overrides), config_dir=CONF)


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_conf_file_composes_and_validates(option: str) -> None:
    group, name = option.split("/")
    prefix = "" if group in _defaulted_groups() else "+"
    cfg = _compose(f"{prefix}{group}={name}", *REQUIRED_WITH.get(option, []))
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_conf_file_names_every_key(option: str) -> None:
    """`dvc exp run -S` writes Hydra's composition to params.yaml as is, `transferlab compose` the
    validated config: only when conf/ spells out every key are the two the same (and every param
    dvc.yaml tracks, such as data.synthetic, exists in both)."""
    group, name = option.split("/")
    prefix = "" if group in _defaulted_groups() else "+"
    raw = compose_raw([f"{prefix}{group}={name}", *REQUIRED_WITH.get(option, [])], CONF)
    assert raw == validate(raw).to_dict()


def test_every_group_has_options() -> None:
    for group in _defaulted_groups():
        assert any(o.startswith(f"{group}/") for o in GROUP_OPTIONS), group


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(["+train.foo=1"], r"unknown key train\.foo", id="unknown-key"),
        pytest.param(["+data.colour=red"], r"unknown key data\.colour", id="unknown-data-key"),
        pytest.param(["train.epochs=ten"], r"train\.epochs must be int, got 'ten'", id="wrong-type"),
        pytest.param(["train.batch_size=1.5"], r"train\.batch_size must be int", id="float-for-int"),
        pytest.param(["train.learning_rate=-0.001"], r"train\.learning_rate must be in \(0, 10\]", id="negative-lr"),
        pytest.param(["model.dropout=1.0"], r"model\.dropout must be in \[0, 1\)", id="dropout-one"),
        pytest.param(["model.test_time_crops=0"], r"model\.test_time_crops must be 1 to 9, got 0$", id="no-crops"),
        pytest.param(["model.test_time_crops=10"], r"model\.test_time_crops must be 1 to 9, got 10$", id="ten-crops"),
        pytest.param(
            ["augment.cached_views=2"],
            r"^augment\.crops=3 needs at least that many cached views \(augment\.cached_views, got 2\)",
            id="crops-without-views",
        ),
        pytest.param(["model.dropout=-0.1"], r"model\.dropout must be in \[0, 1\)", id="dropout-negative"),
        pytest.param(
            ["data.val_fraction=0.5", "data.test_fraction=0.5"],
            r"data\.val_fraction \+ data\.test_fraction must be below 1",
            id="fractions-sum-to-one",
        ),
        pytest.param(["model.backbone=vgg16"], r"model\.backbone must be one of .*efficientnet_b0", id="backbone"),
        pytest.param(["data=folder"], r"data\.source", id="folder-without-source"),
        pytest.param(
            ["data=nope"], r"^data=nope: no such option \(available: flowers, folder, synthetic\)$", id="unknown-option"
        ),
        # Hydra's own groups: its options, its plugins' (the ray extra adds ray_aws) and conf/hydra/'s.
        pytest.param(
            ["hydra/launcher=joblibb"],
            r"^hydra/launcher=joblibb: no such option \(available: basic, joblib, ray(, ray_aws)?\)$",
            id="launcher",
        ),
        pytest.param(
            ["hydra/sweeper=optuan"],
            r"^hydra/sweeper=optuan: no such option \(available: basic, optuna\)$",
            id="sweeper",
        ),
        # Hydra said only "Could not override 'model.dropuot'" for these (no `+`).
        pytest.param(
            ["model.dropuot=0.3"],
            r"^unknown key model\.dropuot \(known: alpha, backbone, dropout, feature_power, head_batchnorm, "
            r"test_time_crops, test_time_flip, weights\)$",
            id="misspelt-key",
        ),
        pytest.param(
            ["train.early_stopping.patince=3"],
            r"^unknown key train\.early_stopping\.patince \(known: min_delta, monitor, patience\)$",
            id="misspelt-nested-key",
        ),
        pytest.param(
            ["train.seed.x=1"],
            r"^unknown key train\.seed\.x: train\.seed is a value, not a section$",
            id="below-a-value",
        ),
        pytest.param(
            ["mlflow.registered_model=a/b"], r"mlflow\.registered_model must be null or a name", id="model-uri"
        ),
        # Bounds TensorFlow, NumPy, MLflow or the filesystem would enforce later, with a traceback (issue 12).
        pytest.param(["train.seed=-5"], r"train\.seed must be in \[0, 4294967295\]", id="seed-negative"),
        pytest.param(["train.seed=4294967296"], r"train\.seed must be in \[0, 4294967295\]", id="seed-2-32"),
        pytest.param(["data.split_seed=-1"], r"data\.split_seed must be in \[0, ", id="split-seed"),
        pytest.param(
            ["data=synthetic", "data.synthetic.seed=-1"], r"data\.synthetic\.seed must be in \[0, ", id="synthetic-seed"
        ),
        pytest.param(["data.name=" + "n" * 129], r"data\.name must be at most 128 characters", id="name-length"),
        pytest.param(
            ["mlflow.experiment=" + "e" * 501],
            r"mlflow\.experiment must be at most 500 characters long, got 501",
            id="exp",
        ),
        pytest.param(
            ["data.source=/" + "s" * 6000],
            r"data\.source must be at most 6000 characters long \(MLflow's limit\), got 6001",
            id="param-value-length",
        ),
        pytest.param(
            ["finetune=top20", "finetune.learning_rate=11"], r"finetune\.learning_rate must be in \(0, 10\]", id="ft-lr"
        ),
        pytest.param(["data.max_extracted_bytes=0"], r"data\.max_extracted_bytes must be >= 1", id="extract-bytes"),
        pytest.param(
            ["data.max_compression_ratio=0.5"], r"data\.max_compression_ratio must be a number >= 1", id="ratio"
        ),
    ],
)
def test_rejections(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _compose(*overrides)
    assert "\n" not in str(caught.value)


def test_params_yaml_is_conf_composed_without_overrides() -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params == _compose().to_dict(), "params.yaml is stale: run `make params` (transferlab compose)"


def test_registered_model_follows_the_data_name_and_can_be_turned_off() -> None:
    assert _compose().mlflow.registered_model == "flower_photos-classifier"
    assert _compose("data=synthetic").mlflow.registered_model == "synthetic-classifier"
    assert _compose("mlflow.registered_model=null").mlflow.registered_model is None


def test_highest_seed_and_limits_match_what_the_libraries_accept() -> None:
    """The bounds checked at the door are the ones NumPy and MLflow enforce."""
    import numpy as np
    from mlflow.utils import validation

    from transferlab import config

    assert _compose(f"train.seed={config.MAX_SEED}").train.seed == 2**32 - 1
    np.random.RandomState(config.MAX_SEED)  # accepted; one more is not
    with pytest.raises(ValueError):
        np.random.RandomState(config.MAX_SEED + 1)
    assert config.MAX_PARAM_VALUE_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert config.MAX_EXPERIMENT_NAME_LENGTH == validation.MAX_EXPERIMENT_NAME_LENGTH


def test_image_size_left_null_is_the_backbones_default_and_is_what_the_hash_covers() -> None:
    """A run's config hash (sweep skipping, MLflow) covers the size it trains at, also when the
    config leaves it to the backbone, whose default can change between versions."""
    from transferlab.config import config_hash

    mobilenet = _compose("model=mobilenet_v2")
    assert mobilenet.data.image_size is None and mobilenet.image_size == 288
    assert _compose().image_size == 224  # EfficientNetB0
    assert _compose("model=mobilenet_v2", "data.image_size=160").image_size == 160
    reference = _compose("model=mobilenet_v2", "+experiment=reference")
    assert reference.data.image_size == reference.image_size == 224  # the recipe's 224 px
    assert config_hash(mobilenet) == config_hash(_compose("model=mobilenet_v2", "data.image_size=288"))
    assert config_hash(mobilenet) != config_hash(_compose("model=mobilenet_v2", "data.image_size=224"))


def test_missing_inputs_are_the_local_paths_that_are_not_there(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "w.h5").write_bytes(b"")
    local = ["data=folder", "data.source=photos", "model=mobilenet_v2"]  # relative to the project root
    assert missing_inputs(compose([*local, "model.weights=w.h5"]), tmp_path) == {}
    gone = compose(["data=folder", "data.source=gone", "model=mobilenet_v2", "model.weights=gone.h5"])
    assert missing_inputs(gone, tmp_path) == {
        "data.source": "data.source gone does not exist",
        "model.weights": "model.weights file gone.h5 does not exist",
    }
    for remote in (["data.source=https://example.org/photos.tgz"], ["data=synthetic"]):
        assert missing_inputs(compose([*remote, "model.weights=null"]), tmp_path) == {}
