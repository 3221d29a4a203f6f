"""DVC commands as this project runs them: `transferlab repro` (`make run`) and `transferlab exps` (`make exps`).

Both run DVC's own command line in this process, with its terminal output (progress, colours)
untouched:
- `repro` is `dvc repro ARGS`, once the input paths the params file names exist
  (`refuse_missing_inputs`: DVC would remove a stage's outputs before that stage failed);
  without the closing "Use `dvc push` ..." hint when the project has no DVC remote to push to
  (DVC prints it after every run that changed something); with evaluate's closing line,
  where the results are, when DVC skipped that stage (unchanged, or restored from its run cache)
  rather than ran it; and, when a stage stops on bad input (its one line printed, status 2),
  without DVC's "ERROR: failed to reproduce ..." line after it, exiting 2 as the stage did;
- `exps` is `dvc exp show ARGS` narrowed to what tells experiments apart: the params that differ
  between them, test accuracy, macro F1, ECE and the MLflow run id (`--only-changed` alone also
  keeps every dependency hash and every other metric).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferlab.config import Config
    from transferlab.paths import StagePaths

log = logging.getLogger(__name__)

PUSH_HINT = "Use `dvc push`"
EVALUATE_STAGE = "evaluate"  # the stage of dvc.yaml whose last line says where the results are
# Columns of `transferlab exps`: --keep wins over --drop and over --only-changed.
EXPS_COLUMNS = (
    "--only-changed",
    "--drop",
    "test_|final_|data/|src/|models/",  # other metrics; dependency hashes (data/raw, src/..., models/...)
    "--keep",
    "test_accuracy$|test_macro_f1$|test_ece$|mlflow_run_id$",
    "--sort-by",
    "test_accuracy",
    "--sort-order",
    "desc",
)


def _dvc(args: Sequence[str]) -> int:
    from dvc.cli import main

    for name in ("dvc", "dvc_objects", "dvc_data"):  # DVC formats its own log lines
        logging.getLogger(name).propagate = False
    return int(main(list(args)) or 0)


def has_remote() -> bool:
    """True when the DVC project in the working directory has a remote configured."""
    from dvc.config import Config

    try:
        return bool(Config.from_cwd().get("remote"))
    except Exception:  # not a DVC project: `dvc repro` itself says so
        return False


class StageSkipped(logging.Handler):
    """Tells, from DVC's log lines, whether `dvc repro` skipped a stage rather than ran it:
    "Stage 'x' didn't change, skipping", "Stage 'x' is cached - skipping run, ..." (its outputs
    restored from the run cache), or "Running stage 'x':" (also after the latter with `--dry`)."""

    def __init__(self, stage: str) -> None:
        super().__init__(logging.INFO)
        self.stage = stage
        self.skipped = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message == f"Running stage '{self.stage}':":
            self.skipped = False
        elif message.startswith(f"Stage '{self.stage}' ") and "skipping" in message:
            self.skipped = True


class StageReportedError(logging.Filter):
    """Drops DVC's closing error when `dvc repro` stopped because a stage exited with the status of
    bad input (`errors.EXIT_USER_ERROR`): that stage already printed its one line. Any other
    failure (another status, several stages under `--keep-going`, DVC's own errors) stays."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        from dvc.exceptions import ReproductionError
        from dvc.stage.exceptions import StageCmdFailedError

        from transferlab.errors import EXIT_USER_ERROR

        error = record.exc_info[1] if record.exc_info else None
        cause = error.__cause__ if isinstance(error, ReproductionError) else None
        if isinstance(cause, StageCmdFailedError) and str(cause).endswith(f", exited with {EXIT_USER_ERROR}"):
            self.seen = True
            return False
        return True


def _log_results() -> None:
    """Evaluate's closing line, from the files it left (none without `models/run.json`, which
    `dvc repro --allow-missing` may leave missing)."""
    from transferlab.paths import StagePaths, project_root
    from transferlab.tracking import RunRecord, results_line

    paths = StagePaths(project_root())
    if paths.run_file.is_file():
        log.info("%s", results_line(paths, RunRecord.read(paths.run_file)))


def repro(args: Sequence[str]) -> int:
    """`dvc repro ARGS`; the `dvc push` hint only when there is a remote to push to; where the
    results are also when DVC did not run the evaluate stage, whose last line says it; status 2,
    without DVC's error line, when a stage stopped on bad input (`StageReportedError`)."""
    import dvc.logger  # noqa: F401 (importing DVC sets up the log handlers filtered below)

    evaluate, reported = StageSkipped(EVALUATE_STAGE), StageReportedError()
    dvc_log = logging.getLogger("dvc")
    handlers = list(dvc_log.handlers)
    dvc_log.addHandler(evaluate)
    for handler in handlers:
        handler.addFilter(reported)
    try:
        status = _reproduce(args)
    finally:
        dvc_log.removeHandler(evaluate)
        for handler in handlers:
            handler.removeFilter(reported)
    if status == 0 and evaluate.skipped:
        _log_results()
    if status and reported.seen:
        from transferlab.errors import EXIT_USER_ERROR

        return EXIT_USER_ERROR
    return status


def _reproduce(args: Sequence[str]) -> int:
    """`dvc repro ARGS`, without the `dvc push` hint when there is no remote to push to."""
    if not has_remote():
        from dvc.ui import ui

        write = ui.write

        def write_without_push_hint(*objects: Any, **kwargs: Any) -> None:
            if not (objects and str(objects[0]).startswith(PUSH_HINT)):
                write(*objects, **kwargs)

        ui.write = write_without_push_hint  # type: ignore[method-assign]
    return _dvc(["repro", *args])


def missing_inputs_for_repro(cfg: Config, paths: StagePaths) -> dict[str, str]:
    """The input paths of `cfg` that do not exist, by key (`config.missing_inputs`), but for a
    `data.source` that a clone without it does not need: the source stage keeps using the
    `data/raw/` it pulled (`stages.source.uses_pulled_data`), or says to pull it."""
    from transferlab.config import missing_inputs
    from transferlab.stages.source import needs_pull, not_pulled, uses_pulled_data

    missing = missing_inputs(cfg, paths.root)
    if "data.source" in missing and uses_pulled_data(cfg, paths):
        del missing["data.source"]
    elif "data.source" in missing and needs_pull(cfg, paths):
        missing["data.source"] = not_pulled(cfg, paths)
    return missing


def refuse_missing_inputs(params: Path, paths: StagePaths) -> None:
    """Stop before `dvc repro` when `params` names an input path that does not exist: DVC would
    remove the outputs of the stage that needs it before that stage failed."""
    from transferlab.config import load_params
    from transferlab.errors import ConfigError

    if not params.is_file():
        return
    for message in missing_inputs_for_repro(load_params(params), paths).values():
        raise ConfigError(f"{message}: no stage was run (set it with `transferlab compose`)")


def show_experiments(args: Sequence[str]) -> int:
    """`dvc exp show` with the readable columns (EXPS_COLUMNS), plus ARGS (`--md`, `-A`, ...)."""
    return _dvc(["exp", "show", *EXPS_COLUMNS, *args])
