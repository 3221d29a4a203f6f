"""What a process that runs many jobs (a sweep) builds once and gives every job back as new.

- The backbone: building a `keras.applications` network costs about half a second of CPU
  (MobileNetV2), as much as training a head on cached features, and every job of a sweep builds
  the same one. ImageNet or file weights set every variable, so the kept network with its
  weights put back is what a fresh build gives. Random-init backbones depend on the seed and
  are always built afresh.
- The head, with what Keras traced for it: a new head's first epoch spends about a second
  tracing its train and validation steps, more than the two epochs of a sweep job take to run.
  A seeded head of the same shape comes back with its variables (weights, BatchNorm statistics,
  dropout's seed state) set to those of a fresh build with the job's seed; compiled the same way
  again (`compile_classifier`), it keeps its traced steps and gets a fresh optimizer state and
  the job's learning rate instead. Everything Keras traces as a constant (dropout rate, optimizer
  kind, weight decay, label smoothing, learning-rate schedule) is part of the keys, so a job
  trains exactly as a new head would. Heads built inside a distribution strategy are not kept.

The caller must be done with the classifiers of the previous job, which share these, and should
call `forget_classifiers` when it is.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab.config import ModelConfig, TrainConfig
from transferlab.model import (
    Classifier,
    build_backbone,
    build_classifier,
    build_head,
    compile_classifier,
    weights_argument,
    weights_digest,
)

if TYPE_CHECKING:
    import keras

# Heads kept at once (one per shape and dropout rate): a sweep over 8 dropout rates reuses them all.
HEADS_KEPT = 8


@dataclass
class _Kept:
    """A model kept for the next job, and how many calls each of its layers (and itself) had
    recorded when it was built (`_calls_recorded`): later calls link it to the jobs' classifiers."""

    model: keras.Model
    node_counts: list[tuple[keras.Operation, int, int]]

    def forget_calls(self) -> None:
        for operation, inbound, outbound in self.node_counts:
            del operation._inbound_nodes[inbound:]
            del operation._outbound_nodes[outbound:]


@dataclass
class _KeptBackbone(_Kept):
    key: tuple[object, ...]
    weights: list[np.ndarray]  # as built
    digest: str  # `weights_digest` of those weights


@dataclass
class _KeptHead(_Kept):
    compiled_as: str | None = None  # the compile settings its traced steps were made with
    optimizer_start: list[np.ndarray] = field(default_factory=list)  # its optimizer's variables, new


_backbone: _KeptBackbone | None = None
_heads: OrderedDict[tuple[object, ...], _KeptHead] = OrderedDict()


def classifier(
    cfg: ModelConfig, num_classes: int, image_size: int, seed: int, backbone: keras.Model | None = None
) -> Classifier:
    """`build_classifier` with the kept backbone and head, when there are such; kept for next time.
    A `backbone` given (the one an ensemble's members share) is used as it is."""
    if backbone is None:
        backbone = _reusable_backbone(cfg, image_size)
    head = _reusable_head(int(backbone.output.shape[-1]), num_classes, cfg, seed)
    return build_classifier(cfg, num_classes, image_size, seed=seed, backbone=backbone, head=head)


def backbone_digest(backbone: keras.Model) -> str:
    """`weights_digest` of a backbone as built: known without hashing when it is the kept one."""
    if _backbone is not None and _backbone.model is backbone:
        return _backbone.digest
    return weights_digest(backbone)


def compile_for_job(
    model: keras.Model, cfg: TrainConfig, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
) -> None:
    """`model.compile_classifier`; a kept head compiled the same way before only gets a new
    optimizer state and `learning_rate`, and keeps the steps Keras traced for it."""
    kept = next((head for head in _heads.values() if head.model is model), None)
    settings = _compile_settings(cfg, learning_rate)
    if kept is not None and kept.compiled_as == settings:
        for variable, value in zip(model.optimizer.variables, kept.optimizer_start, strict=True):
            variable.assign(value)
        if isinstance(learning_rate, (int, float)):
            model.optimizer.learning_rate.assign(learning_rate)
        return
    compile_classifier(model, cfg, learning_rate)
    if kept is not None:
        model.optimizer.build(model.trainable_variables)
        kept.compiled_as, kept.optimizer_start = settings, [np.array(v.numpy()) for v in model.optimizer.variables]


def forget_classifiers() -> None:
    """Cut the kept models' links to the classifiers built on them.

    Keras records every call of a model or layer on it, so the kept backbone and heads would keep
    what each job built on them alive: its classifier, the layers of its calibrated and test-time
    models and, in fine-tuning, its cut models with their optimizer state and traced functions
    (about 12 MB per sweep job). A sweep calls this when a job is done; the records of the kept
    models' own graphs stay.
    """
    for kept in [*([_backbone] if _backbone else []), *_heads.values()]:
        kept.forget_calls()


def _reusable_backbone(cfg: ModelConfig, image_size: int) -> keras.Model:
    global _backbone
    key = _fixed_weights_key(cfg, image_size)
    if key is None:
        return build_backbone(cfg, image_size)
    if _backbone is not None and _backbone.key == key:
        _backbone.model.set_weights(_backbone.weights)
        return _backbone.model
    built = build_backbone(cfg, image_size)
    _backbone = _KeptBackbone(built, _calls_recorded(built), key, built.get_weights(), weights_digest(built))
    return built


def _calls_recorded(model: keras.Model) -> list[tuple[keras.Operation, int, int]]:
    """How many calls `model` and each of its layers have recorded (Keras keeps a node per call)."""
    return [(op, len(op._inbound_nodes), len(op._outbound_nodes)) for op in (model, *model.layers)]


def _fixed_weights_key(cfg: ModelConfig, image_size: int) -> tuple[object, ...] | None:
    """What a backbone with file or ImageNet weights is a function of; None for random init."""
    weights = weights_argument(cfg)
    if weights is None:
        return None
    stamp = None
    if weights != "imagenet":
        stat = Path(weights).stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    return (cfg.backbone, cfg.alpha, weights, stamp, image_size)


def _reusable_head(num_features: int, num_classes: int, cfg: ModelConfig, seed: int) -> keras.Model:
    import keras
    import tensorflow as tf

    fresh = build_head(num_features, num_classes, cfg, seed)
    if tf.distribute.has_strategy():  # its variables belong to this job's strategy
        return fresh
    key = (
        num_features,
        num_classes,
        cfg.feature_power,
        cfg.head_batchnorm,
        cfg.dropout,
        keras.config.dtype_policy().name,
    )
    kept = _heads.get(key)
    if kept is None:
        _heads[key] = _KeptHead(fresh, _calls_recorded(fresh))
        while len(_heads) > HEADS_KEPT:
            _heads.popitem(last=False)
        return fresh
    _heads.move_to_end(key)
    for ours, new in zip(kept.model.variables, fresh.variables, strict=True):
        ours.assign(new)
    return kept.model


def _compile_settings(cfg: TrainConfig, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> str:
    """What of a compile Keras traces as constants (a float learning rate is a variable)."""
    constant = isinstance(learning_rate, (int, float))
    schedule = None if constant else [type(learning_rate).__name__, learning_rate.get_config()]
    return json.dumps([cfg.optimizer, cfg.weight_decay, cfg.label_smoothing, schedule], sort_keys=True, default=str)
