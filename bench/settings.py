"""Benchmark settings, read once from `BENCH_*` environment variables.

BENCH_DATA         folder of class folders (default: generate a synthetic set)
BENCH_MODEL        backbone name from transferlab.backbones (default mobilenet_v2)
BENCH_ALPHA        width multiplier (default 0.35 for MobileNet backbones, else none)
BENCH_WEIGHTS      null | imagenet | path to a no-top .h5 file (default null)
BENCH_IMAGE_SIZE   input size in pixels (default 224)
BENCH_REPEATS      rounds of the alternating comparisons, and repetitions of every probe (default 3)
BENCH_QUICK        1: a smoke run of every phase (100 synthetic images, one round, 2-job sweep,
                   2 fine-tuning epochs)
BENCH_WORKDIR      scratch folder (default build/bench; replaced on every run)
BENCH_OUT          where the JSON report goes (default reports/bench.json)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transferlab.backbones import BACKBONES

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 32
SYNTHETIC_CLASSES = 5
SYNTHETIC_IMAGES_PER_CLASS = 60
QUICK_IMAGES_PER_CLASS = 20
SWEEP_JOBS = 8
QUICK_SWEEP_JOBS = 2
# Phase 2 epochs of the fine-tuning comparison: the first traces the train step, the rest are steady.
FINETUNE_EPOCHS = 3
QUICK_FINETUNE_EPOCHS = 2


@dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run depends on; written into bench.json."""

    data: Path | None
    backbone: str
    alpha: float | None
    weights: str | None
    image_size: int
    repeats: int
    sweep_jobs: int
    finetune_epochs: int
    synthetic_images_per_class: int
    quick: bool
    workdir: Path
    out: Path

    @property
    def dataset_label(self) -> str:
        if self.data is None:
            return f"synthetic ({SYNTHETIC_CLASSES} classes x {self.synthetic_images_per_class} JPEGs)"
        return self.data.name

    @property
    def model_label(self) -> str:
        alpha = f" alpha {self.alpha:g}" if self.alpha is not None else ""
        weights = "random init" if self.weights is None else Path(self.weights).name
        return f"{self.backbone}{alpha}, weights {weights}, {self.image_size} px, batch {BATCH_SIZE}"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _weights(raw: str) -> str | None:
    if raw.lower() in ("", "null", "none"):
        return None
    if raw == "imagenet":
        return raw
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"BENCH_WEIGHTS={raw}: no such file")
    return str(path)


def _alpha(raw: str | None, backbone: str) -> float | None:
    if raw is not None and raw.lower() not in ("", "null", "none"):
        return float(raw)
    if raw is None and BACKBONES[backbone].alphas is not None:
        return 0.35
    return None


def _positive_int(env: dict[str, str], name: str, default: int) -> int:
    value = int(env.get(name, default))
    if value < 1:
        raise SystemExit(f"{name} must be >= 1, got {value}")
    return value


def from_env(env: dict[str, str] | None = None) -> BenchSettings:
    """Settings from the environment, checked; exits with a one-line reason on bad values."""
    env = dict(os.environ if env is None else env)
    backbone = env.get("BENCH_MODEL", "mobilenet_v2")
    if backbone not in BACKBONES:
        raise SystemExit(f"BENCH_MODEL must be one of {', '.join(sorted(BACKBONES))}, got {backbone!r}")
    data = Path(env["BENCH_DATA"]).expanduser().resolve() if env.get("BENCH_DATA") else None
    if data is not None and not data.is_dir():
        raise SystemExit(f"BENCH_DATA={data}: not a folder of class folders")
    quick = env.get("BENCH_QUICK", "0") not in ("", "0", "false", "no")
    return BenchSettings(
        data=data,
        backbone=backbone,
        alpha=_alpha(env.get("BENCH_ALPHA"), backbone),
        weights=_weights(env.get("BENCH_WEIGHTS", "null")),
        image_size=_positive_int(env, "BENCH_IMAGE_SIZE", 224),
        repeats=_positive_int(env, "BENCH_REPEATS", 1 if quick else 3),
        sweep_jobs=QUICK_SWEEP_JOBS if quick else SWEEP_JOBS,
        finetune_epochs=QUICK_FINETUNE_EPOCHS if quick else FINETUNE_EPOCHS,
        synthetic_images_per_class=QUICK_IMAGES_PER_CLASS if quick else SYNTHETIC_IMAGES_PER_CLASS,
        quick=quick,
        workdir=Path(env.get("BENCH_WORKDIR", REPO_ROOT / "build" / "bench")).resolve(),
        out=Path(env.get("BENCH_OUT", REPO_ROOT / "reports" / "bench.json")).resolve(),
    )
