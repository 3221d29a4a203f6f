"""`make bench`: where transferlab's time goes, and how it compares with the published recipe.

Measures, on one dataset (synthetic by default, BENCH_DATA=<folder> for real images; all
knobs in bench/settings.py), each phase in a fresh child process (preparing the projects,
which converts the backbone to TFLite once, runs in this one):
  1. the split stage's scan throughput;
  2. input pipeline throughput (decode + resize + batch, no model);
  3. backbone forward throughput on in-memory tensors (the ceiling) and fed by the pipeline,
     by Keras and by the TFLite copy the feature cache computes with;
  4. training step throughput: head on cached features, frozen, top-20 and fully unfrozen;
then, in rounds that alternate the runs compared (so drift on a shared machine hits both):
  5. one 2-epoch `transferlab train` with the recipe's settings and a cold cache, against
     one run of the recipe itself (bench/naive.py);
  6. an 8-job head-only `transferlab-train -m` sweep (train + evaluate + MLflow per job), cold
     cache, against that same recipe run;
  7. `finetune=top20` phase-2 epochs from the cut-point cache against uncached ones
     (`train.feature_cache=false`), same seed: time per epoch and validation accuracy;
  8. one `transferlab train` with this project's defaults, cold cache (every view of the
     training and validation images is computed);
and the peak resident memory of every phase's processes. Every figure is the median of the
repetitions with min and max; ratios are per round. Prints a table with the issue's targets
and a time breakdown of every kind of run, and writes `reports/bench.json` with every raw
sample and the load average around every process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import proc
import timeline
from prepare import Prepared, prepare, sweep_overrides
from report import Results, Target, machine_info, table, write_json
from settings import BenchSettings, from_env

log = logging.getLogger("bench")

PROBES = ("scan", "pipeline", "forward", "train-head", "train-frozen", "train-top20", "train-all")
# BENCH_QUICK skips the two training probes whose code path train-all already exercises.
QUICK_PROBES = ("scan", "pipeline", "forward", "train-head", "train-all")
# The done-when.
TRAIN_TARGET = Target("at_most", 0.5)
SWEEP_TARGET = Target("at_most", 1.0)
CUT_SPEEDUP_TARGET = Target("at_least", 5.0)
CUT_ACCURACY_TARGET = Target("within", 0.005)


def declare_rows(results: Results, s: BenchSettings, p: Prepared) -> None:
    """Every row of the table, in order (numbers refer to the module docstring)."""
    jobs = s.sweep_jobs
    rows = [
        ("split_scan", f"1 split stage: scan + check {p.num_images} images", "img/s"),
        ("pipeline_ours", "2 input pipeline, ours: decode + resize + batch", "img/s"),
        ("pipeline_naive", "  same, naive image_dataset_from_directory", "img/s"),
        ("pipeline_cached", "  ours, epochs after the first (uint8 cache in RAM)", "img/s"),
        ("forward_memory", "3 backbone forward, in-memory tensors (ceiling)", "img/s"),
        ("forward_fed", "  backbone forward fed by our input pipeline", "img/s"),
        ("forward_ratio", "  fed / in-memory (aim: >= 90 %)", "fraction"),
        ("forward_memory_tflite", "  TFLite copy (what the feature cache runs), in-memory tensors", "img/s"),
        ("forward_fed_tflite", "  TFLite copy fed by our input pipeline", "img/s"),
        ("train_head", "4 train step: head on cached features (ours)", "img/s"),
        ("train_frozen", "  train step: frozen backbone in the loop (naive)", "img/s"),
        ("train_top20", "  train step: top 20 backbone layers unfrozen", "img/s"),
        ("train_all", "  train step: whole backbone unfrozen", "img/s"),
        ("compile_s", "  one-off, in preparation: converting the backbone to TFLite", "s"),
        ("recipe_s", "5 the recipe, 2 epochs (bench/naive.py)", "s"),
        ("ours_2_s", "  transferlab train +experiment=reference (2 epochs), cold cache", "s"),
        ("ratio_train", "  train / recipe", "ratio", TRAIN_TARGET),
        ("recipe_acc", "  val accuracy, recipe", "accuracy"),
        ("ours_2_acc", "  val accuracy, transferlab train", "accuracy"),
        ("sweep_s", f"6 sweep: {jobs} head-only jobs (lr x dropout), 2 epochs, train + evaluate + MLflow", "s"),
        ("sweep_ratio", "  sweep / one recipe run", "ratio", SWEEP_TARGET),
        ("sweep_job_s", "  sweep: mean job after the first", "s"),
        ("sweep_best_acc", "  sweep: best val accuracy", "accuracy"),
        ("cut_epoch_s", f"7 finetune=top20 phase-2 epoch from the cut-point cache (epochs 2-{s.finetune_epochs})", "s"),
        ("images_epoch_s", "  same epoch uncached (train.feature_cache=false)", "s"),
        ("cut_speedup", "  uncached / cut-cache epoch", "ratio", CUT_SPEEDUP_TARGET),
        ("cut_first_epoch_s", "  first phase-2 epoch (traces the step), cut cache", "s"),
        ("images_first_epoch_s", "  first phase-2 epoch (traces the step), uncached", "s"),
        ("cut_build_s", "  one-off: computing the cut-point cache", "s"),
        ("cut_acc", "  val accuracy after phase 2, cut cache", "accuracy"),
        ("images_acc", "  val accuracy after phase 2, uncached", "accuracy"),
        ("cut_acc_diff", "  cut cache - uncached", "points", CUT_ACCURACY_TARGET),
        (
            "defaults_s",
            "8 transferlab train, our defaults (3 training views, 6 validation views), cold cache",
            "s",
        ),
        ("defaults_acc", "  val accuracy, our defaults", "accuracy"),
    ]
    for key, label, unit, *target in rows:
        results.declare(key, label, unit, *target)


def record_run(results: Results, name: str, run: proc.ProcessRun, **extra: Any) -> None:
    """Keep every child's wall time, peak RSS and the load around it for bench.json, and say how it went."""
    results.runs.append(
        {
            "name": name,
            "wall_s": round(run.wall_s, 3),
            "peak_rss_mib": round(run.peak_rss_mib, 1),
            "load_1min": [round(run.load_before, 2), round(run.load_after, 2)],
            **extra,
        }
    )
    log.info("%-28s %7.1f s  %6.0f MiB  load %.1f", name, run.wall_s, run.peak_rss_mib, run.load_after)


