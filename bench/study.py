"""The study that chose the defaults: `make study` (README, "How the defaults were chosen").

Each point of the study is one `transferlab-train -m` sweep over the training seeds (the
project's own multirun: an MLflow parent run with a child per seed, train and evaluate per
job) in a scratch project holding the data's 70/15/15 split. Points are chosen on validation
accuracy; the table reports test accuracy and test ECE beside it, as mean ± standard deviation
over the seeds, with the mean wall time of a run (train + evaluate).

A sweep skips the seeds it already finished (`sweep.skip_finished`), so an interrupted study
resumes where it stopped. Writes reports/study.md and reports/study.json, and at the end
reports/study_errors.md and .png: the test photos every run got wrong (`persistent_errors`).

    STUDY_DATA      class folders (default ../shared/data/flower_photos_dev)
    STUDY_WEIGHTS   no-top weights (default ../shared/weights/mobilenet_v2_..._0.35_224_no_top.h5)
    STUDY_SEEDS     training seeds (default "0 1 2")
    STUDY_POINTS    which points to run, by name (default: all, cheapest first)
    STUDY_WORKDIR   the scratch project (default build/study; kept between runs)
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferlab import console, tracking
from transferlab.config import load_params
from transferlab.manifests import Manifest, load_classes, load_manifest
from transferlab.paths import StagePaths

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
DATA_NAME = "flower_photos_dev"  # `data.name` of the study's scratch project, whatever STUDY_DATA holds
BIN = Path(sys.executable).parent
log = logging.getLogger("study")


@dataclass(frozen=True)
class Point:
    """One configuration of the study: a name, what it tests, its overrides of the defaults."""

    name: str
    question: str
    overrides: tuple[str, ...] = ()


# Cheapest first: the frozen-head points share one feature pass; augmented views and
# fine-tuning cost minutes per seed. Points marked "at 224 px" keep the size they were measured
# at before MobileNetV2's default became 288 px.
AT_224 = "data.image_size=224"
# The head as the previous defaults trained it: points about Adam's settings (and the BatchNorm an
# L-BFGS fit leaves as the identity) keep their meaning with these.
ADAM_HEAD = ("train.head_solver=adam", "model.feature_power=1.0")
POINTS = (
    Point("recipe", "the published recipe (BN head, Adam 1e-2, 2 epochs, 224 px)", ("+experiment=reference",)),
    Point(
        "old-defaults",
        "the first defaults (BN head, Adam 5e-3, 10 epochs, last epoch kept, 224 px)",
        (
            AT_224,
            "model.head_batchnorm=true",
            "train.learning_rate=0.005",
            "train.epochs=10",
            "train.early_stopping=null",
            "train.calibrate=false",
            "augment=none",
            "model.test_time_flip=false",
            "model.test_time_crops=1",
        ),
    ),
    Point(
        "defaults",
        "the defaults: frozen, the head fitted by L-BFGS on square-rooted features (L2 chosen on validation), "
        "calibrated, 288 px, 3 cached flipped views at the 3 squares along the long side, test-time flipping and "
        "3 crops",
    ),
    Point(
        "ensemble",
        "3 heads of different seeds (each with its own cached views) averaged into the saved one",
        ("train.ensemble=3",),
    ),
    Point(
        "adam-head",
        "the previous defaults: the head stepped by Adam 1e-3 with early stopping, no power normalisation",
        ADAM_HEAD,
    ),
    Point(
        "no-power",
        "the L-BFGS head on the pooled features as they are (no power normalisation)",
        ("model.feature_power=1.0",),
    ),
    Point(
        "no-crops",
        "the previous defaults: central squares only (2 cached flipped views, no test-time crops)",
        ("model.test_time_crops=1", "augment.crops=1", "augment.cached_views=2"),
    ),
    Point("no-test-time-flip", "the defaults without test-time flipping", ("model.test_time_flip=false",)),
    Point(
        "test-time-crops",
        "2 or 3 test-time crops on the previous defaults (cached views of central squares only)",
        ("augment.crops=1", "augment.cached_views=2", "model.test_time_crops=2,3"),
    ),
    Point(
        "no-flips",
        "the defaults without flips (the 3 cached views at the squares, unflipped)",
        ("augment=none", "augment.crops=3", "augment.cached_views=3"),
    ),
    Point("uncalibrated", "what temperature scaling buys", ("train.calibrate=false",)),
    Point("smoothing", "label smoothing 0.1 on the defaults", ("train.label_smoothing=0.1",)),
    Point(
        "head-bn",
        "the recipe's BatchNorm in the Adam head of the previous defaults",
        (*ADAM_HEAD, "model.head_batchnorm=true"),
    ),
    Point(
        "weight-decay",
        "AdamW's decoupled weight decay on the Adam head of the previous defaults",
        (*ADAM_HEAD, "train.optimizer=adamw", "train.weight_decay=0.01,0.1"),
    ),
    Point(
        "grid",
        "dropout x learning rate around the Adam head of the previous defaults",
        (*ADAM_HEAD, "model.dropout=0.2,0.5", "train.learning_rate=0.0003,0.001,0.003"),
    ),
    Point(
        "flips",
        "more cached flipped views, taken in turn at the 3 squares (K = 3 is the defaults)",
        ("augment.cached_views=6,9",),
    ),
    Point(
        "flips-central",
        "more cached flipped views on the previous defaults (central squares only; K = 2 is theirs)",
        ("model.test_time_crops=1", "augment.crops=1", "augment.cached_views=4,8"),
    ),
    Point(
        "resolution",
        "the defaults at other input sizes (288 px is the defaults; 224 px the weights' own)",
        ("data.image_size=224,256,320",),
    ),
    Point(
        "finetune",
        "the fine-tuning presets on the defaults (3 cached flipped views at the cut, one per square, 288 px)",
        ("finetune=top20,top60",),
    ),
    Point(
        "finetune-lr",
        "top60 on the defaults at 3 and 10 times the preset's fine-tuning rate of 1e-4",
        ("finetune=top60", "finetune.learning_rate=0.0003,0.001"),
    ),
    Point(
        "finetune-all",
        "the whole backbone fine-tuned on the defaults (no cut to cache at: fresh flips every epoch)",
        ("finetune=all",),
    ),
    Point(
        "finetune-strong",
        "the whole backbone fine-tuned for at most 20 epochs on fresh strong augmentation (flips, rotation, zoom, "
        "shifts, contrast), after a head trained on 10 cached strong views at the 3 squares",
        ("finetune=all", "finetune.epochs=20", "augment=strong", "augment.crops=3"),
    ),
    Point("views", "augment=light: 10 cached augmented views per image, at 224 px", (AT_224, "augment=light")),
    Point(
        "top60",
        "fine-tune the top 60 layers at the cut (Adam 3e-4), 10 cached views, at 224 px",
        (AT_224, "finetune=top60", "finetune.learning_rate=0.0003", "augment=light"),
    ),
    Point(
        "top20",
        "fine-tune the top 20 layers at the cut, 10 cached views, at 224 px",
        (AT_224, "finetune=top20", "augment=light"),
    ),
    Point(
        "low-lr",
        "top60 with 10 cached views at 10-30x lower fine-tuning rates than its 3e-4, at 224 px",
        (AT_224, "finetune=top60", "augment=light", "finetune.learning_rate=0.00001,0.00003"),
    ),
    Point(
        "low-lr-plain",
        "fine-tuning the top 60 layers or all of them at low rates, no augmentation, at 224 px",
        (AT_224, "augment=none", "finetune=top60,all", "finetune.learning_rate=0.00001,0.00003"),
    ),
    Point(
        "fresh",
        "augment=light with fresh augmentations each epoch (uncached), at 224 px",
        (AT_224, "augment=light", "augment.cached_views=0"),
    ),
)


def main() -> None:
    console.configure()  # also keeps MLflow's progress bars off (one per report it reads back)
    data, weights = study_inputs("study")
    seeds = os.environ.get("STUDY_SEEDS", "0 1 2").split()
    wanted = os.environ.get("STUDY_POINTS", "").split()
    workdir = scratch_project()
    check_point_names(wanted, "study")
    base = base_overrides(data, DATA_NAME, weights)
    prepare(workdir, base)
    for point in POINTS:
        if not wanted or point.name in wanted:
            run_point(workdir, point, base, seeds)
            _report(workdir, seeds, data)
    _errors_report(workdir)


def study_inputs(command: str) -> tuple[Path, Path]:
    """The study's photos and backbone weights (`STUDY_DATA`, `STUDY_WEIGHTS`, else ../shared's);
    exits with one line if either is missing."""
    data = Path(os.environ.get("STUDY_DATA", SHARED / "data" / DATA_NAME)).resolve()
    weights = Path(os.environ.get("STUDY_WEIGHTS", SHARED / "weights" / WEIGHTS_FILE)).resolve()
    for path in (data, weights):
        if not path.exists():
            sys.exit(f"{command}: {path} not found (set STUDY_DATA / STUDY_WEIGHTS)")
    return data, weights


def check_point_names(wanted: list[str], command: str) -> None:
    """Exit with one line when a wanted point is not one of the study's."""
    unknown = set(wanted) - {point.name for point in POINTS}
    if unknown:
        sys.exit(f"{command}: unknown points {sorted(unknown)}; known: {[point.name for point in POINTS]}")


