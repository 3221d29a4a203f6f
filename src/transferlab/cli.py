"""`transferlab` command line: parses arguments and calls one stage. No TensorFlow at start-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab import console
from transferlab.errors import run_reporting_errors
from transferlab.process_exit import run_and_exit
from transferlab.registry import DEFAULT_ALIAS

if TYPE_CHECKING:
    from transferlab.config import Config, MlflowConfig
    from transferlab.paths import StagePaths
    from transferlab.tracking import Store


StageFunction = Callable[["Config", "StagePaths"], object]
log = logging.getLogger("transferlab")


def cmd_stage(args: argparse.Namespace) -> int:
    """A DVC stage command: read and validate the params file, run the stage in this project."""
    from transferlab.config import load_params
    from transferlab.paths import StagePaths, project_root

    stage: StageFunction = args.stage()  # imported only now: TensorFlow stays out of start-up
    stage(load_params(Path(args.params)), StagePaths(project_root()))
    return 0


def _source() -> StageFunction:
    from transferlab.stages.source import record_source

    return record_source


def _download() -> StageFunction:
    from transferlab.stages.download import download

    return download


def _split() -> StageFunction:
    from transferlab.stages.split import split

    return split


def _train() -> StageFunction:
    from transferlab.stages.train import train

    return train


def _evaluate() -> StageFunction:
    from transferlab.stages.evaluate import evaluate

    return evaluate


def cmd_compose(args: argparse.Namespace) -> int:
    from transferlab.config import PARAMS_FILE, conf_dir, write_params
    from transferlab.dvc_commands import missing_inputs_for_repro
    from transferlab.paths import StagePaths
    from transferlab.project_settings import save

    conf = conf_dir()
    settings, cfg = save(args.overrides, conf, reset=args.reset)
    out = Path(args.out) if args.out else conf.parent / PARAMS_FILE  # the project's, from any folder in it
    write_params(cfg, out)
    print(settings.describe(conf))
    print(f"wrote {args.out or os.path.relpath(out)}; `dvc repro` runs the pipeline with it")
    for missing in missing_inputs_for_repro(cfg, StagePaths(conf.parent)).values():
        log.warning("%s: `make run` (`transferlab repro`) runs no stage until it does", missing)
    return 0


def _project_mlflow(params: Path) -> MlflowConfig:
    """The `mlflow` settings of the project's params file, or the defaults when there is none."""
    from transferlab.config import MlflowConfig, load_params

    return load_params(params).mlflow if params.is_file() else MlflowConfig()