def run_probe(phase: str, s: BenchSettings, p: Prepared, results: Results) -> None:
    """One probe process; its samples and its peak RSS go to the probe's figures."""
    out = s.workdir / "results" / f"{phase}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = proc.python(
        "probes.py",
        phase,
        *("--project", str(p.e2e.root), "--params", str(p.params_file("ours-2"))),
        *("--images", str(p.images), "--repeats", str(s.repeats), "--result", str(out)),
    )
    run = proc.run(command, s.workdir / "logs" / f"probe-{phase}.log", cwd=s.workdir)
    data = json.loads(out.read_text())
    record_run(results, f"probe {phase}", run, info=data["info"])
    for key, metric in data["metrics"].items():
        for value in metric["samples"]:
            results.add(key, value)
        results.add_rss(key, run.peak_rss_mib)
    if phase == "forward":
        fed, memory = data["metrics"]["forward_fed"]["samples"], data["metrics"]["forward_memory"]["samples"]
        for f, m in zip(fed, memory, strict=True):
            results.add("forward_ratio", f / m)


def clear_feature_caches(p: Prepared) -> None:
    for folder in p.feature_caches:
        shutil.rmtree(folder, ignore_errors=True)


def last_val_accuracy(history_csv: Path) -> float:
    with history_csv.open() as f:
        return float(list(csv.DictReader(f))[-1]["val_accuracy"])


def run_ours(
    variant: str, round_no: int, s: BenchSettings, p: Prepared, results: Results
) -> tuple[proc.ProcessRun, float]:
    """`transferlab train --params params-<variant>.yaml` in the e2e project; its last val accuracy."""
    command = proc.console_script("transferlab", "train", "--params", str(p.params_file(variant)))
    run = proc.run(command, s.workdir / "logs" / f"{variant}-r{round_no}.log", cwd=p.e2e.root)
    accuracy = last_val_accuracy(p.e2e.history)
    record_run(results, f"{variant} r{round_no}", run, val_accuracy=accuracy)
    return run, accuracy


