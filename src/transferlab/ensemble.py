"""Head ensembles (`train.ensemble: N`): N heads on the one frozen backbone, averaged into one.

Member 0 is the run's own training (seed `train.seed`); members 1 .. N-1 train the same way on
its backbone, each as a run with a seed derived from the run's would: their own cached augmented
views, initial weights, dropout masks, batch order and early stopping. A head is affine in its
features at inference (the pooled features, power-normalised with `model.feature_power`; dropout
is the identity, a head BatchNormalization folds into the Dense layer), so the mean of the
members' logits is the logits of one head whose kernel and bias are the means of theirs: the
saved model is one head, as small and fast as a single member's, and every consumer (evaluate,
predict, export, serving) sees an ordinary model. Calibration and test-time views go in
afterwards, on the averaged head, as for any run.

Each member checkpoints in its own folder inside the run's (`member-<i>/`), so a killed run
resumes inside the member it was training, after restoring the finished ones. Member 0's epochs
are the run's curves, history and `best_epoch`; member i's epochs reach MLflow as
`member_<i>/loss`, `member_<i>/val_accuracy`, ...; and every member's kept epoch and validation
accuracy alone as `member_<i>/best_epoch` and `member_<i>/val_accuracy` (with the saved model's
test-time views, before calibration), beside the run's `final_val_accuracy`.

A member that learned nothing (validation accuracy alone no better than always answering the
most frequent validation class) would only blur the others' logits: it is left out of the mean,
with a warning, unless no member learned anything. `ensemble_heads_averaged` counts the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferlab import tracking
from transferlab.checkpoint import Checkpointer
from transferlab.config import Config
from transferlab.paths import StagePaths

if TYPE_CHECKING:
    from transferlab.model import Classifier
    from transferlab.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One trained head of an ensemble: its logits as an affine map of the pooled features."""

    index: int
    seed: int
    kept_epoch: int
    kernel: np.ndarray
    bias: np.ndarray
    val_accuracy: float = float("nan")  # alone, with the saved model's test-time views, uncalibrated
    averaged: bool = True  # False: it learned nothing, and the saved head leaves it out


def member_seed(seed: int, member: int) -> int:
    """Member 0 trains with the run's seed; member i with one derived from (seed, i)."""
    if member == 0:
        return seed
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def metric_prefix(member: int) -> str:
    """What member i's epoch metrics are called in MLflow after ("" for member 0: the run's own)."""
    return f"member_{member}/" if member else ""


def member_checkpoints(paths: StagePaths, member: int) -> Path:
    """Member i's checkpoint folder, inside the run's (cleared with it)."""
    return paths.checkpoints / f"member-{member}"


def train_ensemble(
    cfg: Config, paths: StagePaths, run: tracking.Run, cfg_hash: str, first: Trainer, classifier: Classifier
) -> tuple[Classifier, list[Member]]:
    """Train members 1 .. N-1 after member 0 (`first`, trained into `classifier`), average every
    member's head into the last classifier's, log each member's scores; return it and the members."""
    from transferlab.model import head_features, set_head_affine
    from transferlab.seeding import seed_everything
    from transferlab.trainer import Trainer

    members = [_capture(first, classifier, 0)]
    trainer, backbone = first, classifier.backbone  # a random-init backbone depends on the seed: one for all
    for index in range(1, cfg.train.ensemble):
        seed = member_seed(cfg.train.seed, index)
        log.info("ensemble member %d of %d (seed %d)", index + 1, cfg.train.ensemble, seed)
        checkpoints = member_checkpoints(paths, index)
        checkpointer = Checkpointer(checkpoints)
        state = checkpointer.load(cfg_hash)
        resumed = state is not None and state.run_id == run.run_id
        if not resumed:
            state = checkpointer.begin(run.run_id, cfg_hash)
        member_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        seed_everything(seed, cfg.train.deterministic)  # as a run with this seed would start
        trainer = Trainer(
            member_cfg,
            paths,
            run,
            state,
            checkpoints=checkpoints,
            metric_prefix=metric_prefix(index),
            backbone=backbone,
        )
        if resumed:
            trainer.log_missing_epochs()
        classifier = trainer.train(resumed=resumed)
        members.append(_capture(trainer, classifier, index))
    labels = np.asarray(trainer.val_set.labels)
    views = [head_features(classifier.head, pooled) for pooled in trainer.validation_features(classifier)]
    members = without_learners_of_nothing(_scored(members, views, labels), labels)
    set_head_affine(classifier.head, *mean_affine(members))
    for member in members:
        name = f"member_{member.index}"
        run.log_metrics({f"{name}/best_epoch": member.kept_epoch, f"{name}/val_accuracy": member.val_accuracy})
    averaged = sum(m.averaged for m in members)
    run.log_metrics({"ensemble_heads_averaged": averaged})
    alone = ", ".join(f"{m.val_accuracy:.4f}" for m in members)
    log.info(
        "ensemble: %d of %d heads averaged into one; validation accuracy of each alone: %s",
        averaged,
        len(members),
        alone,
    )
    return classifier, members


def mean_affine(members: list[Member]) -> tuple[np.ndarray, np.ndarray]:
    """The mean kernel and bias of the members averaged in: one head whose logits are the mean of theirs."""
    averaged = [m for m in members if m.averaged]
    return np.mean([m.kernel for m in averaged], axis=0), np.mean([m.bias for m in averaged], axis=0)


def without_learners_of_nothing(members: list[Member], labels: np.ndarray) -> list[Member]:
    """`members`, those no more accurate alone than always answering the most frequent validation
    class marked as left out of the average (a warning each), unless that would leave none."""
    floor = float(np.bincount(labels).max() / len(labels))
    idle = [m for m in members if m.val_accuracy <= floor]
    if len(idle) == len(members):
        log.warning(
            "no ensemble member beat always answering the most frequent class (validation accuracy %.4f): "
            "all %d are averaged; try more epochs or another learning rate",
            floor,
            len(members),
        )
        return members
    for member in idle:
        log.warning(
            "ensemble member %d (seed %d) learned nothing (validation accuracy %.4f alone, the most frequent "
            "class alone %.4f): left out of the average",
            member.index,
            member.seed,
            member.val_accuracy,
            floor,
        )
    left_out = {m.index for m in idle}
    return [dataclasses.replace(m, averaged=m.index not in left_out) for m in members]


def _capture(trainer: Trainer, classifier: Classifier, index: int) -> Member:
    """A member's trained head, taken before the next member's replaces its weights (`reuse` hands
    every member the same head object)."""
    from transferlab.model import head_affine

    kernel, bias = head_affine(classifier.head)
    return Member(index, trainer.cfg.train.seed, trainer.kept_epoch, kernel, bias)


def _scored(members: list[Member], views: list[np.ndarray], labels: np.ndarray) -> list[Member]:
    """The members with their validation accuracy alone: the mean of their probabilities over the
    saved model's test-time views (`views`: the head's features of the validation images in each)."""
    from transferlab.metrics import mean_probabilities

    def accuracy(member: Member) -> float:
        logits = np.stack([pooled @ member.kernel + member.bias for pooled in views])
        return float(np.mean(mean_probabilities(logits).argmax(axis=1) == np.asarray(labels)))

    return [dataclasses.replace(member, val_accuracy=accuracy(member)) for member in members]
