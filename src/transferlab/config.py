"""The one owner of configuration: compose `conf/` with Hydra, validate, hash, flatten.

Every entry point (DVC stage commands, the Hydra app, `dvc exp run -S`) ends up with a
plain mapping. `validate` turns it into a frozen `Config` or raises `ConfigError` with one
line naming the offending key. Nothing else in the package reads YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from transferlab import atomic
from transferlab.backbones import BACKBONES
from transferlab.errors import ConfigError, first_line

CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"  # conf/ composed, what DVC stages read
SYNTHETIC_SOURCE = "synthetic"
SETTINGS_NAME = "project"  # conf/project.yaml, and the option conf/<group>/project.yaml (project_settings.py)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:~+@-]+$")
# Bounds that TensorFlow, NumPy, MLflow or the filesystem enforce later, checked here instead.
MAX_SEED = 2**32 - 1  # NumPy and keras.utils.set_random_seed take 0 .. 2**32 - 1
MAX_NAME_LENGTH = 128  # data.name becomes a folder name (and temporary names built on it)
MAX_EXPERIMENT_NAME_LENGTH = 500  # mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH
MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH: every key is logged as a param
MAX_LEARNING_RATE = 10.0
MAX_ENSEMBLE = 32  # heads a run may average: each trains as long as one run's head
MAX_TEST_TIME_CROPS = 9  # each crop is one more backbone pass (two with flipping) for every prediction


@dataclass(frozen=True)
class SyntheticConfig:
    """Procedural dataset: one class per shape/colour, drawn with noise."""

    num_classes: int = 3
    images_per_class: int = 40
    image_size: int = 96
    seed: int = 0

    def check(self) -> None:
        _require(2 <= self.num_classes <= 8, "data.synthetic.num_classes", "in [2, 8]", self.num_classes)
        _require(self.images_per_class >= 3, "data.synthetic.images_per_class", ">= 3", self.images_per_class)
        _require(16 <= self.image_size <= 1024, "data.synthetic.image_size", "in [16, 1024]", self.image_size)
        _require_seed("data.synthetic.seed", self.seed)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split."""

    name: str
    source: str
    sha256: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 123
    synthetic: SyntheticConfig | None = None
    # Archives (zip, tar): extraction stops at the member that takes the total past either bound.
    max_extracted_bytes: int = 32 * 2**30
    max_compression_ratio: float = 100.0

    def check(self) -> None:
        _require(bool(_SAFE_NAME.match(self.name)), "data.name", "a plain folder name", self.name)
        _require(len(self.name) <= MAX_NAME_LENGTH, "data.name", f"at most {MAX_NAME_LENGTH} characters", self.name)
        _require(bool(self.source.strip()), "data.source", "a URL, archive or folder", self.source)
        if self.sha256 is not None:
            _require(bool(_SHA256.match(self.sha256)), "data.sha256", "64 lowercase hex digits", self.sha256)
        if self.image_size is not None:
            _require(32 <= self.image_size <= 1024, "data.image_size", "in [32, 1024]", self.image_size)
        _require(0 < self.val_fraction < 1, "data.val_fraction", "in (0, 1)", self.val_fraction)
        _require(0 <= self.test_fraction < 1, "data.test_fraction", "in [0, 1)", self.test_fraction)
        total = self.val_fraction + self.test_fraction
        _require(total < 1, "data.val_fraction + data.test_fraction", "below 1", round(total, 6))
        _require_seed("data.split_seed", self.split_seed)
        _require(self.max_extracted_bytes >= 1, "data.max_extracted_bytes", ">= 1", self.max_extracted_bytes)
        ratio = self.max_compression_ratio
        _require(1 <= ratio < math.inf, "data.max_compression_ratio", "a number >= 1", ratio)
        if self.source == SYNTHETIC_SOURCE:
            if self.synthetic is None:
                raise ConfigError("data.synthetic must be set when data.source is 'synthetic'")
            self.synthetic.check()


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, its ImageNet (or local) weights, the head and the test-time views of the saved model."""

    backbone: str = "efficientnet_b0"
    alpha: float | None = None
    weights: str | None = "imagenet"
    dropout: float = 0.2
    # The head's first layer maps each pooled feature x to sign(x) * |x| ** feature_power (1: off).
    feature_power: float = 1.0
    head_batchnorm: bool = False
    # The saved model averages the class probabilities of each image and its mirror image.
    test_time_flip: bool = True
    # ... and, above 1, of this many squares spread along each photo's long side (3: start, centre, end).
    test_time_crops: int = 3

    def check(self) -> None:
        known = ", ".join(sorted(BACKBONES))
        _require(self.backbone in BACKBONES, "model.backbone", f"one of {known}", self.backbone)
        spec = BACKBONES[self.backbone]
        if self.alpha is not None:
            _require(spec.alphas is not None, "model.alpha", f"null for {self.backbone}", self.alpha)
            assert spec.alphas is not None
            allowed = ", ".join(str(a) for a in spec.alphas)
            _require(self.alpha in spec.alphas, "model.alpha", f"one of {allowed}", self.alpha)
        if self.weights == "imagenet":
            _require(spec.imagenet_file is not None, "model.weights", f"null or a file for {self.backbone}", "imagenet")
        if self.weights not in (None, "imagenet"):
            ok = self.weights.endswith((".h5", ".keras"))
            _require(ok, "model.weights", "imagenet, null or a .h5/.keras file path", self.weights)
        _require(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)
        _require(0 < self.feature_power <= 1, "model.feature_power", "in (0, 1]", self.feature_power)
        _require(
            1 <= self.test_time_crops <= MAX_TEST_TIME_CROPS,
            "model.test_time_crops",
            f"1 to {MAX_TEST_TIME_CROPS}",
            self.test_time_crops,
        )

    @property
    def averages_test_time_views(self) -> bool:
        """True when the saved model averages several views of each photo (flips, crops)."""
        return self.test_time_flip or self.test_time_crops > 1


@dataclass(frozen=True)
class AugmentConfig:
    """Random training-time augmentation; all zero means none."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    # > 0: backbone features of this many augmented views of every training image are computed
    # once and cached (a fixed sample of augmentations); 0: fresh augmentation every epoch,
    # through the backbone (slow).
    cached_views: int = 0
    # > 1: the cached views are taken, in turn, at this many squares along each photo's long side
    # (as `model.test_time_crops` scores them); 1: all at the central square.
    crops: int = 1

    def check(self) -> None:
        _require(0 <= self.rotation <= 0.5, "augment.rotation", "in [0, 0.5] (fraction of a turn)", self.rotation)
        _require(0 <= self.zoom < 1, "augment.zoom", "in [0, 1)", self.zoom)
        _require(0 <= self.translation <= 0.5, "augment.translation", "in [0, 0.5]", self.translation)
        _require(0 <= self.contrast <= 1, "augment.contrast", "in [0, 1]", self.contrast)
        _require(0 <= self.cached_views <= 64, "augment.cached_views", "in [0, 64]", self.cached_views)
        _require(1 <= self.crops <= MAX_TEST_TIME_CROPS, "augment.crops", f"1 to {MAX_TEST_TIME_CROPS}", self.crops)
        if self.crops > 1 and 0 < self.cached_views < self.crops:
            raise ConfigError(
                f"augment.crops={self.crops} needs at least that many cached views (augment.cached_views, "
                f"got {self.cached_views}): the squares along the long side are cached views"
            )

    @property
    def enabled(self) -> bool:
        """True when at least one random layer is active."""
        return self.flip != "none" or any((self.rotation, self.zoom, self.translation, self.contrast))


