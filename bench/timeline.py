"""Where a run's time goes, read from the timestamps of the log lines it already writes.

The `transferlab` CLI logs `2026-11-28 13:47:13,883 INFO name: message`; Hydra jobs log
`[2026-11-28 13:48:19,638][name][INFO] - message` and `[...][HYDRA] message`. A breakdown is
the time between consecutive marker lines; a marker that is missing (say the message was
reworded) leaves its segment out rather than guessing.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_CLI = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_HYDRA = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\](?:\[\w+\] -)? (.*)$")

# (segment name, regex of the log line that ENDS it) for one `transferlab train` run.
TRAIN_MARKERS = (
    ("start: imports, MLflow run, build model", r"computing backbone features|feature cache hit"),
    ("backbone features (~0 s when the cache is warm)", r"^head: .*epochs"),
    ("fit head + save model + curves", r"wrote .*training_curves\.png"),
    ("log MLflow model (signature check)", r"model saved to"),
)
# For each sweep job: the segments between its `#N :` line and the next job's.
JOB_MARKERS = (
    ("start: MLflow run, build model", r"computing backbone features|feature cache hit"),
    ("backbone features (first job only)", r"^head: .*epochs"),
    ("fit head + save model + curves", r"wrote .*training_curves\.png"),
    ("log MLflow model (signature check)", r"model saved to"),
    ("end run, load model for evaluate", r"evaluating .* test images"),
    ("evaluate: predict, metrics, 3 plots, log", r"test accuracy"),
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


def segments(lines: Sequence[Line], start: float, end: float, markers: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Seconds per segment from `start`; the remainder up to `end` is 'finish and exit'."""
    result: dict[str, float] = {}
    previous = start
    cursor = 0
    for name, pattern in markers:
        found = next((i for i in range(cursor, len(lines)) if re.search(pattern, lines[i].message)), None)
        if found is None:
            continue
        result[name] = lines[found].time - previous
        previous, cursor = lines[found].time, found + 1
    result["finish and exit"] = end - previous
    return result


def train_breakdown(log_file: Path, start: float, end: float) -> dict[str, float]:
    """Segments of one `transferlab train` process."""
    return segments(read_lines(log_file), start, end, TRAIN_MARKERS)


def sweep_breakdown(log_file: Path, start: float, end: float) -> dict[str, float]:
    """Sweep start-up, per-segment totals over all jobs, and the closing summary."""
    lines = read_lines(log_file)
    job_starts = [i for i, line in enumerate(lines) if re.match(r"#\d+ :", line.message)]
    if not job_starts:
        return {"whole sweep": end - start}
    summary = next((i for i in range(job_starts[-1], len(lines)) if "sweep summary" in lines[i].message), None)
    closing = lines[summary].time if summary is not None else end
    totals: dict[str, float] = {"start: imports, parent run": lines[job_starts[0]].time - start}
    bounds = [*job_starts, summary if summary is not None else len(lines)]
    for first, after in itertools.pairwise(bounds):
        job_end = lines[after].time if after < len(lines) else closing
        for name, seconds in segments(lines[first + 1 : after], lines[first].time, job_end, JOB_MARKERS).items():
            key = "between jobs: free memory, next job" if name == "finish and exit" else name
            totals[key] = totals.get(key, 0.0) + seconds
    totals["sweep summary and exit"] = end - closing
    return totals
