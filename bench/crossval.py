"""Settings the validation split cannot separate, compared on re-splits: `make study-cv`
(README, "How the defaults were chosen").

The study's training and validation photos (1,275 of `flower_photos_dev`; never its test photos)
are pooled and split again, once per seed of `CV_SPLITS`, with the project's own 70/15/15 split,
each re-split in a scratch project of its own. In every re-split, each point of the study runs as
the project's own sweep: training with early stopping and calibration on that re-split's
validation photos, evaluate on its held-out test photos. So every setting is trained and scored
exactly as `transferlab train` would, on 6 held-out sets of 190 photos instead of one of 225, and
two settings are compared on the same photos: the table gives each point's held-out accuracy and
log loss (mean over the re-splits) and in how many re-splits it beat the defaults. Each re-split
trains with its own seed (`train.seed` = the split seed), so the comparison covers seeds as well.

Every re-split's runs go to one MLflow store, cv/mlruns/ in the study's scratch project (its
experiment `study`). Re-splits and sweeps resume like the study's: an interrupted run skips what it finished. Needs
`make study` first (its split). Writes reports/study_cv.md and reports/study_cv.json.

    CV_SPLITS      re-split seeds (default "1 2 3 4 5 6")
    CV_POINTS      the study's points to compare (default: the frozen settings of DEFAULT_POINTS and the
                   fine-tuning presets, about 40 minutes on 2 cores)
    STUDY_WORKDIR  the study's scratch project; the re-splits go to its cv/ folder
    STUDY_WEIGHTS  as for bench/study.py
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from study import (
    POINTS,
    REPO_ROOT,
    Point,
    base_overrides,
    check_point_names,
    finished_groups,
    prepare,
    run_point,
    scratch_project,
    study_weights,
    train_and_val,
)

from transferlab import tracking
from transferlab.config import MlflowConfig

DEFAULT_POINTS = "defaults no-test-time-flip no-flips smoothing weight-decay grid flips finetune finetune-all"
POOL_NAME = "flower_photos_cv"
SCORES = ("test_accuracy", "test_log_loss", "test_ece")
log = logging.getLogger("crossval")


@dataclass
class Setting:
    """One configuration's held-out scores, by re-split seed."""

    point: str
    overrides: str
    scores: dict[str, dict[str, float]]  # split seed -> metric -> value
    config_hashes: set[str]  # of its runs: a setting that is another's under other overrides has the same


def pool_photos(workdir: Path) -> Path:
    """The study's training and validation photos as one class-folder tree of links: the re-splits' data."""
    photos = train_and_val(workdir)
    pool = workdir / "cv" / "pool"
    for relative in photos.paths:
        link = pool / relative
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((photos.raw_root / relative).resolve())
    return pool


def shared_store(workdir: Path) -> MlflowConfig:
    """One MLflow store for the runs of every re-split (cv/mlruns/), so that one MLflow UI shows them all.

    Each re-split's own project store would not do: opening a store exports its URI as
    MLFLOW_TRACKING_URI (MLflow's `set_tracking_uri`), which the next re-split's sweeps inherit."""
    database = workdir / "cv" / "mlruns" / "mlflow.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowConfig(experiment="study", tracking_uri=f"sqlite:///{database}")


def run_resplit(workdir: Path, seed: str, points: list[Point], pool: Path, weights: Path) -> Path:
    """One re-split's scratch project, split, with every point's sweep run in it (train seed = split seed)."""
    project = workdir / "cv" / f"split-{seed}"
    store = f"mlflow.tracking_uri='{shared_store(workdir).tracking_uri}'"
    base = (*base_overrides(pool, POOL_NAME, weights), store, f"data.split_seed={seed}")
    prepare(project, base)
    for point in points:
        run_point(project, point, base, [seed])
    return project


def collect(workdir: Path, seeds: list[str], points: list[Point]) -> list[Setting]:
    """Every setting's held-out metrics in each re-split where its sweep finished it."""
    settings: dict[tuple[str, str], Setting] = {}
    store = tracking.open_store(shared_store(workdir), workdir)
    for seed in seeds:
        project = workdir / "cv" / f"split-{seed}"
        for point in points:
            summary = project / "sweeps" / point.name / "sweep_summary.csv"
            if not summary.is_file():
                continue
            for overrides, runs in finished_groups(point, summary):
                setting = settings.setdefault((point.name, overrides), Setting(point.name, overrides, {}, set()))
                run = store.client.get_run(runs["run_id"].iloc[0]).data
                setting.scores[seed] = {name: run.metrics[name] for name in SCORES if name in run.metrics}
                setting.config_hashes.add(run.tags[tracking.TAG_CONFIG_HASH])
    return _distinct(list(settings.values()))