@dataclass(frozen=True)
class FinetuneConfig:
    """How much of the backbone trains, and an optional second phase."""

    unfreeze: int | Literal["all"] = 0
    epochs: int = 0
    learning_rate: float | None = None
    warmup_epochs: int = 0
    schedule: Literal["constant", "cosine", "plateau"] | None = None  # None: train.schedule
    # after fine-tuning from the cut-point cache, fit the head again by L-BFGS on the fine-tuned
    # features, and keep it when it validates better (trainer.py: `Trainer.refit_head`)
    refit_head: bool = True

    def check(self) -> None:
        if self.unfreeze != "all":
            _require(self.unfreeze >= 0, "finetune.unfreeze", ">= 0 or 'all'", self.unfreeze)
        _require(self.epochs >= 0, "finetune.epochs", ">= 0", self.epochs)
        _require(
            0 <= self.warmup_epochs <= max(self.epochs - 1, 0),
            "finetune.warmup_epochs",
            "in [0, finetune.epochs - 1]",
            self.warmup_epochs,
        )
        if self.learning_rate is not None:
            rate = self.learning_rate
            _require(0 < rate <= MAX_LEARNING_RATE, "finetune.learning_rate", f"in (0, {MAX_LEARNING_RATE:g}]", rate)
        if self.epochs > 0:
            _require(self.unfreeze != 0, "finetune.unfreeze", "> 0 when finetune.epochs > 0", self.unfreeze)
            _require(
                self.learning_rate is not None,
                "finetune.learning_rate",
                "set when finetune.epochs > 0",
                self.learning_rate,
            )

    @property
    def two_phase(self) -> bool:
        """Head first with the backbone frozen, then unfreeze and continue."""
        return self.epochs > 0


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop a phase when `monitor` has not improved for `patience` epochs; the best epoch is kept."""

    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = 8
    min_delta: float = 0.0

    def check(self) -> None:
        _require(1 <= self.patience <= 1000, "train.early_stopping.patience", "in [1, 1000]", self.patience)
        _require(0 <= self.min_delta < 1, "train.early_stopping.min_delta", "in [0, 1)", self.min_delta)


@dataclass(frozen=True)
class PlateauConfig:
    """`schedule: plateau`: multiply the learning rate by `factor` after `patience` epochs without progress."""

    factor: float = 0.3
    patience: int = 2
    min_learning_rate: float = 1e-6

    def check(self) -> None:
        _require(0 < self.factor < 1, "train.plateau.factor", "in (0, 1)", self.factor)
        _require(1 <= self.patience <= 1000, "train.plateau.patience", "in [1, 1000]", self.patience)
        _require(
            0 <= self.min_learning_rate < 1, "train.plateau.min_learning_rate", "in [0, 1)", self.min_learning_rate
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and execution settings."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: Literal["constant", "cosine", "plateau"] = "constant"
    warmup_epochs: int = 0
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    early_stopping: EarlyStoppingConfig | None = field(default_factory=EarlyStoppingConfig)
    calibrate: bool = True
    ensemble: int = 1  # heads trained with different seeds on the frozen backbone, averaged into one
    # lbfgs: a head phase fed from the feature cache fits the head to convergence at several L2
    # strengths and keeps the best on validation (linear_head.py); other feeds, and adam, step Adam
    head_solver: Literal["adam", "lbfgs"] = "lbfgs"
    seed: int = 123
    deterministic: bool = False
    strategy: Literal["auto", "mirrored", "multi_worker"] = "auto"
    mixed_precision: bool = False
    feature_cache: bool = True
    # what runs frozen forward passes (feature and cut-point caches): a TFLite copy (compiled.py) or Keras
    frozen_forward: Literal["tflite", "keras"] = "tflite"

    def check(self) -> None:
        _require(1 <= self.epochs <= 10_000, "train.epochs", "in [1, 10000]", self.epochs)
        _require(1 <= self.batch_size <= 65_536, "train.batch_size", "in [1, 65536]", self.batch_size)
        rate = self.learning_rate
        _require(0 < rate <= MAX_LEARNING_RATE, "train.learning_rate", f"in (0, {MAX_LEARNING_RATE:g}]", rate)
        _require(0 <= self.weight_decay < 1, "train.weight_decay", "in [0, 1)", self.weight_decay)
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", "in [0, 1)", self.label_smoothing)
        _require(
            0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", "in [0, train.epochs - 1]", self.warmup_epochs
        )
        _require(1 <= self.ensemble <= MAX_ENSEMBLE, "train.ensemble", f"in [1, {MAX_ENSEMBLE}]", self.ensemble)
        _require_seed("train.seed", self.seed)
        self.plateau.check()
        if self.early_stopping is not None:
            self.early_stopping.check()


@dataclass(frozen=True)
class EvaluateConfig:
    """What the evaluate stage reports."""

    top_k: int = 2
    misclassified: int = 16
    calibration_bins: int = 10

    def check(self) -> None:
        _require(self.top_k >= 1, "evaluate.top_k", ">= 1", self.top_k)
        _require(0 <= self.misclassified <= 100, "evaluate.misclassified", "in [0, 100]", self.misclassified)
        _require(2 <= self.calibration_bins <= 100, "evaluate.calibration_bins", "in [2, 100]", self.calibration_bins)


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking store and experiment; MLFLOW_TRACKING_URI overrides tracking_uri."""

    tracking_uri: str | None = None
    experiment: str = "transferlab"
    log_model: bool = True
    system_metrics: bool = True
    registered_model: str | None = None  # the registry name training runs add versions to; null: none

    def check(self) -> None:
        _require(bool(self.experiment.strip()), "mlflow.experiment", "a non-empty name", self.experiment)
        if self.registered_model is not None:
            # It goes into `models:/<name>@<alias>` URIs: no '/', '@' or spaces.
            ok = bool(_SAFE_NAME.match(self.registered_model))
            _require(
                ok, "mlflow.registered_model", "null or a name of letters, digits, '_', '.', '-'", self.registered_model
            )
        length = len(self.experiment)
        limit = MAX_EXPERIMENT_NAME_LENGTH
        _require(length <= limit, "mlflow.experiment", f"at most {limit} characters long", length)