def run_naive(round_no: int, s: BenchSettings, p: Prepared, results: Results) -> proc.ProcessRun:
    """bench/naive.py, 2 epochs, on the same image folder."""
    name = f"recipe-r{round_no}"
    out = s.workdir / "results" / f"{name}.json"
    args = [str(p.images), "--epochs", "2", "--backbone", s.backbone, "--weights", s.weights or "none"]
    args += ["--image-size", str(s.image_size), "--result", str(out)]
    if s.alpha is not None:
        args += ["--alpha", f"{s.alpha:g}"]
    run = proc.run(proc.python("naive.py", *args), s.workdir / "logs" / f"{name}.log", cwd=s.workdir)
    result = json.loads(out.read_text())
    record_run(results, name, run, val_accuracy=result["val_accuracy"], seconds=result["seconds"])
    results.add("recipe_s", run.wall_s, run.peak_rss_mib)
    results.add("recipe_acc", result["val_accuracy"])
    results.add_breakdown("the recipe, 2 epochs", naive_breakdown(result, run))
    return run


def naive_breakdown(result: dict, run: proc.ProcessRun) -> dict[str, float]:
    seconds = result["seconds"]
    epochs = seconds["epochs"]
    parts = {
        "start: import TensorFlow": seconds["import"],
        "datasets + build model": seconds["data_and_model"],
        "epoch 1 (traces the step), backbone forward on every image": epochs[0],
        "epoch 2, backbone forward on every image again": sum(epochs[1:]),
    }
    parts["finish and exit"] = run.wall_s - sum(parts.values())
    return parts


def run_train(round_no: int, recipe: proc.ProcessRun, s: BenchSettings, p: Prepared, results: Results) -> None:
    """(5) A cold 2-epoch `transferlab train` with the recipe's settings, against this round's recipe run."""
    clear_feature_caches(p)
    run, accuracy = run_ours("ours-2", round_no, s, p, results)
    results.add("ours_2_s", run.wall_s, run.peak_rss_mib)
    results.add("ours_2_acc", accuracy)
    results.add("ratio_train", run.wall_s / recipe.wall_s)
    parts = timeline.train_breakdown(run.log_file, run.started, run.ended)
    results.add_breakdown("transferlab train +experiment=reference, 2 epochs, cold cache", parts)


