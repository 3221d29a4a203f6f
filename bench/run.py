"""`make bench`: where transferlab's time goes, and how it compares with the naive recipe.

Measures, on one dataset (synthetic by default, BENCH_DATA=<folder> for real images; all
knobs in bench/settings.py), each phase in a fresh child process:
  1. the split stage's scan throughput;
  2. input pipeline throughput (decode + resize + batch, no model);
  3. backbone forward throughput on in-memory tensors (the ceiling) and fed by the pipeline;
  4. training step throughput: head on cached features, frozen, top-20 and fully unfrozen;
  5. end-to-end `transferlab train` vs the naive recipe (bench/naive.py), 2 and 10 epochs;
  6. an 8-job head-only `transferlab-train -m` sweep vs 8 naive runs;
  7. peak resident memory of every phase's processes.
Comparisons alternate (ours, naive, ours, naive, ...) and every figure is the median of the
repetitions with min and max, because the machine is shared. Prints a table and writes
`reports/bench.json` with every raw sample.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import proc
import timeline
from prepare import Prepared, prepare, sweep_overrides
from report import Results, machine_info, table, write_json
from settings import BenchSettings, from_env

log = logging.getLogger("bench")

PROBES = ("scan", "pipeline", "forward", "train-head", "train-frozen", "train-top20", "train-all")
# BENCH_QUICK skips the two training probes whose code path train-all already exercises.
QUICK_PROBES = ("scan", "pipeline", "forward", "train-head", "train-all")


def declare_rows(results: Results, s: BenchSettings, p: Prepared) -> None:
    """Every row of the table, in order (numbers refer to the issue's list)."""
    rows = [
        ("split_scan", f"1 split stage: scan + check {p.num_images} images", "img/s"),
        ("pipeline_ours", "2 input pipeline, ours: decode + resize + batch", "img/s"),
        ("pipeline_naive", "  same, naive image_dataset_from_directory", "img/s"),
        ("pipeline_cached", "  ours, epochs after the first (uint8 cache in RAM)", "img/s"),
        ("forward_memory", "3 backbone forward, in-memory tensors (ceiling)", "img/s"),
        ("forward_fed", "  backbone forward fed by our input pipeline", "img/s"),
        ("forward_ratio", "  fed / in-memory (aim: >= 90 %)", "fraction"),
        ("train_head", "4 train step: head on cached features (ours)", "img/s"),
        ("train_frozen", "  train step: frozen backbone in the loop (naive)", "img/s"),
        ("train_top20", "  train step: top 20 backbone layers unfrozen", "img/s"),
        ("train_all", "  train step: whole backbone unfrozen", "img/s"),
    ]
    for n in s.epoch_counts:
        first = "5" if n == s.epoch_counts[0] else " "
        rows += [
            (f"ours_{n}_s", f"{first} {n:>2} epochs: ours, transferlab train, cold cache", "s"),
            (f"naive_{n}_s", f"  {n:>2} epochs: naive recipe", "s"),
            (f"ratio_{n}", f"  {n:>2} epochs: ours / naive", "ratio"),
            (f"ours_{n}_acc", f"  {n:>2} epochs: val accuracy, ours", "accuracy"),
            (f"naive_{n}_acc", f"  {n:>2} epochs: val accuracy, naive", "accuracy"),
        ]
    lr, smoothing = p.default_train["learning_rate"], p.default_train["label_smoothing"]
    naive_how = "measured" if s.sweep_naive == "run" else f"{s.sweep_jobs} x the round's naive run"
    rows += [
        ("defaults_s", f"  10 epochs: ours, our defaults (lr {lr:g}, smoothing {smoothing:g}), warm cache", "s"),
        ("defaults_acc", "  10 epochs: val accuracy, ours with our defaults", "accuracy"),
        ("sweep_s", f"6 sweep: {s.sweep_jobs} head-only jobs x 2 epochs, train + evaluate", "s"),
        ("naive_sweep_s", f"  {s.sweep_jobs} naive 2-epoch runs ({naive_how})", "s"),
        ("sweep_ratio", f"  sweep / {s.sweep_jobs} naive runs", "ratio"),
        ("sweep_best_acc", "  sweep: best val accuracy", "accuracy"),
    ]
    for key, label, unit in rows:
        results.declare(key, label, unit)


def record_run(results: Results, name: str, run: proc.ProcessRun, **extra: Any) -> None:
    """Keep every child's wall time and peak RSS for bench.json, and say how it went."""
    results.runs.append(
        {"name": name, "wall_s": round(run.wall_s, 3), "peak_rss_mib": round(run.peak_rss_mib, 1), **extra}
    )
    log.info("%-28s %7.1f s  %6.0f MiB", name, run.wall_s, run.peak_rss_mib)


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


def run_ours(variant: str, round_no: int, s: BenchSettings, p: Prepared, results: Results) -> proc.ProcessRun:
    """`transferlab train --params params-<variant>.yaml` in the e2e project."""
    command = proc.console_script("transferlab", "train", "--params", str(p.params_file(variant)))
    run = proc.run(command, s.workdir / "logs" / f"{variant}-r{round_no}.log", cwd=p.e2e.root)
    accuracy = last_val_accuracy(p.e2e.history)
    record_run(results, f"{variant} r{round_no}", run, val_accuracy=accuracy)
    key = "defaults" if variant == "ours-defaults-10" else variant.replace("-", "_")
    results.add(f"{key}_s", run.wall_s, run.peak_rss_mib)
    results.add(f"{key}_acc", accuracy)
    title = (
        "transferlab train, 10 epochs, our defaults, warm cache"
        if variant == "ours-defaults-10"
        else f"transferlab train, {variant.split('-')[1]} epochs, cold cache"
    )
    results.add_breakdown(title, timeline.train_breakdown(run.log_file, run.started, run.ended))
    return run


def run_naive(epochs: int, name: str, s: BenchSettings, p: Prepared, results: Results) -> tuple[proc.ProcessRun, dict]:
    """bench/naive.py on the same image folder."""
    out = s.workdir / "results" / f"{name}.json"
    args = [str(p.images), "--epochs", str(epochs), "--backbone", s.backbone, "--weights", s.weights or "none"]
    args += ["--image-size", str(s.image_size), "--result", str(out)]
    if s.alpha is not None:
        args += ["--alpha", f"{s.alpha:g}"]
    run = proc.run(proc.python("naive.py", *args), s.workdir / "logs" / f"{name}.log", cwd=s.workdir)
    result = json.loads(out.read_text())
    record_run(results, name, run, val_accuracy=result["val_accuracy"], seconds=result["seconds"])
    return run, result


def naive_breakdown(result: dict, run: proc.ProcessRun) -> dict[str, float]:
    seconds = result["seconds"]
    epochs = seconds["epochs"]
    later = "epoch 2" if len(epochs) == 2 else f"epochs 2..{len(epochs)}"
    parts = {
        "start: import TensorFlow": seconds["import"],
        "datasets + build model": seconds["data_and_model"],
        "epoch 1 (incl. tracing), backbone forward on every image": epochs[0],
        f"{later}, backbone forward on every image again": sum(epochs[1:]),
    }
    parts["finish and exit"] = run.wall_s - sum(parts.values())
    return parts


def run_comparison(epochs: int, round_no: int, s: BenchSettings, p: Prepared, results: Results) -> None:
    """Ours with a cold feature cache, then the naive recipe: one A B pair."""
    clear_feature_caches(p)
    ours = run_ours(f"ours-{epochs}", round_no, s, p, results)
    naive, result = run_naive(epochs, f"naive-{epochs}-r{round_no}", s, p, results)
    results.add(f"naive_{epochs}_s", naive.wall_s, naive.peak_rss_mib)
    results.add(f"naive_{epochs}_acc", result["val_accuracy"])
    results.add(f"ratio_{epochs}", ours.wall_s / naive.wall_s)
    results.add_breakdown(f"naive recipe, {epochs} epochs", naive_breakdown(result, naive))


def run_sweep(round_no: int, s: BenchSettings, p: Prepared, results: Results) -> None:
    """`transferlab-train -m` over the head-only grid, cold cache, against 8 naive runs."""
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
    results.add("sweep_best_acc", max(float(job["val_accuracy"]) for job in finished))
    title = f"sweep of {s.sweep_jobs} jobs, summed over its jobs"
    results.add_breakdown(title, timeline.sweep_breakdown(run.log_file, run.started, run.ended))
    if s.sweep_naive == "run":
        walls = [run_naive(2, f"naive-sweep-{i}-r{round_no}", s, p, results)[0] for i in range(s.sweep_jobs)]
        naive_total, rss = sum(w.wall_s for w in walls), max(w.peak_rss_mib for w in walls)
    else:
        naive_total, rss = s.sweep_jobs * results.figures["naive_2_s"].samples[-1], None
    results.add("naive_sweep_s", naive_total, rss)
    results.add("sweep_ratio", run.wall_s / naive_total)


def run_rounds(s: BenchSettings, p: Prepared, results: Results) -> None:
    """Round r: ours/naive at 2 epochs, at 10 epochs, our defaults (warm cache), maybe a sweep."""
    for round_no in range(1, max(s.repeats, s.sweep_repeats) + 1):
        log.info("round %d", round_no)
        if round_no <= s.repeats:
            for epochs in s.epoch_counts:
                run_comparison(epochs, round_no, s, p, results)
            if not s.quick:
                run_ours("ours-defaults-10", round_no, s, p, results)  # the cache ours-10 just built
        if round_no <= s.sweep_repeats:
            run_sweep(round_no, s, p, results)


def cpu_seconds() -> float:
    """CPU time of the driver and every child it waited for (load-independent, unlike wall time)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def header(
    s: BenchSettings, p: Prepared, machine: dict[str, Any], loads: tuple[float, float], took: float
) -> list[str]:
    sizes = p.split_sizes
    sweep_note = f"sweep: {s.sweep_repeats}" + (" (BENCH_SWEEP_REPEATS)" if s.sweep_repeats < 3 else "")
    return [
        f"transferlab benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {machine['git_commit']}, "
        f"took {took / 60:.1f} min wall, {cpu_seconds() / 60:.1f} min CPU",
        f"model: {s.model_label}",
        f"data: {s.dataset_label}, {p.num_images} images, {p.num_classes} classes; ours and naive both train on "
        f"{sizes['train']} and validate on {sizes['val']} (80/20)",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['machine']}, "
        f"{machine['memory_gib']} GiB; Python {machine['python']}, TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}, MLflow {machine['mlflow']}",
        f"load average (1 min) {loads[0]:.1f} at start, {loads[1]:.1f} at end; repetitions: {s.repeats} "
        f"({sweep_note}), ours and naive alternate",
        "each row: median, min - max over repetitions; ratios are per round; peak RSS: of the phase's process(es)",
        "cold cache: data/cache/features deleted before the run; OS file cache warm for every run",
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
    try:
        for phase in QUICK_PROBES if s.quick else PROBES:
            run_probe(phase, s, p, results)
        run_rounds(s, p, results)
    except proc.PhaseError as exc:
        log.error("%s", exc)
        return 1
    machine = machine_info()
    took = time.time() - started
    text = table(results, header(s, p, machine, (load_start, os.getloadavg()[0]), took))
    print(text)
    context = {
        "settings": s.to_dict(),
        "machine": machine,
        "data": {"images": p.num_images, "classes": p.num_classes, "split": p.split_sizes, "folder": str(p.images)},
        "default_train": p.default_train,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "took_s": round(took, 1),
        "cpu_s": round(cpu_seconds(), 1),
        "table": text,
    }
    write_json(s.out, results, context)
    log.info("wrote %s (%.1f min)", s.out, took / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