@dataclass(frozen=True)
class SweepConfig:
    """Multirun behaviour."""

    skip_finished: bool = True
    # Which children log their model to MLflow: only the best one, when the sweep ends (cheap), or every one.
    log_models: Literal["best", "all"] = "best"

    def check(self) -> None:
        """Nothing to range-check; types are checked by `validate`."""


@dataclass(frozen=True)
class MultiWorkerConfig:
    """`train.strategy=multi_worker`: one training over the processes TF_CONFIG lists."""

    join_timeout: float = 600.0  # seconds every worker waits for all the others to start

    def check(self) -> None:
        _require(self.join_timeout > 0, "multi_worker.join_timeout", "> 0 (seconds)", self.join_timeout)


@dataclass(frozen=True)
class Config:
    """The validated, composed configuration of one run."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    multi_worker: MultiWorkerConfig = field(default_factory=MultiWorkerConfig)

    def check(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).check()
        self._check_ensemble()
        for key, value in flatten(self).items():  # each is logged as an MLflow param
            length = len(str(value))
            limit = MAX_PARAM_VALUE_LENGTH
            _require(length <= limit, key, f"at most {limit} characters long (MLflow's limit)", length)

    def _check_ensemble(self) -> None:
        """An ensemble's heads are averaged into one, which needs one frozen backbone they all share."""
        members = self.train.ensemble
        if members == 1:
            return
        if self.finetune.unfreeze != 0:
            raise ConfigError(
                f"train.ensemble={members} averages heads trained on a frozen backbone, but finetune.unfreeze is "
                f"{self.finetune.unfreeze!r}: set train.ensemble=1 to fine-tune"
            )
        if self.train.strategy == "multi_worker":
            raise ConfigError(
                f"train.ensemble={members} cannot train under train.strategy=multi_worker: set train.ensemble=1"
            )

    @property
    def image_size(self) -> int:
        """The size images are decoded to: `data.image_size`, or the backbone's default when null."""
        configured = self.data.image_size
        return configured if configured is not None else BACKBONES[self.model.backbone].default_image_size

    def resolved(self) -> Config:
        """This config with what it leaves to code filled in (`data.image_size`), as a run uses it:
        what its hash and MLflow params describe, since a backbone's default can change between versions."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, image_size=self.image_size))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, as written to params.yaml."""
        return dataclasses.asdict(self)


