"""`make demo`: the whole DVC pipeline, offline, on synthetic images, in a scratch copy.

The copy (`build/demo/`) gets the `+experiment=demo` preset as its project settings and runs the
real `dvc repro` (download -> split -> train -> evaluate); MLflow runs land in this
project's own store, experiment `transferlab-demo`, so `make ui` shows them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from transferlab import console
from transferlab.paths import StagePaths, project_root
from transferlab.workspace import copy_project

log = logging.getLogger("transferlab.demo")


def run_demo(root: Path) -> Path:
    """Run the pipeline in `root/build/demo`; return that folder."""
    workdir = copy_project(root, root / "build" / "demo")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    for command in (["transferlab", "compose", "+experiment=demo"], ["transferlab", "repro"]):
        log.info("$ %s", " ".join(command))
        subprocess.run(command, cwd=workdir, env=env, check=True)
    log.info("pipeline finished in %.0f s", time.monotonic() - started)
    return workdir


def summary(workdir: Path, root: Path) -> str:
    """Where the results are, for a person to look at next."""
    paths = StagePaths(workdir)
    metrics = json.loads(paths.metrics.read_text())
    run = json.loads(paths.run_file.read_text())
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("test_accuracy", "test_macro_f1"))
    return "\n".join(
        [
            f"test metrics: {shown}  ({paths.metrics})",
            f"plots:        {paths.figures}/ and {paths.training_curves}",
            f"model:        {paths.model_file}",
            f"MLflow run:   {run['run_id']} in {root / 'mlruns' / 'mlflow.db'} (experiment transferlab-demo)",
            "look at it:   make ui, then open http://127.0.0.1:5000",
        ]
    )


def main() -> int:
    console.configure()
    root = project_root()
    try:
        workdir = run_demo(root)
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: `{' '.join(exc.cmd)}` exited {exc.returncode}", file=sys.stderr)
        return 1
    print(summary(workdir, root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
