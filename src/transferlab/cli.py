"""`transferlab` command line: parses arguments and calls one stage. No TensorFlow at start-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from transferlab.errors import run_reporting_errors

if TYPE_CHECKING:
    from transferlab.config import Config
    from transferlab.paths import StagePaths


def configure_runtime() -> None:
    """Logging format and quieter TensorFlow, before anything heavy is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


StageFunction = Callable[["Config", "StagePaths"], object]


def cmd_stage(args: argparse.Namespace) -> int:
    """A DVC stage command: read and validate the params file, run the stage in this project."""
    from transferlab.config import load_params
    from transferlab.paths import StagePaths, project_root

    stage: StageFunction = args.stage()  # imported only now: TensorFlow stays out of start-up
    stage(load_params(Path(args.params)), StagePaths(project_root()))
    return 0


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
    from transferlab.config import conf_dir, write_params
    from transferlab.project_settings import save

    settings, cfg = save(args.overrides, reset=args.reset)
    write_params(cfg, Path(args.out))
    print(settings.describe(conf_dir()))
    print(f"wrote {args.out}; `dvc repro` runs the pipeline with it")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from transferlab.predict import predict_command

    return predict_command(Path(args.model), [Path(p) for p in args.inputs], args.top_k, args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from transferlab.export import export_model

    export_model(Path(args.model), Path(args.out), args.format)
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from transferlab.dvc_commands import repro

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

    stage("download", _download, "fetch or generate the raw images into data/raw/<name>/")
    stage("split", _split, "verify images and write stratified train/val/test manifests")
    stage("train", _train, "train on the manifests and log the run to MLflow")
    stage("evaluate", _evaluate, "score the trained model on the test split")

    p = sub.add_parser("compose", help="save project settings in conf/project.yaml and write params.yaml from conf/")
    p.add_argument("overrides", nargs="*", help="Hydra overrides to save, e.g. data=folder data.source=/path/to/images")
    p.add_argument("--reset", action="store_true", help="drop the saved project settings first")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=cmd_compose)

    # These two pass every further argument on to DVC (`transferlab repro -f evaluate`, `transferlab exps --md`).
    p = sub.add_parser("repro", help="`dvc repro [ARGS]` (`make run`); no `dvc push` hint without a remote")
    p.set_defaults(func=cmd_repro, passes_arguments_on=True)
    p = sub.add_parser("exps", help="`dvc exp show [ARGS]`: the params that differ, test accuracy, F1 and ECE")
    p.set_defaults(func=cmd_exps, passes_arguments_on=True)

    p = sub.add_parser("predict", help="top-k labels for images or folders of images")
    p.add_argument("model", help="a trained models/model.keras, or its SavedModel folder or .tflite export")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-k", "--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a trained model as a SavedModel or TFLite file")
    p.add_argument("model", help="a trained models/model.keras")
    p.add_argument("out", help="output folder (savedmodel) or .tflite file")
    p.add_argument("--format", choices=("savedmodel", "tflite"), default="savedmodel")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `transferlab` console script."""
    parser = build_parser()
    args, args.dvc_args = parser.parse_known_args(argv)
    if args.dvc_args and not getattr(args, "passes_arguments_on", False):
        parser.error(f"unrecognized arguments: {' '.join(args.dvc_args)}")
    configure_runtime()
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
