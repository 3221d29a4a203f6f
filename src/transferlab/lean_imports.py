"""Cheaper first imports of TensorFlow and MLflow, the bulk of every command's start-up.

Two import hooks, installed by `console.configure()` in every entry point (figures: README,
"Lean start-up imports"):

- **No collections while they import.** The two create about 650,000 objects that live as long
  as the process, and Python's cyclic garbage collector ran a full collection each time their
  number had grown by a quarter: it walked them all eight times during a `transferlab train`
  start-up and found next to nothing. The first import of each now runs with the collector
  paused, and everything it made is then frozen (`gc.freeze`) out of later collections.
- **Keras without scikit-learn and pyplot.** Keras imports both whenever they are installed,
  for its scikit-learn wrappers (MLflow requires scikit-learn, which loads SciPy's statistics)
  and an image-gallery helper. transferlab uses neither: its figures are drawn without pyplot.
  Keras's own imports of the two fail as if they were not installed, which Keras supports; any
  other module still imports them as usual.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import sys
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

from transferlab.import_hooks import wrap_first_imports

HEAVY = frozenset({"tensorflow", "mlflow"})
KERAS_SKIPS = frozenset({"sklearn", "matplotlib.pyplot"})
# Frames between an import statement and a finder: the import system's (importlib.import_module
# included) and this module's.
_NOT_IMPORTERS = ("importlib", "_frozen_importlib", __name__)


def install(heavy: frozenset[str] = HEAVY) -> None:
    """Both hooks, once per process; `heavy` names the top-level modules imported without collections."""
    if not any(isinstance(finder, _KerasSkips) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KerasSkips())
    pending = heavy - set(sys.modules)
    if pending:
        wrap_first_imports(pending, collector_paused)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collections while the block runs; if it succeeds, what it made is frozen."""
    if not gc.isenabled():  # paused already, by an import around this one or by the program
        yield
        return
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        gc.enable()


class _KerasSkips(importlib.abc.MetaPathFinder):
    """Refuses to find the `KERAS_SKIPS` modules for Keras's modules; finds nothing for anyone."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname in KERAS_SKIPS and importing_module().split(".", 1)[0] == "keras":
            raise ModuleNotFoundError(f"No module named {fullname!r} (skipped for Keras by transferlab)", name=fullname)
        return None


def importing_module() -> str:
    """The name of the module whose code is running the import in progress ("" if unknown)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_NOT_IMPORTERS):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""