def cmd_predict(args: argparse.Namespace) -> int:
    from transferlab.paths import project_root
    from transferlab.predict import predict_command
    from transferlab.registry import local_model

    with local_model(args.model, _project_mlflow(Path("params.yaml")), project_root()) as model:
        return predict_command(model, [Path(p) for p in args.inputs], args.top_k, args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from transferlab.export import export_model
    from transferlab.paths import project_root
    from transferlab.registry import local_model

    with local_model(args.model, _project_mlflow(Path("params.yaml")), project_root()) as model:
        export_model(model, Path(args.out), args.format, source=args.model)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from transferlab.model_server import max_bytes_setting, model_folder, serve
    from transferlab.paths import project_root
    from transferlab.tracking import connect

    def store() -> Store:  # opened only for a model URI
        return connect(_project_mlflow(Path(args.params)), project_root())

    limit = max_bytes_setting()  # a bad setting stops here, before the model is fetched
    with model_folder(args.model, store) as folder:
        serve(folder, limit, args.host, args.port, args.workers)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from transferlab.errors import ConfigError
    from transferlab.paths import project_root
    from transferlab.registry import promote
    from transferlab.tracking import connect

    cfg = _project_mlflow(Path(args.params))
    name = args.name or cfg.registered_model
    if not name:
        raise ConfigError(f"mlflow.registered_model is null in {args.params}: pass --name NAME")
    version = promote(connect(cfg, project_root()), name, args.version_or_run, args.alias)
    print(f"models:/{name}@{args.alias} -> version {version}")
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from transferlab.dvc_commands import refuse_missing_inputs, repro
    from transferlab.paths import StagePaths, project_root

    refuse_missing_inputs(Path("params.yaml"), StagePaths(project_root()))
    return repro(args.dvc_args)


def cmd_exps(args: argparse.Namespace) -> int:
    from transferlab.dvc_commands import show_experiments

    return show_experiments(args.dvc_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, function: Callable[[], StageFunction], help_text: str) -> None:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
        p.set_defaults(func=cmd_stage, stage=function)

    stage("source", _source, "record what data.source holds in data/source.json (a change reruns download)")
    stage("download", _download, "fetch or generate the raw images into data/raw/<name>/")
    stage("split", _split, "verify images and write stratified train/val/test manifests")
    stage("train", _train, "train on the manifests and log the run to MLflow")
    stage("evaluate", _evaluate, "score the trained model on the test split")

    p = sub.add_parser("compose", help="save project settings in conf/project.yaml and write params.yaml from conf/")
    p.add_argument("overrides", nargs="*", help="Hydra overrides to save, e.g. data=folder data.source=/path/to/images")
    p.add_argument("--reset", action="store_true", help="drop the saved project settings first")
    p.add_argument("--out", help="where to write the composed config (default: params.yaml beside conf/)")
    p.set_defaults(func=cmd_compose)

    # These two pass every further argument on to DVC (`transferlab repro -f evaluate`, `transferlab exps --md`).
    p = sub.add_parser("repro", help="`dvc repro [ARGS]` (`make run`); no `dvc push` hint without a remote")
    p.set_defaults(func=cmd_repro, passes_arguments_on=True)
    p = sub.add_parser("exps", help="`dvc exp show [ARGS]`: the params that differ, test accuracy, F1 and ECE")
    p.set_defaults(func=cmd_exps, passes_arguments_on=True)

    p = sub.add_parser("predict", help="top-k labels for images or folders of images")
    registered = "or a model URI such as models:/<name>@champion"
    p.add_argument("model", help=f"a trained models/model.keras, its SavedModel folder or .tflite export, {registered}")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-k", "--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model as a SavedModel or TFLite file")
    p.add_argument("model", help=f"a trained models/model.keras, {registered}")
    p.add_argument("out", help="output folder (savedmodel) or .tflite file")
    p.add_argument("--format", choices=("savedmodel", "tflite"), default="savedmodel")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a logged model over HTTP (POST /invocations), request bodies bounded")
    p.add_argument("model", help="models:/<name>@<alias>, runs:/<run id>/model, or a downloaded MLflow model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1, help="server processes, each with the model loaded")
    p.add_argument("--params", default="params.yaml", help="composed config naming the MLflow store")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("promote", help="point a registered model's alias at a version or a run's model")
    p.add_argument(
        "version_or_run", metavar="VERSION_OR_RUN", help="a version number, @alias or run id (registered if needed)"
    )
    p.add_argument("--alias", default=DEFAULT_ALIAS, help=f"the alias to move (default: {DEFAULT_ALIAS})")
    p.add_argument("--name", help="registered model (default: mlflow.registered_model of the params file)")
    p.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    p.set_defaults(func=cmd_promote)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `transferlab` console script."""
    parser = build_parser()
    args, args.dvc_args = parser.parse_known_args(argv)
    if args.dvc_args and not getattr(args, "passes_arguments_on", False):
        parser.error(f"unrecognized arguments: {' '.join(args.dvc_args)}")
    console.configure()
    status = run_reporting_errors(lambda: args.func(args))
    if status and args.func is cmd_stage:
        _point_at_dvc_checkout(args.command)
    return status


def _point_at_dvc_checkout(stage: str) -> None:
    """Under `dvc repro` (DVC sets DVC_STAGE), say how to get back the outputs DVC removed before
    it ran the stage that failed, when dvc.lock records some (outputs marked `persist` stay)."""
    from transferlab.config import read_yaml

    lock, pipeline = Path("dvc.lock"), Path("dvc.yaml")
    if os.environ.get("DVC_STAGE") != stage or not lock.is_file() or not pipeline.is_file():
        return
    recorded = ((read_yaml(lock) or {}).get("stages") or {}).get(stage, {}).get("outs")
    declared = ((read_yaml(pipeline) or {}).get("stages") or {}).get(stage, {}).get("outs") or []
    kept = all(isinstance(out, dict) and next(iter(out.values())).get("persist") for out in declared)
    if recorded and not kept:
        restore = f"`dvc checkout {stage}` restores them from DVC's cache (`dvc pull {stage}` from a remote)"
        print(f"dvc repro removed the {stage} stage's outputs before running it: {restore}", file=sys.stderr)


def run() -> None:
    """The `transferlab` console script: `main`, then a quick exit (see process_exit)."""
    run_and_exit(main)


if __name__ == "__main__":
    sys.exit(main())
