"""Settings the validation split cannot separate, compared on re-splits: `make study-cv`
(README, "How the defaults were chosen").

The study's training and validation photos (1,275 of `flower_photos_dev`; never its test photos)
are pooled and split again, once per seed of `CV_SPLITS`, with the project's own 70/15/15 split,
each re-split in a scratch project of its own. In every re-split, each point of the study runs as
the project's own sweep: training with early stopping and calibration on that re-split's
validation photos, evaluate on its held-out test photos. So every setting is trained and scored
exactly as `transferlab train` would, on 6 held-out sets of 190 photos instead of one of 225, and
two settings are compared on the same photos: the table gives each point's validation accuracy,
held-out accuracy and log loss (means over the re-splits) and in how many re-splits it beat the
defaults. Each re-split trains with its own seed (`train.seed` = the split seed), so the
comparison covers seeds as well.

Every re-split's runs go to one MLflow store, cv/mlruns/ in the study's scratch project (its
experiment `study`). Re-splits and sweeps resume like the study's: an interrupted run skips what
it finished. Splits the study's photos in its scratch project first if `make study` has not.
Writes reports/study_cv.md, .json and .png.

    CV_SPLITS      re-split seeds (default "1 2 3 4 5 6")
    CV_POINTS      the study's points to compare (default: DEFAULT_POINTS, the frozen settings and the
                   fine-tuning presets, about 55 minutes on 2 cores)
    STUDY_WORKDIR  the study's scratch project; the re-splits go to its cv/ folder
    STUDY_DATA, STUDY_WEIGHTS  as for bench/study.py
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from study import (
    DATA_NAME,
    POINTS,
    REPO_ROOT,
    Point,
    base_overrides,
    check_point_names,
    finished_groups,
    prepare,
    run_point,
    scratch_project,
    study_inputs,
    train_and_val,
)

from transferlab import console, tracking
from transferlab.config import MlflowConfig

DEFAULT_POINTS = (
    "defaults adam-head no-power ensemble no-crops test-time-crops no-test-time-flip no-flips smoothing head-bn "
    "weight-decay grid flips resolution finetune finetune-all"
)
POOL_NAME = "flower_photos_cv"
SCORES = ("final_val_accuracy", "test_accuracy", "test_log_loss", "test_ece")
COLUMNS = (
    "point",
    "overrides",
    "re-splits",
    "val acc %",
    "held-out acc %",
    "log loss",
    "ECE",
    "acc vs defaults (points)",
    "re-splits better / worse",
    "log loss vs defaults",
    "re-splits lower / higher",
)
log = logging.getLogger("crossval")


@dataclass
class Setting:
    """One configuration's scores, by re-split seed."""

    point: str
    overrides: str
    scores: dict[str, dict[str, float]]  # split seed -> metric -> value
    config_hashes: set[str]  # of its runs: two settings that are one configuration share them


def resplit_project(workdir: Path, seed: str) -> Path:
    """The scratch project of the re-split with this split seed."""
    return workdir / "cv" / f"split-{seed}"


def pool_photos(workdir: Path) -> Path:
    """The study's training and validation photos as one class-folder tree of links: the re-splits' data.

    Made once: if the study's split has changed since, the re-splits are of other photos, and this
    exits with one line."""
    photos = train_and_val(workdir)
    pool = workdir / "cv" / "pool"
    listing = workdir / "cv" / "pool.txt"
    expected = "\n".join(sorted(photos.paths)) + "\n"
    if listing.is_file() and listing.read_text() != expected:
        sys.exit(f"crossval: {pool} holds another split's photos than the study's: remove {pool.parent} to start again")
    for relative in photos.paths:
        link = pool / relative
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((photos.raw_root / relative).resolve())
    listing.write_text(expected)
    return pool


def shared_store(workdir: Path) -> MlflowConfig:
    """One MLflow store for the runs of every re-split (cv/mlruns/), so that one MLflow UI shows them all.

    Each re-split's own project store would not do: opening a store exports its URI as
    MLFLOW_TRACKING_URI (MLflow's `set_tracking_uri`), which the next re-split's sweeps would inherit.
    A MLFLOW_TRACKING_URI set before the study wins over this one, as it does for every command."""
    database = workdir / "cv" / "mlruns" / "mlflow.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowConfig(experiment="study", tracking_uri=f"sqlite:///{database}")


def run_resplit(workdir: Path, seed: str, points: list[Point], pool: Path, weights: Path) -> None:
    """One re-split's scratch project, split, with every point's sweep run in it (train seed = split seed)."""
    store = f"mlflow.tracking_uri='{shared_store(workdir).tracking_uri}'"
    base = (*base_overrides(pool, POOL_NAME, weights), store, f"data.split_seed={seed}")
    project = resplit_project(workdir, seed)
    prepare(project, base)
    for point in points:
        run_point(project, point, base, [seed])