def _distinct(settings: list[Setting]) -> list[Setting]:
    """Settings without the repeats of an earlier one: a point's value that is the defaults' own (the
    same configuration, so the same config hash) is the defaults, trained again."""
    seen: set[str] = set()
    distinct = []
    for setting in settings:
        if not setting.config_hashes & seen:
            seen |= setting.config_hashes
            distinct.append(setting)
    return distinct


def compare(setting: Setting, reference: Setting | None) -> dict[str, object]:
    """Mean scores over the re-splits, and how often the setting beat the reference on the same photos."""

    def mean(name: str, seeds: list[str]) -> float:
        return statistics.mean(setting.scores[seed][name] for seed in seeds)

    seeds = sorted(setting.scores)
    row: dict[str, object] = {"point": setting.point, "overrides": setting.overrides, "resplits": len(seeds)}
    row |= {name: mean(name, seeds) for name in SCORES}
    row["accuracy_sd"] = statistics.stdev(s["test_accuracy"] for s in setting.scores.values()) if len(seeds) > 1 else 0
    shared = [seed for seed in seeds if reference not in (None, setting) and seed in reference.scores]
    if shared and reference is not None:
        gains = [setting.scores[s]["test_accuracy"] - reference.scores[s]["test_accuracy"] for s in shared]
        drops = [reference.scores[s]["test_log_loss"] - setting.scores[s]["test_log_loss"] for s in shared]
        row["accuracy_gain"] = statistics.mean(gains)
        row["log_loss_drop"] = statistics.mean(drops)
        row["wins"] = f"{sum(g > 0 for g in gains)} / {sum(g < 0 for g in gains)}"
        row["log_loss_wins"] = f"{sum(d > 0 for d in drops)} / {sum(d < 0 for d in drops)}"
    return row


def report(settings: list[Setting], seeds: list[str]) -> str:
    """The table of every setting against the defaults; also written to reports/study_cv.{md,json}."""
    reference = next((s for s in settings if s.point == "defaults"), None)
    rows = [compare(setting, reference) for setting in settings]
    lines = [
        "| point | overrides | re-splits | held-out acc % | log loss | ECE | acc vs defaults (points) "
        "| re-splits better / worse | log loss vs defaults | re-splits lower / higher |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        versus = (
            f"{100 * row['accuracy_gain']:+.2f} | {row['wins']} | {-row['log_loss_drop']:+.4f} | {row['log_loss_wins']}"
            if "wins" in row
            else "| | |"
        )
        lines.append(
            f"| {row['point']} | `{row['overrides']}` | {row['resplits']} | "
            f"{100 * row['test_accuracy']:.1f} ± {100 * row['accuracy_sd']:.1f} | {row['test_log_loss']:.4f} | "
            f"{row['test_ece']:.3f} | {versus} |"
        )
    table = "\n".join(lines)
    reports = REPO_ROOT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "study_cv.json").write_text(json.dumps({"split_seeds": seeds, "settings": rows}, indent=2))
    heading = f"Re-split seeds {', '.join(seeds)}; scores on the held-out photos of each re-split."
    (reports / "study_cv.md").write_text(f"{heading}\n\n{table}\n")
    return table


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    workdir = scratch_project()
    seeds = os.environ.get("CV_SPLITS", "1 2 3 4 5 6").split()
    wanted = os.environ.get("CV_POINTS", DEFAULT_POINTS).split()
    check_point_names(wanted, "crossval")
    points = [point for point in POINTS if point.name in wanted]
    weights = study_weights()
    pool = pool_photos(workdir)
    for seed in seeds:
        log.info("re-split %s of %s", seed, seeds)
        run_resplit(workdir, seed, points, pool, weights)
        log.info("held-out scores so far (reports/study_cv.md):\n%s", report(collect(workdir, seeds, points), seeds))


if __name__ == "__main__":
    main()