def base_overrides(data: Path, name: str, weights: Path) -> tuple[str, ...]:
    """What every run of the study overrides: its data, MobileNetV2-0.35 with the given weights, MLflow."""
    return (
        "data=folder",
        f"data.source='{data}'",
        f"data.name={name}",
        "model=mobilenet_v2",
        "model.alpha=0.35",
        f"model.weights='{weights}'",
        "mlflow.experiment=study",
        "mlflow.system_metrics=false",
    )


def scratch_project() -> Path:
    """The study's scratch project: `STUDY_WORKDIR`, else build/study."""
    return Path(os.environ.get("STUDY_WORKDIR", REPO_ROOT / "build" / "study")).resolve()


def train_and_val(workdir: Path) -> Manifest:
    """The training and validation photos of the study's split as one manifest (never its test photos)."""
    train, val = (split_manifest(workdir, name) for name in ("train", "val"))
    return Manifest(train.raw_root, train.paths + val.paths, train.labels + val.labels, train.classes)


def split_manifest(workdir: Path, split: str) -> Manifest:
    """One split of the study's scratch project."""
    paths = StagePaths(workdir)
    if not paths.classes.is_file():
        sys.exit(f"{paths.classes} not found: run `make study` first (it splits the data)")
    raw = paths.raw_dataset(load_params(workdir / "params.yaml").data.name)
    return load_manifest(paths.manifest(split), raw, load_classes(paths.classes))


