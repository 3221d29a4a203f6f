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

log = logging.getLogger("transferlab")


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
    from transferlab.config import compose, write_params

    cfg = compose(args.overrides)
    write_params(cfg, Path(args.out))
    log.info("wrote %s", args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from transferlab.predict import predict_command

    return predict_command(Path(args.model), [Path(p) for p in args.inputs], args.top_k, args.json)


def cmd_export(args: argparse.Namespace) -> int:
    from transferlab.export import export_model

    export_model(Path(args.model), Path(args.out), args.format)
    return 0


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

    p = sub.add_parser("compose", help="write params.yaml from conf/ plus Hydra overrides")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.dropout=0.3 data=synthetic")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("predict", help="top-k labels for images or folders of images")
    p.add_argument("model", help="a trained models/model.keras")
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
    args = build_parser().parse_args(argv)
    configure_runtime()
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