# Sections whose values change what a training run produces.
TRAINING_SECTIONS = ("data", "model", "augment", "finetune", "train")


def _require(ok: bool, key: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {got!r}")


def _require_seed(key: str, seed: int) -> None:
    _require(0 <= seed <= MAX_SEED, key, f"in [0, {MAX_SEED}] (2**32 - 1)", seed)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be one of {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key} is required")
            continue
        kwargs[f.name] = _coerce(raw[f.name], hints[f.name], key)
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate(raw: Mapping[str, Any]) -> Config:
    """Turn a composed mapping into a checked `Config`, or raise `ConfigError`."""
    cfg = _build(Config, raw, "")
    cfg.check()
    return cfg


def validate_section(name: str, raw: Any) -> Any:
    """Check one top-level section (`mlflow`, ...) on its own, e.g. when the rest of a config is invalid."""
    section = _build(typing.get_type_hints(Config)[name], raw, name)
    section.check()
    return section


def conf_dir() -> Path:
    """`conf/` of the project the working directory is in (it or a folder above it), else of this
    source checkout."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "conf" / f"{CONFIG_NAME}.yaml").is_file():
            return folder / "conf"
    return Path(__file__).resolve().parents[2] / "conf"


def check_overrides(args: Sequence[str], config_dir: Path | None = None) -> None:
    """One `ConfigError` line for a command-line override that names no setting, or no option of
    a config group: `unknown key model.dropuot (known: ...)`, `model=mobilenetv2: no such option
    (available: ...)`, `hydra/launcher=joblibb: no such option (available: basic, joblib, ...)`.

    Hydra says `Could not override 'model.dropuot'` (and several more lines from
    `transferlab-train`) without saying what is known. A group's options are those Hydra would
    find: `conf/<group>/*.yaml` and, for its own groups (`hydra/launcher`, `hydra/sweeper`, ...),
    those of its installed plugins; the project settings' option is not one to choose. Additions
    (`+key=...`), deletions (`~key`), package overrides, Hydra's own settings (`hydra.*`) and
    groups Hydra does not know go to Hydra unchecked; so do values, which validation checks once
    composed.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    directory = (config_dir or conf_dir()).resolve()
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except HydraException as exc:
        raise ConfigError(first_line(exc)) from exc
    repository = None  # Hydra's view of the config search path, built for the first group override
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package or re.match(r"hydra\b(?!/)", key):
            continue
        if key.startswith("hydra/") or (directory / key).is_dir():
            repository = repository or _config_repository(directory)
            _check_options(override, _group_options(repository, key))
        else:
            _check_key(key)


def _config_repository(directory: Path) -> Any:
    """Hydra's config repository for `directory`: its own configs, the plugins' and the project's.

    Built as Hydra builds it for `@hydra.main` (the same search path); the plugin scan it needs is
    done once per process, so Hydra reuses it when it composes.
    """
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path

    return ConfigRepository(create_config_search_path(str(directory)))


def _group_options(repository: Any, group: str) -> list[str]:
    """The options of a config group that a user may choose, sorted (none when Hydra knows no such group)."""
    from hydra.core.object_type import ObjectType

    return [name for name in repository.get_group_options(group, ObjectType.CONFIG) if name != SETTINGS_NAME]


def _check_options(override: Any, options: Sequence[str]) -> None:
    """`ConfigError` when a group override picks an option not in `options`."""
    if not options:  # a group Hydra does not know: its own error says so
        return
    for value in _chosen_options(override):
        if value not in options:
            raise ConfigError(f"{override.key_or_group}={value}: no such option (available: {', '.join(options)})")


def _chosen_options(override: Any) -> list[str]:
    """The option names a group override picks (one, or each of a choice sweep; none for a glob)."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [str(option) for option in value.list]
    return [] if override.is_sweep_override() else [str(value)]


def _check_key(key: str) -> None:
    """`ConfigError` unless the dotted `key` names a setting of the schema (or lies below a free-form value)."""
    tp: Any = Config
    parts = key.split(".")
    for depth, name in enumerate(parts):
        section = next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)
        if section is None:
            if tp is Any or typing.get_origin(tp) in (dict, Mapping):  # free-form: validation judges it
                return
            raise ConfigError(f"unknown key {key}: {'.'.join(parts[:depth])} is a value, not a section")
        hints = typing.get_type_hints(section)
        if name not in hints:
            known = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
            raise ConfigError(f"unknown key {'.'.join(parts[: depth + 1])} (known: {known})")
        tp = hints[name]


def compose_with_choices(
    overrides: Sequence[str] = (), config_dir: Path | None = None, missing_ok: bool = False, resolve: bool = True
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Compose `conf/` with Hydra's compose API (the same composition DVC performs).

    Returns the composed mapping and the option Hydra chose for each config group (`data`, ...).
    A mandatory value left unset (`???`) is an error, unless `missing_ok`. Without `resolve`,
    interpolations (`${data.name}-classifier`) stay as written.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    directory = (config_dir or conf_dir()).resolve()
    check_overrides(overrides, directory)
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            composed = compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=True)
        choices = OmegaConf.to_container(composed.hydra.runtime.choices)
        with open_dict(composed):
            del composed["hydra"]
        raw = OmegaConf.to_container(composed, resolve=resolve, throw_on_missing=not missing_ok)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(first_line(exc)) from exc
    groups = {str(k): v for k, v in typing.cast(dict, choices).items() if not str(k).startswith("hydra/")}
    return typing.cast(dict[str, Any], raw), groups


def compose_raw(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """Compose `conf/` (see `compose_with_choices`)."""
    return compose_with_choices(overrides, config_dir)[0]


def compose(overrides: Sequence[str] = (), config_dir: Path | None = None) -> Config:
    """Compose and validate."""
    return validate(compose_raw(overrides, config_dir))


def from_omegaconf(node: Any) -> Config:
    """Validate a DictConfig handed over by `@hydra.main`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(first_line(exc)) from exc
    return validate(typing.cast(dict[str, Any], raw))


def local_source(source: str, root: Path) -> Path | None:
    """The file or folder `data.source` names on this machine, a relative path taken from `root`
    (where DVC runs the stages); None for `synthetic` and URLs."""
    if source == SYNTHETIC_SOURCE or "://" in source:
        return None
    return (root / Path(source).expanduser()).resolve()


def missing_inputs(cfg: Config, root: Path) -> dict[str, str]:
    """What the pipeline would read from disk and cannot find, by key: `data.source` when it is a
    local path, `model.weights` when it is a file. Empty when both exist (or are not paths).

    Relative paths are taken from `root`, where DVC runs the stages.
    """
    missing = {}
    source = local_source(cfg.data.source, root)
    if source is not None and not source.exists():
        missing["data.source"] = f"data.source {cfg.data.source} does not exist"
    weights = cfg.model.weights
    if weights not in (None, "imagenet") and not (root / Path(weights).expanduser()).is_file():
        missing["model.weights"] = f"model.weights file {weights} does not exist"
    return missing


def load_params(path: Path) -> Config:
    """Read and validate a params.yaml written by `compose` (or by DVC's Hydra integration)."""
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `transferlab compose` to write it")
    return validate(read_yaml(path) or {})


def read_yaml(path: Path) -> Any:
    """A YAML file's content (None when empty), or a `ConfigError` naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {first_line(exc)}") from exc


def dump_yaml(data: Any) -> str:
    """Block-style YAML in the given key order."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_params(cfg: Config, path: Path) -> None:
    """Write the composed config as YAML, atomically."""
    text = "# conf/ composed, with the project settings, by `transferlab compose`. Do not edit: use compose.\n"
    text += dump_yaml(cfg.to_dict())
    atomic.write_text(path, text)


def config_hash(cfg: Config) -> str:
    """Short digest of the sections that determine a training result."""
    resolved = cfg.resolved()
    payload = {name: dataclasses.asdict(getattr(resolved, name)) for name in TRAINING_SECTIONS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"model.dropout": 0.2, ...}` for logging as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(_join(prefix, key), value)
        else:
            flat[prefix] = node

    walk("", cfg.to_dict())
    return flat


def override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and _PLAIN_VALUE.match(value) and value.lower() not in ("null", "true", "false"):
        try:
            float(value)
        except ValueError:
            return value
    return json.dumps(value)
