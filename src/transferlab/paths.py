"""Where every stage reads and writes: defined once, used by stages, tests and dvc.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# DVC runs queued and `--temp` experiments in a copy of the repo at <repo>/.dvc/tmp/exps/...
_DVC_TEMP_MARKER = (".dvc", "tmp", "exps")


def project_root(start: Path | None = None) -> Path:
    """The project a command runs in: the working directory (DVC runs stages from the repo root)."""
    return (start or Path.cwd()).resolve()


def tracking_root(start: Path | None = None) -> Path:
    """Where `mlruns/` lives: the project root, or the real repo when DVC runs in a temp copy.

    Experiments queued with `dvc exp run --queue` execute in a throwaway copy of the repo;
    their MLflow runs must land in the repo's own store, not in the copy.
    """
    root = project_root(start)
    parts = root.parts
    for i in range(len(parts) - len(_DVC_TEMP_MARKER) + 1):
        if parts[i : i + len(_DVC_TEMP_MARKER)] == _DVC_TEMP_MARKER:
            return Path(*parts[:i])
    return root


@dataclass(frozen=True)
class StagePaths:
    """The file contract between the source, download, split, train and evaluate stages.

    Data (raw images, splits, caches) lives under `root`; what a training run produces
    (models, reports, checkpoints) under `output_root`, which is `root` for the DVC pipeline
    and the Hydra job folder for `transferlab-train`, so sweep jobs never overwrite each other.
    """

    root: Path
    output_root: Path | None = None

    @property
    def out(self) -> Path:
        return self.output_root if self.output_root is not None else self.root

    @property
    def source_record(self) -> Path:
        """What `data.source` held when last looked at (stages/source.py): the download depends on it."""
        return self.root / "data" / "source.json"

    @property
    def raw_root(self) -> Path:
        return self.root / "data" / "raw"

    def raw_dataset(self, name: str) -> Path:
        return self.raw_root / name

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits"

    def manifest(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    @property
    def classes(self) -> Path:
        return self.splits / "classes.json"

    @property
    def split_report(self) -> Path:
        return self.splits / "report.json"

    @property
    def downloads(self) -> Path:
        """Archives fetched from URLs, kept so a re-run does not fetch them again (a cache, not a DVC output)."""
        return self.root / "data" / "downloads"

    @property
    def cache(self) -> Path:
        """Computed values shared by runs and sweep jobs, rebuilt when missing (not a DVC output)."""
        return self.root / "data" / "cache"

    @property
    def feature_cache(self) -> Path:
        return self.cache / "features"

    @property
    def compiled_models(self) -> Path:
        """TFLite copies of frozen backbone parts (compiled.py), shared by the project's runs."""
        return self.cache / "compiled"

    @property
    def locks(self) -> Path:
        """Lock files: one process at a time per stage and output folder (see locks.py)."""
        return self.out / ".transferlab"

    @property
    def caches(self) -> list[Path]:
        """What stages write besides their declared outputs: caches that only save time, and locks."""
        return [self.downloads, self.cache, self.locks]

    @property
    def models(self) -> Path:
        return self.out / "models"

    @property
    def model_file(self) -> Path:
        return self.models / "model.keras"

    @property
    def run_file(self) -> Path:
        return self.models / "run.json"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def reports(self) -> Path:
        return self.out / "reports"

    @property
    def history(self) -> Path:
        return self.reports / "history.csv"

    @property
    def l2_search(self) -> Path:
        return self.reports / "l2_search.csv"

    @property
    def training_curves(self) -> Path:
        return self.reports / "training_curves.png"

    @property
    def evaluation(self) -> Path:
        """Everything the evaluate stage writes: one folder, replaced as a whole."""
        return self.reports / "evaluation"

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    @property
    def per_class(self) -> Path:
        return self.evaluation / "per_class.csv"

    @property
    def confusion(self) -> Path:
        return self.evaluation / "confusion.csv"

    @property
    def figures(self) -> Path:
        return self.evaluation / "figures"

    @property
    def confusion_figure(self) -> Path:
        return self.figures / "confusion_matrix.png"

    @property
    def misclassified_figure(self) -> Path:
        return self.figures / "misclassified.png"

    @property
    def reliability_figure(self) -> Path:
        return self.figures / "reliability.png"

    def stage_outputs(self) -> dict[str, list[Path]]:
        """What each DVC stage writes; `dvc.yaml` declares exactly these (a test checks it)."""
        return {
            "source": [self.source_record],
            "download": [self.raw_root],
            "split": [self.splits],
            "train": [self.models, self.history, self.l2_search, self.training_curves],
            "evaluate": [
                self.metrics,
                self.per_class,
                self.confusion,
                self.confusion_figure,
                self.misclassified_figure,
                self.reliability_figure,
            ],
        }


SPLITS = ("train", "val", "test")
