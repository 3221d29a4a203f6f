"""Sweeps on a Ray cluster through Hydra's official Ray launcher (`hydra-ray-launcher`).

`transferlab-train -m hydra/launcher=ray ...` selects `conf/hydra/launcher/ray.yaml`: the plugin's
launcher that connects to an existing cluster (`hydra.launcher.ray.init.address`), per-job resources
(`hydra.launcher.ray.remote`), and the `RaySweepSetup` callback below. When the sweep starts, on the
driver and before any job is submitted, the callback

- connects to the cluster itself, with the launcher's `init` settings plus the driver's MLflow,
  Keras and TensorFlow settings (`MLFLOW_*`, `KERAS_HOME`, `TF_CPP_MIN_LOG_LEVEL`) in the runtime
  environment: a Ray worker does not inherit the environment of the process that launched the
  sweep. The launcher then finds Ray initialised and uses this connection;
- checks that at least one live node offers what a job asks for (`num_cpus`, `num_gpus`, custom
  `resources`): Ray itself would wait forever for a node that can hold the job.

`placement_tags()` names the Ray node that runs a job (tags on its MLflow run). Ray and the plugin
are the optional `ray` extra (`make setup EXTRAS=ray`); nothing imports them before a Ray sweep.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab import console
from transferlab.errors import ConfigError, TransferlabError, received_stop, stop_on_signals, stop_sweep_on_error
from transferlab.paths import project_root

log = logging.getLogger(__name__)

INSTALL_HINT = "install the ray extra: `make setup EXTRAS=ray` (README: Scaling out)"
PLUGIN_MODULE = "hydra_plugins.hydra_ray_launcher"
PLUGIN_LAUNCHER = f"{PLUGIN_MODULE}.ray_launcher.RayLauncher"
# Environment variables that jobs must see as the driver sees them.
FORWARDED_PREFIXES = ("MLFLOW_",)
FORWARDED_NAMES = ("KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")
PROJECT_ENV = "TRANSFERLAB_PROJECT"  # the project folder, for the worker set-up hook
TAG_RAY_NODE_ID = "transferlab.ray_node_id"
TAG_RAY_NODE_IP = "transferlab.ray_node_ip"


def forwarded_environment(environ: Mapping[str, str], configured: Mapping[str, Any]) -> dict[str, str]:
    """The driver's settings that jobs need, plus `configured` env vars (which win); all strings, as Ray wants."""
    forwarded = {
        key: value for key, value in environ.items() if key.startswith(FORWARDED_PREFIXES) or key in FORWARDED_NAMES
    }
    return {**forwarded, **{str(key): str(value) for key, value in configured.items()}}


def job_request(remote: Mapping[str, Any]) -> dict[str, float]:
    """What one job asks Ray for, named as in `ray.nodes()` (CPU defaults to 1, as in Ray)."""
    cpus = remote.get("num_cpus")
    request = {"CPU": float(1 if cpus is None else cpus), "GPU": float(remote.get("num_gpus") or 0)}
    request.update({str(name): float(amount) for name, amount in (remote.get("resources") or {}).items()})
    return {name: amount for name, amount in request.items() if amount > 0}


