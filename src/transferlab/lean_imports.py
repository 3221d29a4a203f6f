"""Cheaper first imports of TensorFlow and MLflow, the bulk of every command's start-up.

Two import hooks, installed by `console.configure()` in every entry point:

- **No collections while they import.** Importing TensorFlow and MLflow creates about 600,000
  objects that live as long as the process. Python's cyclic garbage collector runs its full
  collection each time the number of such objects has grown by a quarter, so it walked all of
  them about nine times during a command's start-up, found next to nothing and took 1.0-1.5 s
  on 2 cores. The first import of each runs with the collector paused, and everything it
  created is then frozen (`gc.freeze`), so that later collections skip it.
- **Keras without scikit-learn and pyplot.** Keras imports both whenever they are installed:
  scikit-learn for its scikit-learn wrappers (MLflow requires it, and it loads SciPy's
  statistics), pyplot for an image-gallery helper. transferlab uses neither: its figures are
  drawn without pyplot. Keras's own imports of these two fail as if they were not installed,
  which Keras supports; any other module still imports them as usual.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

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
    if pending and not any(isinstance(finder, _UncollectedImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _UncollectedImports(frozenset(pending)))


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


class _UncollectedImports(importlib.abc.MetaPathFinder):
    """The first import of each named top-level module runs under `_UncollectedLoader`."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        sys.meta_path.remove(self)  # one import per name; also keeps find_spec below from recursing
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            remaining = self.names - {fullname}
            if remaining:
                sys.meta_path.insert(0, _UncollectedImports(remaining))
        if spec is not None and spec.loader is not None:
            spec.loader = _UncollectedLoader(spec.loader)
        return spec


class _UncollectedLoader(importlib.abc.Loader):
    """Runs the wrapped loader's `exec_module` with the collector paused, then freezes what it made."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        if not gc.isenabled():  # paused already, by an import around this one or by the program
            self._loader.exec_module(module)
            return
        gc.disable()
        try:
            self._loader.exec_module(module)
            gc.freeze()
        finally:
            gc.enable()