def prepare(workdir: Path, base: tuple[str, ...]) -> None:
    """The scratch project: its params.yaml, data copied in and split (once)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "data" / "splits" / "test.csv").is_file():
        return
    from transferlab.config import compose, write_params

    write_params(compose(list(base), REPO_ROOT / "conf"), workdir / "params.yaml")
    for stage in ("download", "split"):
        subprocess.run([BIN / "transferlab", stage], cwd=workdir, check=True)


def run_point(workdir: Path, point: Point, base: tuple[str, ...], seeds: list[str]) -> None:
    """The point's sweep over the seeds in `workdir` (sweeps/<point>/); a failing job is the sweep's to report."""
    overrides = [*base, *point.overrides, f"train.seed={','.join(seeds)}"]
    log.info("point %s: %s", point.name, point.question)
    sweep_dir = f"hydra.sweep.dir={workdir / 'sweeps' / point.name}"
    subprocess.run([BIN / "transferlab-train", "-m", *overrides, sweep_dir], cwd=workdir, check=False)


def finished_groups(point: Point, summary_csv: Path) -> list[tuple[str, pd.DataFrame]]:
    """The finished runs of a point's sweep, grouped by the values it swept (seeds aside): one group
    for most points, each with all the overrides that make it, as text."""
    from transferlab.sweep_bookkeeping import SUMMARY_COLUMNS

    table = pd.read_csv(summary_csv)
    swept = [key for key in table.columns[1 : table.columns.get_loc(SUMMARY_COLUMNS[1])] if key != "train.seed"]
    done = table[table["status"].isin(["FINISHED", "SKIPPED"])]
    if not swept:
        return [(" ".join(point.overrides) or "(none)", done)]
    fixed = [override for override in point.overrides if override.split("=")[0] not in swept]
    return [
        (" ".join([*fixed, *(f"{k}={v}" for k, v in zip(swept, values, strict=True))]), group)
        for values, group in done.groupby(swept, sort=True)
    ]


def _summarise(workdir: Path, point: Point, summary_csv: Path) -> list[dict]:
    """One row per combination of the point's swept values (one row for most points), over the seeds."""
    from transferlab.config import MlflowConfig

    store = tracking.open_store(MlflowConfig(experiment="study"), workdir)
    return [_row(store, point, overrides, runs) for overrides, runs in finished_groups(point, summary_csv)]