def run_sweep(round_no: int, recipe: proc.ProcessRun, s: BenchSettings, p: Prepared, results: Results) -> None:
    """(6) `transferlab-train -m` over the head-only grid with a cold cache, against this round's recipe run."""
    clear_feature_caches(p)
    sweep_dir = p.sweep.root / "outputs" / "sweeps" / f"round-{round_no}"
    command = proc.console_script(
        "transferlab-train", "-m", *p.base_overrides, *sweep_overrides(s.sweep_jobs), f"hydra.sweep.dir={sweep_dir}"
    )
    run = proc.run(command, s.workdir / "logs" / f"sweep-r{round_no}.log", cwd=p.sweep.root)
    jobs = [json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/job_result.json"))]
    finished = [job for job in jobs if job.get("status") == "FINISHED"]
    if len(finished) != s.sweep_jobs:
        raise proc.PhaseError(f"sweep finished {len(finished)} of {s.sweep_jobs} jobs; see {run.log_file}")
    record_run(results, f"sweep r{round_no}", run, jobs=[{k: j.get(k) for k in ("job", "duration_s")} for j in jobs])
    results.add("sweep_s", run.wall_s, run.peak_rss_mib)
    results.add("sweep_ratio", run.wall_s / recipe.wall_s)
    results.add("sweep_best_acc", max(float(job["val_accuracy"]) for job in finished))
    parts = timeline.sweep_breakdown(run.log_file, run.started, run.ended)
    if parts.later_job:
        results.add("sweep_job_s", sum(parts.later_job.values()))
    results.add_breakdown(f"sweep of {s.sweep_jobs} jobs, outside its jobs", parts.outside)
    results.add_breakdown("sweep, first job (imports TensorFlow, computes the features)", parts.first_job)
    results.add_breakdown(f"sweep, each later job (mean of jobs 2-{s.sweep_jobs})", parts.later_job)


def run_finetune(round_no: int, s: BenchSettings, p: Prepared, results: Results) -> None:
    """(7) Phase-2 epochs of finetune=top20 from the cut-point cache and uncached; the order alternates by round."""
    order = ("finetune-images", "finetune-cut") if round_no % 2 else ("finetune-cut", "finetune-images")
    steady: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for variant in order:
        key = variant.split("-")[1]
        if key == "cut":
            clear_feature_caches(p)  # the cut run pays for its cache: the one-off cost is reported
        run, accuracy[key] = run_ours(variant, round_no, s, p, results)
        epochs = timeline.phase_epoch_seconds(run.log_file, "finetune")
        if len(epochs) != s.finetune_epochs:
            raise proc.PhaseError(f"{variant}: found {len(epochs)} fine-tuning epochs in {run.log_file}")
        steady[key] = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
        results.add(f"{key}_epoch_s", steady[key], run.peak_rss_mib)
        results.add(f"{key}_first_epoch_s", epochs[0])
        results.add(f"{key}_acc", accuracy[key])
        parts = timeline.finetune_breakdown(run.log_file, run.started, run.ended)
        if key == "cut":
            results.add("cut_build_s", parts.get("activations at the cut (cached path only)", 0.0))
        title = "cut-point cache" if key == "cut" else "uncached (train.feature_cache=false)"
        results.add_breakdown(f"finetune=top20, {title}", parts)
    results.add("cut_speedup", steady["images"] / steady["cut"])
    results.add("cut_acc_diff", accuracy["cut"] - accuracy["images"])


def run_rounds(s: BenchSettings, p: Prepared, results: Results) -> None:
    """Each round: the recipe, our train, the sweep, the fine-tuning pair, our defaults."""
    for round_no in range(1, s.repeats + 1):
        log.info("round %d", round_no)
        recipe = run_naive(round_no, s, p, results)
        run_train(round_no, recipe, s, p, results)
        run_sweep(round_no, recipe, s, p, results)
        run_finetune(round_no, s, p, results)
        clear_feature_caches(p)
        run, accuracy = run_ours("ours-defaults", round_no, s, p, results)
        results.add("defaults_s", run.wall_s, run.peak_rss_mib)
        results.add("defaults_acc", accuracy)


def cpu_seconds() -> float:
    """CPU time of the driver and every child it waited for (load-independent, unlike wall time)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def header(s: BenchSettings, p: Prepared, machine: dict[str, Any], loads: list[float], took: float) -> list[str]:
    sizes = p.split_sizes
    return [
        f"transferlab benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {machine['git_commit']}, "
        f"took {took / 60:.1f} min wall, {cpu_seconds() / 60:.1f} min CPU",
        f"model: {s.model_label}",
        f"data: {s.dataset_label}, {p.num_images} images, {p.num_classes} classes; the recipe and transferlab train "
        f"both train on {sizes['train']} and validate on {sizes['val']} (80/20); the sweep splits 70/15/15",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['machine']}, "
        f"{machine['memory_gib']} GiB; Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}, MLflow {machine['mlflow']}",
        f"load average (1 min) around every process: median {statistics.median(loads):.1f}, "
        f"{min(loads):.1f} - {max(loads):.1f}; rounds: {s.repeats}, the runs compared alternate within each",
        "each row: median, min - max over rounds; ratios are per round; peak RSS: of the phase's process(es)",
        "cold cache: data/cache/features deleted before the run; the backbone's TFLite copy "
        "(data/cache/compiled) kept, as after a project's first run; OS file cache warm for every run",
    ]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Benchmark runs go to the scratch projects' own stores, never to a team MLflow server.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    s = from_env()
    started, load_start = time.time(), os.getloadavg()[0]
    log.info("preparing %s in %s", s.dataset_label, s.workdir)
    p = prepare(s)
    results = Results()
    declare_rows(results, s, p)
    results.add("compile_s", p.compile_s)
    try:
        for phase in QUICK_PROBES if s.quick else PROBES:
            run_probe(phase, s, p, results)
        run_rounds(s, p, results)
    except proc.PhaseError as exc:
        log.error("%s", exc)
        return 1
    machine = machine_info()
    took = time.time() - started
    loads = [load for run in results.runs for load in run["load_1min"]]
    text = table(results, header(s, p, machine, loads, took))
    print(text)
    context = {
        "settings": s.to_dict(),
        "machine": machine,
        "data": {"images": p.num_images, "classes": p.num_classes, "split": p.split_sizes, "folder": str(p.images)},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0], "around_processes": loads},
        "took_s": round(took, 1),
        "cpu_s": round(cpu_seconds(), 1),
        "table": text,
    }
    write_json(s.out, results, context)
    log.info("wrote %s (%.1f min)", s.out, took / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
