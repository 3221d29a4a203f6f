"""Readable logs for Hydra jobs: what a sweep prints and what its jobs' `app.log` files hold.

- TensorFlow warns that a `tf.function` "triggered tf.function retracing" when one process
  builds and fits many models. A sweep does exactly that, once per job, on purpose: the warning
  is dropped (the `tensorflow` logger's other warnings stay).
- Log files hold plain text: ANSI colour codes (Keras puts bold codes into its exception
  messages, progress bars colour themselves) are removed from every record.
- The sweep's own console (`hydra.hydra_logging`, between and after jobs) tags Hydra's lines
  `[HYDRA]`, as Hydra does, and every other logger's as a job does (`DriverFormatter`).
"""

from __future__ import annotations

import logging

from transferlab.errors import strip_ansi


class DropRetracingWarnings(logging.Filter):
    """Drops TensorFlow's retracing warning, keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


class PlainText(logging.Filter):
    """Removes ANSI escape sequences from a record's message before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = strip_ansi(message), None
        return True


class DriverFormatter(logging.Formatter):
    """Hydra's format for Hydra's lines, `[<time>][HYDRA] ...`; a job's for the rest,
    `[<time>][<logger>][<LEVEL>] - ...`. Hydra's own format tags every line `[HYDRA]`, so the lines
    transferlab logs as a sweep ends (its summary, the best model logged and registered) passed
    for Hydra's."""

    HYDRA_LOGGERS = ("hydra", "hydra_plugins")
    _hydra = logging.Formatter("[%(asctime)s][HYDRA] %(message)s")
    _job = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        hydra = record.name.split(".", 1)[0] in self.HYDRA_LOGGERS
        return (self._hydra if hydra else self._job).format(record)


def optuna_logs_as_ours() -> None:
    """Optuna's lines through the root logger, formatted as the driver's others (`DriverFormatter`),
    instead of through Optuna's own handler, whose ANSI colours stay in redirected output."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def quiet_job_logs() -> None:
    """Install both filters: on the `tensorflow` logger, and on the handlers Hydra set up for this job."""
    _add_once(logging.getLogger("tensorflow"), DropRetracingWarnings)
    for handler in logging.getLogger().handlers:
        _add_once(handler, PlainText)


def _add_once(target: logging.Filterer, kind: type[logging.Filter]) -> None:
    if not any(isinstance(existing, kind) for existing in target.filters):
        target.addFilter(kind())
