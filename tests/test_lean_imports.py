"""lean_imports.py: TensorFlow and MLflow import without collections and end frozen; Keras loads
without scikit-learn and pyplot, and nothing else loses them. Each case runs in a fresh Python."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import VENV_BIN

BLUE = (20, 20, 230)


def python(script: str, cwd: Path | None = None) -> str:
    """Run `script` in a new interpreter of this venv; it must succeed. Returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def imported_modules(verbose_log: str) -> set[str]:
    """The modules `python -v` reports as loaded (an import that failed has no such line)."""
    return {match[1] for match in re.finditer(r"^import '([\w.]+)' # ", verbose_log, re.MULTILINE)}


def test_a_command_that_loads_keras_imports_neither_sklearn_nor_pyplot(colour_model: Path, colour_image) -> None:
    """The real `transferlab` console script, predicting with a Keras model."""
    image = colour_image("b.png", BLUE)
    command = [sys.executable, "-v", str(VENV_BIN / "transferlab"), "predict", str(colour_model)]
    done = subprocess.run([*command, str(image), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)[0]["predictions"][0]["label"] == "blue"
    modules = imported_modules(done.stderr)
    assert {"tensorflow", "keras"} <= modules
    assert not {"sklearn", "matplotlib.pyplot", "scipy.stats"} & modules


def test_only_kerass_imports_of_them_are_skipped() -> None:
    """After Keras loaded without them, any other module imports scikit-learn and pyplot as usual."""
    out = python("""
        import sys
        from transferlab import lean_imports
        lean_imports.install()
        lean_imports.install()
        import keras
        from keras.src.wrappers import fixes
        from keras.src.visualization import plot_image_gallery
        assert fixes.sklearn is None and plot_image_gallery.plt is None
        assert "sklearn" not in sys.modules and "matplotlib.pyplot" not in sys.modules
        import sklearn.base
        import matplotlib.pyplot
        skips = [finder for finder in sys.meta_path if isinstance(finder, lean_imports._KerasSkips)]
        pauses = [hook for hook in sys.meta_path if getattr(hook, "around", None) is lean_imports.collector_paused]
        print(len(skips), len(pauses), sorted(pauses[0].names))
    """)
    assert out.strip() == "1 1 ['mlflow']", "each hook installed once; TensorFlow's import used its part"


COUNT_COLLECTIONS = textwrap.dedent("""
    import gc
    from transferlab import lean_imports
    collections = []
    gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
""")


def test_mlflow_imports_without_collections_and_what_it_made_is_frozen() -> None:
    """Without the hook, importing MLflow runs full collections; with it, none, and the
    collector is on again afterwards with MLflow's objects out of its way."""
    plain = python(COUNT_COLLECTIONS + "import mlflow\nprint(collections.count(2), gc.get_freeze_count())")
    assert int(plain.split()[0]) >= 2 and plain.split()[1] == "0", plain
    hooked = python(
        COUNT_COLLECTIONS
        + "lean_imports.install()\nimport mlflow\nprint(len(collections), gc.isenabled(), gc.get_freeze_count())"
    )
    collected, enabled, frozen = hooked.split()
    assert (collected, enabled) == ("0", "True"), hooked
    assert int(frozen) > 100_000, "MLflow's objects are frozen"


def test_a_failing_heavy_import_leaves_the_collector_on_and_nothing_frozen(tmp_path: Path) -> None:
    (tmp_path / "broken_heavy.py").write_text("raise RuntimeError('broken on import')\n")
    out = python(
        COUNT_COLLECTIONS
        + """
lean_imports.install(frozenset({"broken_heavy"}))
try:
    import broken_heavy
except RuntimeError as exc:
    print(exc, "|", gc.isenabled(), gc.get_freeze_count())
""",
        cwd=tmp_path,
    )
    assert out.strip() == "broken on import | True 0"
