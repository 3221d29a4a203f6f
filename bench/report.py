"""Results store, the printed table and `reports/bench.json`.

Every figure is a list of samples (one per repetition); the table shows the median with the
min and max. Ratios are computed per round, from runs that ran next to each other, and the
median of those ratios is shown.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

UNITS = {"img/s": "img/s", "s": "s", "ratio": "x", "fraction": "%", "accuracy": "%", "points": "points"}
# How a target compares the median with its bound: "at_most", "at_least", or "within" (absolute value at most).
TARGET_TESTS = {
    "at_most": (lambda value, bound: value <= bound, "<="),
    "at_least": (lambda value, bound: value >= bound, ">="),
    "within": (lambda value, bound: abs(value) <= bound, "+-"),
}


@dataclass(frozen=True)
class Target:
    """What the median of a figure should reach (the issue's done-when)."""

    test: str  # a key of TARGET_TESTS
    bound: float

    def met(self, value: float) -> bool:
        return TARGET_TESTS[self.test][0](value, self.bound)

    def describe(self, unit: str) -> str:
        return f"{TARGET_TESTS[self.test][1]} {_number(self.bound, unit)}"


@dataclass
class Figure:
    """One measured quantity: its samples, unit and the peak RSS of the processes behind it."""

    label: str
    unit: str
    target: Target | None = None
    samples: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"n": 0}
        median = statistics.median(self.samples)
        result = {"n": len(self.samples), "median": median, "min": min(self.samples), "max": max(self.samples)}
        if self.target is not None:
            result["target"] = self.target.describe(self.unit)
            result["target_met"] = self.target.met(median)
        return result


class Results:
    """Figures by key, in the order they were first recorded, plus breakdowns and notes."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}
        self.breakdowns: dict[str, dict[str, list[float]]] = {}
        self.runs: list[dict[str, Any]] = []

    def declare(self, key: str, label: str, unit: str, target: Target | None = None) -> None:
        """Reserve a row: the table lists figures in the order they were declared."""
        self.figures.setdefault(key, Figure(label, unit, target))

    def add(self, key: str, value: float, rss_mib: float | None = None) -> None:
        """One sample of a declared figure, with the peak RSS of the process that produced it."""
        figure = self.figures[key]
        figure.samples.append(value)
        if rss_mib is not None:
            figure.rss_mib.append(rss_mib)

    def add_rss(self, key: str, mib: float) -> None:
        self.figures[key].rss_mib.append(mib)

    def add_breakdown(self, key: str, parts: dict[str, float]) -> None:
        table = self.breakdowns.setdefault(key, {})
        for name, seconds in parts.items():
            table.setdefault(name, []).append(seconds)

    def median(self, key: str) -> float | None:
        figure = self.figures.get(key)
        return statistics.median(figure.samples) if figure and figure.samples else None


def _number(value: float, unit: str) -> str:
    if unit in ("fraction", "accuracy"):
        return f"{100 * value:.1f}"
    if unit == "points":
        return f"{100 * value:.2f}"
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "s":
        return f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(results: Results, header: Iterable[str]) -> str:
    """The plain-text table: one row per figure, then the time breakdowns."""
    rows = [("measurement", "median", "min - max", "unit", "n", "peak RSS", "target")]
    for figure in results.figures.values():
        s = figure.summary()
        if not s["n"]:
            continue
        spread = f"{_number(s['min'], figure.unit)} - {_number(s['max'], figure.unit)}"
        rss = f"{max(figure.rss_mib):,.0f} MiB" if figure.rss_mib else ""
        target = f"{s['target']}: {'met' if s['target_met'] else 'MISSED'}" if "target" in s else ""
        median = _number(s["median"], figure.unit)
        rows.append((figure.label, median, spread, UNITS[figure.unit], str(s["n"]), rss, target))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [*header, ""]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:-1], widths[1:-1], strict=True))]
        cells.append(row[-1].ljust(widths[-1]))
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    for key, parts in results.breakdowns.items():
        lines += ["", f"where the time goes: {key} (median seconds)"]
        width = max(len(name) for name in parts)
        total = sum(statistics.median(v) for v in parts.values())
        for name, values in parts.items():
            seconds = statistics.median(values)
            share = 100 * seconds / total if total else 0.0
            lines.append(f"  {name.ljust(width)}  {seconds:7.2f}  {share:5.1f} %")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and the versions that matter for the figures."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu") or version("tensorflow"),
        "keras": version("keras"),
        "mlflow": version("mlflow"),
        "hydra": version("hydra-core"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
    }


def _cpu_model() -> str:
    """`model name` from /proc/cpuinfo (what lscpu shows), marked when it is a virtual machine."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    virtual = any(line.startswith("flags") and " hypervisor" in line for line in info)
    return f"{model} (virtual machine)" if virtual else model


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def write_json(path: Path, results: Results, context: dict[str, Any]) -> None:
    """All raw samples, their summaries, breakdowns and every child process run."""
    payload = {
        **context,
        "figures": {
            key: {"label": f.label, "unit": f.unit, **f.summary(), "samples": f.samples, "peak_rss_mib": f.rss_mib}
            for key, f in results.figures.items()
        },
        "breakdowns_s": results.breakdowns,
        "process_runs": results.runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
