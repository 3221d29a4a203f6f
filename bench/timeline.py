"""Where a run's time goes, read from the timestamps of the log lines it already writes.

The `transferlab` CLI logs `2026-11-28 13:47:13,883 INFO name: message`; Hydra jobs log
`[2026-11-28 13:48:19,638][name][INFO] - message` and `[...][HYDRA] message`. A breakdown is
the time between consecutive marker lines; a marker that is missing (say the message was
reworded, or the step did not happen) leaves its segment out rather than guessing, and its
time goes to the next segment found.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_CLI = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_HYDRA = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\](?:\[\w+\] -)? (.*)$")

FEATURES = r"computing pooled backbone features|pooled backbone features: cache"
EPOCH = r"^epoch \d+/\d+ \((head|finetune)\)"


@dataclass(frozen=True)
class Marker:
    """A segment's name and the log line that ends it (the last of a run of such lines with `last`)."""

    name: str
    pattern: str
    last: bool = False


# One `transferlab train` run with a frozen backbone.
TRAIN_MARKERS = (
    Marker("start: imports, MLflow run, build model", FEATURES),
    Marker("backbone features, train + val (cold cache)", r"^head: "),
    Marker("fit the head", EPOCH, last=True),
    Marker("save model + training curves", r"wrote .*training_curves\.png"),
    Marker("log MLflow model", r"logged MLflow model"),
    Marker("register model, describe run", r"model \(epoch \d+\) saved to"),
)
# One job of a sweep, from its `#N :` line.
JOB_MARKERS = (
    Marker("start: MLflow run, build model", FEATURES),
    Marker("backbone features, train + val", r"^head: "),
    Marker("fit the head", EPOCH, last=True),
    # The figure worker (figure_workers.py) draws the job's four figures while the next job
    # trains: they follow the job, and their lines come when they are collected. The first job's
    # are drawn in these two segments, in the job's process, while the worker starts.
    Marker("save model, log artifacts, describe run", r"model \(epoch \d+\) saved to"),
    Marker("evaluate: test features", r"test features from the cache"),
    Marker("evaluate: metrics, reports, log to MLflow", r"^test accuracy"),
)
# A two-phase `finetune=top20` run (cut-point cache or images).
FINETUNE_MARKERS = (
    Marker("start: imports, MLflow run, build model", rf"{FEATURES}|^head: "),
    Marker("pooled features (cached path only)", r"^head: "),
    Marker("phase 1: head", EPOCH, last=True),
    Marker("activations at the cut (cached path only)", r"^finetune: "),
    Marker("phase 2: top 20 layers", EPOCH, last=True),
    Marker("save model + curves, log MLflow model", r"model \(epoch \d+\) saved to"),
)


@dataclass(frozen=True)
class Line:
    time: float
    message: str


def read_lines(log_file: Path) -> list[Line]:
    """Timestamped lines of a log, in order."""
    lines = []
    for text in log_file.read_text(errors="replace").splitlines():
        match = _CLI.match(text) or _HYDRA.match(text)
        if match:
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append(Line(stamp, match.group(2).strip()))
    return lines


def _find(lines: Sequence[Line], start: int, marker: Marker) -> int | None:
    found = next((i for i in range(start, len(lines)) if re.search(marker.pattern, lines[i].message)), None)
    if found is None or not marker.last:
        return found
    while found + 1 < len(lines) and re.search(marker.pattern, lines[found + 1].message):
        found += 1
    return found


def segments(lines: Sequence[Line], start: float, end: float, markers: Sequence[Marker]) -> dict[str, float]:
    """Seconds per segment from `start`; the remainder up to `end` is 'finish and exit'."""
    result: dict[str, float] = {}
    previous = start
    cursor = 0
    for marker in markers:
        found = _find(lines, cursor, marker)
        if found is None:
            continue
        result[marker.name] = lines[found].time - previous
        previous, cursor = lines[found].time, found + 1
    result["finish and exit"] = end - previous
    return result


def train_breakdown(log_file: Path, start: float, end: float) -> dict[str, float]:
    """Segments of one `transferlab train` process."""
    return segments(read_lines(log_file), start, end, TRAIN_MARKERS)


def finetune_breakdown(log_file: Path, start: float, end: float) -> dict[str, float]:
    """Segments of one two-phase fine-tuning run."""
    return segments(read_lines(log_file), start, end, FINETUNE_MARKERS)


def phase_epoch_seconds(log_file: Path, phase: str) -> list[float]:
    """Wall time of each epoch of `phase`: from the phase's start line (or the previous epoch's line).

    An epoch's time includes its validation, checkpoint and MLflow logging; the first one
    also traces the train step.
    """
    lines = read_lines(log_file)
    begin = next((i for i, line in enumerate(lines) if line.message.startswith(f"{phase}: ")), None)
    if begin is None:
        return []
    pattern = re.compile(rf"^epoch \d+/\d+ \({phase}\)")
    stamps = [lines[begin].time] + [line.time for line in lines[begin + 1 :] if pattern.match(line.message)]
    return [b - a for a, b in itertools.pairwise(stamps)]


@dataclass(frozen=True)
class SweepBreakdown:
    """A sweep's time: around the jobs, its first job (the feature pass), and each later job."""

    outside: dict[str, float]
    first_job: dict[str, float]
    later_job: dict[str, float]  # mean over the jobs after the first


def sweep_breakdown(log_file: Path, start: float, end: float) -> SweepBreakdown:
    """Per-job segments (first job, mean of the others) and the sweep's own start and end."""
    lines = read_lines(log_file)
    job_starts = [i for i, line in enumerate(lines) if re.match(r"#\d+ :", line.message)]
    if not job_starts:
        return SweepBreakdown({"whole sweep": end - start}, {}, {})
    ends = [i for i in range(job_starts[-1], len(lines)) if lines[i].message.startswith("results: ")]
    last_job_end = ends[0] if ends else len(lines) - 1
    bounds = [*job_starts, last_job_end]
    jobs = []
    for first, after in itertools.pairwise(bounds):
        parts = segments(lines[first + 1 : after + 1], lines[first].time, lines[after].time, JOB_MARKERS)
        between = parts.pop("finish and exit")
        if after != last_job_end:  # the last job's end is the sweep's end
            parts["between jobs: free memory, next job"] = between
        jobs.append(parts)
    later: dict[str, float] = {}
    for name in jobs[0]:
        values = [job[name] for job in jobs[1:] if name in job]
        if values:
            later[name] = statistics.mean(values)
    outside = {
        "start: imports, sweep parent run": lines[job_starts[0]].time - start,
        "end: sweep plot, log + register best model, summary, exit": end - lines[last_job_end].time,
    }
    return SweepBreakdown(outside, jobs[0], later)