def unfit_reason(request: Mapping[str, float], nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """Why no live node can run a job asking for `request`, or None when one can."""
    alive = [node for node in nodes if node.get("Alive")]
    if not alive:
        return "the cluster has no live node"
    if any(all(node["Resources"].get(k, 0.0) >= v for k, v in request.items()) for node in alive):
        return None
    wanted = ", ".join(f"{name} {amount:g}" for name, amount in request.items())
    offered = "; ".join(
        f"{node['NodeManagerAddress']} has " + ", ".join(f"{k} {node['Resources'].get(k, 0.0):g}" for k in request)
        for node in alive
    )
    return f"no node offers what one job asks for ({wanted}): {offered}"


def init_arguments(init: Mapping[str, Any], environ: Mapping[str, str], project: Path) -> dict[str, Any]:
    """`ray.init` keyword arguments: the launcher's `init` settings, the forwarded environment, and
    `enter_project` as the worker set-up hook, so that jobs run in `project` as local jobs do."""
    arguments = dict(init)
    runtime_env = dict(arguments.get("runtime_env") or {})
    env_vars = {PROJECT_ENV: str(project), **(runtime_env.get("env_vars") or {})}
    runtime_env["env_vars"] = forwarded_environment(environ, env_vars)
    runtime_env["worker_process_setup_hook"] = f"{__name__}.enter_project"
    arguments["runtime_env"] = runtime_env
    # The plugin always passes object_store_memory, which Ray refuses when joining a cluster.
    if arguments.get("object_store_memory") is None:
        arguments.pop("object_store_memory", None)
    return arguments


class RaySweepSetup(Callback):
    """Hydra callback of `hydra/launcher=ray`: connect, forward settings, check resources (driver only)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.launcher.get("_target_") == PLUGIN_LAUNCHER:
            stop_sweep_on_error(lambda: self._connect(config))

    def _connect(self, config: DictConfig) -> None:
        if importlib.util.find_spec(PLUGIN_MODULE) is None or importlib.util.find_spec("ray") is None:
            raise TransferlabError(f"hydra/launcher=ray needs Ray and hydra-ray-launcher: {INSTALL_HINT}")
        import ray

        settings = OmegaConf.to_container(config.hydra.launcher.ray, resolve=True)
        assert isinstance(settings, dict)
        init = init_arguments(settings.get("init") or {}, os.environ, project_root())
        address = init.get("address") or "(local)"
        if not ray.is_initialized():
            ray.init(**init)
            # ray.init makes SIGTERM exit the driver at once (and its C++ core prints the signal):
            # the sweep's parent would end FAILED, exit 1. Stop the sweep as on Ctrl-C instead.
            stop_on_signals()
        reason = unfit_reason(job_request(settings.get("remote") or {}), ray.nodes())
        if reason:
            raise ConfigError(
                f"Ray cluster {address}: {reason}; lower hydra.launcher.ray.remote.num_cpus / num_gpus "
                "or add a node that has them"
            )
        nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
        log.info("Ray cluster %s: %d live nodes (%s)", address, len(nodes), ", ".join(nodes))


def enter_project() -> None:
    """Ray worker set-up hook: work in the project folder (a relative `hydra.sweep.dir`, the data,
    `conf/`), which every node must have at the path the sweep was started from, and import
    TensorFlow as quietly as the entry points do (`console.quiet_imports`)."""
    console.quiet_imports()
    project = os.environ[PROJECT_ENV]
    if not Path(project).is_dir():
        raise TransferlabError(
            f"project folder {project} is not on this Ray node: every node needs the project at the same path"
        )
    os.chdir(project)


def _in_ray_worker() -> bool:
    """True in a Ray worker process (running a job), false in the driver and outside Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def placement_tags() -> dict[str, str]:
    """The Ray node running this job; nothing outside a Ray worker."""
    if not _in_ray_worker():
        return {}
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ips = [node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id]
    return {TAG_RAY_NODE_ID: node_id, **({TAG_RAY_NODE_IP: ips[0]} if ips else {})}


def leave_cluster() -> None:
    """Disconnect this process from Ray if it is a sweep's driver (no-op in a worker or without Ray).

    Ray then ends the workers still running the sweep's jobs, at once and without clean-up, so
    those jobs cannot close their MLflow runs: a sweep that stopped leaves first, then closes them
    (`sweep_bookkeeping.close_running_children`), and no job trains on in a run closed KILLED.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not _in_ray_worker():
        ray.shutdown()


def exit_worker_on_sigterm(job: str) -> None:
    """In a Ray worker whose job SIGTERM stopped (its run already ended KILLED): end the worker as
    Ray's own SIGTERM handler does, with `SystemExit`.

    Left as the stop's `KeyboardInterrupt`, the task would count as cancelled: the launcher then
    raises on the driver and the whole sweep ends. A worker that exits is a failure Ray retries
    (the job's `max_retries`, 3 by default) in another worker, where the job resumes from its
    checkpoint in the same MLflow run (stopped during evaluate, it trains a new run). Ctrl-C
    (SIGINT, also how `ray.cancel` stops a task) stays a cancellation.
    """
    stop = received_stop()
    if stop is not None and stop.signum == signal.SIGTERM and _in_ray_worker():
        log.warning("job %s stopped (%s): its Ray worker exits, and Ray retries the job", job, stop)
        raise SystemExit(stop.exit_status) from stop
