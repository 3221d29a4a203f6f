"""sweep_configs: Hydra's own sweeper and launcher, on conf/, compose each job's config once
between them, and hand every job the config Hydra would have composed for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf

from transferlab import sweep_configs
from transferlab.config import CONFIG_NAME, conf_dir

GRID = ["model.dropout=0.1,0.3", "train.learning_rate=0.01,0.001"]


@pytest.fixture
def hydra_app() -> Iterator[GlobalHydra]:
    """The Hydra app on conf/, as `transferlab-train` starts it."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield GlobalHydra.instance()
        sweep_configs.compose_as_before()


def _count_compositions(loader: ConfigLoader) -> list[tuple[str, ...]]:
    """The overrides of every sweep config `loader` composes from now on (it still composes them)."""
    calls: list[tuple[str, ...]] = []
    compose = loader.load_sweep_config

    def counted(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        calls.append(tuple(sweep_overrides))
        return compose(master_config, sweep_overrides)

    loader.load_sweep_config = counted  # type: ignore[method-assign]
    return calls


def _multirun_config(app: GlobalHydra, *overrides: str) -> DictConfig:
    assert app.hydra is not None
    return app.hydra.compose_config(CONFIG_NAME, [*GRID, *overrides, "hydra.callbacks={}"], run_mode=RunMode.MULTIRUN)


def _grid_sweep(app: GlobalHydra, sweep_dir: Path, *, once: bool) -> list[tuple[dict, int]]:
    """A grid sweep the way `Hydra.multirun` runs one, with the basic sweeper and launcher (and
    with `once`, what the sweep's callback does first); the config each job got, with its number."""
    hydra = app.hydra
    assert hydra is not None
    config = _multirun_config(app, f"hydra.sweep.dir={sweep_dir}")
    if once:
        sweep_configs.compose_each_job_once(config)
    jobs: list[tuple[dict, int]] = []
    sweeper = Plugins.instance().instantiate_sweeper(
        config=config,
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks()),
        task_function=lambda job: jobs.append((OmegaConf.to_container(job), HydraConfig.get().job.num)),
    )
    sweeper.sweep(arguments=list(config.hydra.overrides.task))
    return jobs


def _settings(job: tuple[dict, int]) -> tuple[float, float, int]:
    config, number = job
    return config["model"]["dropout"], config["train"]["learning_rate"], number


def test_each_job_config_is_composed_once(hydra_app: GlobalHydra, tmp_path: Path) -> None:
    assert hydra_app.hydra is not None
    compositions = _count_compositions(hydra_app.hydra.config_loader)
    jobs = _grid_sweep(hydra_app, tmp_path / "sweep", once=True)

    assert len(compositions) == 4 and len(set(compositions)) == 4  # the validation's; none by the launcher
    assert sorted(_settings(job) for job in jobs) == [(0.1, 0.001, 1), (0.1, 0.01, 0), (0.3, 0.001, 3), (0.3, 0.01, 2)]


def test_jobs_get_the_configs_hydra_composes_without_it(hydra_app: GlobalHydra, tmp_path: Path) -> None:
    assert hydra_app.hydra is not None
    compositions = _count_compositions(hydra_app.hydra.config_loader)
    plain = _grid_sweep(hydra_app, tmp_path / "plain", once=False)
    assert len(compositions) == 8  # Hydra on its own composes every job twice
    once = _grid_sweep(hydra_app, tmp_path / "once", once=True)
    assert len(compositions) == 8 + 4
    assert once == plain


def test_a_kept_config_is_the_callers_own(hydra_app: GlobalHydra) -> None:
    assert hydra_app.hydra is not None
    loader = sweep_configs.ComposedOnce(hydra_app.hydra.config_loader)
    master = hydra_app.hydra.compose_config(CONFIG_NAME, GRID, run_mode=RunMode.MULTIRUN)
    job = ["model.dropout=0.1", "train.learning_rate=0.01"]
    validated = loader.load_sweep_config(master, job)
    OmegaConf.set_struct(validated, False)
    validated.model.dropout = 0.9  # what the validating caller does with its copy is its own
    assert loader.load_sweep_config(master, job).model.dropout == 0.1
    assert loader._kept == {}  # handed over: a third request composes again


@pytest.mark.parametrize("choice", ["hparams_search=optuna", "hydra/launcher=joblib"])
def test_sweepers_and_launchers_that_compose_once_keep_hydras_loader(hydra_app: GlobalHydra, choice: str) -> None:
    """Optuna's sweeper does not validate and joblib's workers compose: kept configs would never be taken."""
    assert hydra_app.hydra is not None
    own = hydra_app.hydra.config_loader
    sweep_configs.compose_each_job_once(_multirun_config(hydra_app, choice))
    assert hydra_app.hydra.config_loader is own
