"""`transferlab-train`: the Hydra app. Composes `conf/`, trains and evaluates, logs to MLflow.

    transferlab-train model.dropout=0.3                       # one run
    transferlab-train -m train.learning_rate=1e-2,1e-3        # a sweep: parent + child runs
    transferlab-train -m hparams_search=optuna                # Optuna TPE over the same knobs

Jobs read the splits prepared by `dvc repro split` and write models and reports into their
Hydra output folder, so sweep jobs never overwrite each other or the DVC outputs.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

from transferlab import console
from transferlab.config import CONFIG_NAME, conf_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _task(node: DictConfig) -> float:
    from transferlab.sweep import run_job

    return run_job(node)


def main() -> None:
    """Entry point of the `transferlab-train` console script."""
    import hydra

    console.configure()
    # conf/hydra/launcher/ray.yaml has the plugin's schema name on purpose (it sets the plugin's
    # options); Hydra's deprecation notice about such name matches is noise there.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema")
    hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")(_task)()
    from transferlab.sweep import sweep_exit_status  # imported already, by Hydra's callback

    sys.exit(sweep_exit_status())  # non-zero after a sweep in which no job finished


if __name__ == "__main__":
    main()
