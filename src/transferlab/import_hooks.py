"""Run the first import of chosen top-level modules inside a context manager.

`wrap_first_imports(names, around)` puts a finder first on `sys.meta_path`. When one of `names`
is imported for the first time, the finder steps aside, lets the other finders find the module
and hands back its spec with the loader wrapped, so that the module's code runs inside
`around()`. Each name is wrapped once; hooks for different `around`s compose (console.py keeps
TensorFlow's C++ chatter off the terminal this way, lean_imports.py pauses the garbage collector).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

Around = Callable[[], contextlib.AbstractContextManager[None]]


def wrap_first_imports(names: frozenset[str], around: Around) -> None:
    """The first import of each of `names` (top-level modules) runs inside `around()`; idempotent."""
    if not any(isinstance(finder, _FirstImportFinder) and finder.around is around for finder in sys.meta_path):
        sys.meta_path.insert(0, _FirstImportFinder(names, around))


class _FirstImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset[str], around: Around) -> None:
        self.names = names
        self.around = around

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
                sys.meta_path.insert(0, _FirstImportFinder(remaining, self.around))
        if spec is not None and spec.loader is not None:
            spec.loader = _WrappedLoader(spec.loader, self.around)
        return spec


class _WrappedLoader(importlib.abc.Loader):
    """Runs the wrapped loader's `exec_module` inside `around()`."""

    def __init__(self, loader: importlib.abc.Loader, around: Around) -> None:
        self._loader = loader
        self._around = around

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with self._around():
            self._loader.exec_module(module)