def collect(workdir: Path, seeds: list[str], points: list[Point]) -> list[Setting]:
    """Every setting's scores in each re-split where its sweep finished it, in the order of the points."""
    settings: dict[tuple[str, str], Setting] = {}
    store = tracking.open_store(shared_store(workdir), workdir)
    for point in points:
        for seed in seeds:
            summary = resplit_project(workdir, seed) / "sweeps" / point.name / "sweep_summary.csv"
            if not summary.is_file():
                continue
            for overrides, runs in finished_groups(point, summary):
                setting = settings.setdefault((point.name, overrides), Setting(point.name, overrides, {}, set()))
                run = store.client.get_run(runs["run_id"].iloc[0]).data
                missing = [name for name in SCORES if name not in run.metrics]
                if missing:
                    log.warning("%s (%s) in re-split %s has no %s: left out", point.name, overrides, seed, missing)
                    continue
                setting.scores[seed] = {name: run.metrics[name] for name in SCORES}
                setting.config_hashes.add(run.tags[tracking.TAG_CONFIG_HASH])
    return _distinct([setting for setting in settings.values() if setting.scores])


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
    """Mean scores over the setting's re-splits, and, over those it shares with the reference, how
    much and how often it beat it on the same photos."""
    seeds = sorted(setting.scores)
    accuracies = [setting.scores[seed]["test_accuracy"] for seed in seeds]
    row: dict[str, object] = {"point": setting.point, "overrides": setting.overrides, "resplits": len(seeds)}
    row |= {name: statistics.mean(setting.scores[seed][name] for seed in seeds) for name in SCORES}
    row["accuracy_sd"] = statistics.stdev(accuracies) if len(seeds) > 1 else 0.0
    if reference is None or reference is setting:
        return row
    pairs = [seed for seed in seeds if seed in reference.scores]
    if not pairs:
        return row
    gains = [setting.scores[s]["test_accuracy"] - reference.scores[s]["test_accuracy"] for s in pairs]
    rises = [setting.scores[s]["test_log_loss"] - reference.scores[s]["test_log_loss"] for s in pairs]
    row |= {
        "pairs": len(pairs),
        "accuracy_gain": statistics.mean(gains),
        "better": sum(g > 0 for g in gains),
        "worse": sum(g < 0 for g in gains),
        "log_loss_change": statistics.mean(rises),
        "log_loss_lower": sum(r < 0 for r in rises),
        "log_loss_higher": sum(r > 0 for r in rises),
    }
    return row


def _cells(row: dict[str, object]) -> list[str]:
    """One row of the markdown table."""
    cells = [
        str(row["point"]),
        f"`{row['overrides']}`",
        str(row["resplits"]),
        f"{100 * row['final_val_accuracy']:.1f}",
        f"{100 * row['test_accuracy']:.1f} ± {100 * row['accuracy_sd']:.1f}",
        f"{row['test_log_loss']:.4f}",
        f"{row['test_ece']:.3f}",
    ]
    if "pairs" not in row:
        return [*cells, "", "", "", ""]
    return [
        *cells,
        f"{100 * row['accuracy_gain']:+.2f}",
        f"{row['better']} / {row['worse']} of {row['pairs']}",
        f"{row['log_loss_change']:+.4f}",
        f"{row['log_loss_lower']} / {row['log_loss_higher']} of {row['pairs']}",
    ]


def plot_against_defaults(settings: list[Setting], reference: Setting, path: Path) -> None:
    """Each setting's held-out accuracy and log loss minus the defaults', a dot per re-split, a bar at the mean."""
    from matplotlib.figure import Figure

    from transferlab.plots import DPI

    others = [setting for setting in settings if setting is not reference]
    fig = Figure(figsize=(11, 0.4 * len(others) + 1.6), layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    metrics = (
        ("test_accuracy", 100, "held-out accuracy - defaults' (points)"),
        ("test_log_loss", 1, "held-out log loss - defaults'"),
    )
    for ax, (metric, scale, title) in zip(panels, metrics, strict=True):
        for row, setting in enumerate(others):
            pairs = [seed for seed in setting.scores if seed in reference.scores]
            changes = [scale * (setting.scores[s][metric] - reference.scores[s][metric]) for s in pairs]
            ax.scatter(changes, [row] * len(changes), s=18, alpha=0.6, color="tab:blue")
            if changes:
                ax.plot([statistics.mean(changes)] * 2, [row - 0.3, row + 0.3], color="black", linewidth=2)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_xlabel(title)
        ax.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(others)), [f"{s.point}: {s.overrides}" for s in others], fontsize=8)
    panels[0].invert_yaxis()
    fig.suptitle("Against the defaults on the same held-out photos: a dot per re-split, a bar at the mean")
    fig.savefig(path, dpi=DPI)


def report(settings: list[Setting]) -> str:
    """The table of every setting against the defaults; also written to reports/study_cv.{md,json}, and
    the differences drawn in reports/study_cv.png."""
    reference = next((s for s in settings if s.point == "defaults"), None)
    if reference is None:
        log.warning("no finished runs of the point `defaults`: nothing to compare the others with")
    rows = [compare(setting, reference) for setting in settings]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    table = "\n".join(lines)
    seeds = sorted({seed for setting in settings for seed in setting.scores})
    reports = REPO_ROOT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "study_cv.json").write_text(json.dumps({"split_seeds": seeds, "settings": rows}, indent=2))
    heading = f"Re-split seeds {', '.join(seeds)}; scores on the held-out photos of each re-split."
    (reports / "study_cv.md").write_text(f"{heading}\n\n{table}\n")
    if reference is not None:
        plot_against_defaults(settings, reference, reports / "study_cv.png")
    return table


def main() -> None:
    console.configure()
    workdir = scratch_project()
    seeds = os.environ.get("CV_SPLITS", "1 2 3 4 5 6").split()
    wanted = os.environ.get("CV_POINTS", DEFAULT_POINTS).split()
    check_point_names(wanted, "crossval")
    points = [point for point in POINTS if point.name in wanted]
    data, weights = study_inputs("crossval")
    prepare(workdir, base_overrides(data, DATA_NAME, weights))  # the study's split, if `make study` has not
    pool = pool_photos(workdir)
    for seed in seeds:
        log.info("re-split %s of %s", seed, seeds)
        run_resplit(workdir, seed, points, pool, weights)
        log.info("scores so far (reports/study_cv.md):\n%s", report(collect(workdir, seeds, points)))


if __name__ == "__main__":
    main()