def _row(store: tracking.Store, point: Point, overrides: str, runs: pd.DataFrame) -> dict:
    metrics = [store.run(run_id).metrics() for run_id in runs["run_id"]]
    # A resumed sweep's table times the seeds it skipped at about zero: theirs come from their runs.
    seconds = [
        row.duration_s if row.status == "FINISHED" else _run_seconds(store, row.run_id) for row in runs.itertuples()
    ]

    def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
        values = [v * scale for v in values if v == v]
        if not values:
            return "n/a"
        deviation = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {deviation:.{digits}f}"

    return {
        "point": point.name,
        "question": point.question,
        "overrides": overrides,
        "runs": len(runs),
        "val_accuracy": spread([m.get("final_val_accuracy", float("nan")) for m in metrics], 100),
        "test_accuracy": spread([m.get("test_accuracy", float("nan")) for m in metrics], 100),
        "test_ece": spread([m.get("test_ece", float("nan")) for m in metrics], digits=3),
        "best_epoch": spread([m.get("best_epoch", float("nan")) for m in metrics]),
        "wall_time_s": spread(seconds, digits=0),
    }


def _run_seconds(store: tracking.Store, run_id: str) -> float:
    info = store.client.get_run(run_id).info
    return (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")


def _summaries(workdir: Path) -> list[tuple[Point, Path]]:
    """The points with a finished sweep, this run's or an earlier one's, and their summary tables."""
    summaries = [(point, workdir / "sweeps" / point.name / "sweep_summary.csv") for point in POINTS]
    return [(point, summary) for point, summary in summaries if summary.is_file()]


def _report(workdir: Path, seeds: list[str], data: Path) -> None:
    """The table of every point with a finished sweep."""
    rows = [row for point, summary in _summaries(workdir) for row in _summarise(workdir, point, summary)]
    reports = REPO_ROOT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "study.json").write_text(json.dumps({"data": str(data), "seeds": seeds, "points": rows}, indent=2))
    columns = ["point", "configuration (overrides of the defaults)", "val acc %", "test acc %", "test ECE"]
    header = "| " + " | ".join([*columns, "best epoch", "s per run"]) + " |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['point']} | {row['question']} (`{row['overrides']}`) | {row['val_accuracy']} | "
            f"{row['test_accuracy']} | {row['test_ece']} | {row['best_epoch']} | {row['wall_time_s']} |"
        )
    table = "\n".join(lines)
    (reports / "study.md").write_text(f"Seeds {', '.join(seeds)} on {data.name}; mean ± std.\n\n{table}\n")
    log.info("study table (reports/study.md):\n%s", table)


def _errors_report(workdir: Path) -> None:
    """reports/study_errors.md and .png: the test photos that every finished run of the study got wrong."""
    from transferlab.config import MlflowConfig
    from transferlab.persistent_errors import read_test_predictions, write_report

    groups = {
        f"{point.name} (`{overrides}`)": list(runs["run_id"])
        for point, summary in _summaries(workdir)
        for overrides, runs in finished_groups(point, summary)
    }
    store = tracking.open_store(MlflowConfig(experiment="study"), workdir)
    run_ids = [run_id for ids in groups.values() for run_id in ids]
    if not run_ids:
        log.info("no finished runs: no report of test photos every run got wrong")
        return
    predictions = read_test_predictions(store, run_ids, split_manifest(workdir, "test"))
    write_report(predictions, groups, REPO_ROOT / "reports" / "study_errors.md")


if __name__ == "__main__":
    main()
