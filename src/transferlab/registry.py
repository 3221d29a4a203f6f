"""The MLflow model registry: registered versions, aliases, and models named by URI.

`mlflow.registered_model` names one registered model. Every `dvc repro` training run adds its
model as a new version; a sweep registers its best child with the alias `candidate`;
`transferlab promote` moves an alias (`champion` by default). `predict` and `export` accept
`models:/<name>@<alias>` (or any `models:/` or `runs:/` URI) wherever they take a model file.
All MLflow calls go through `transferlab.tracking`.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferlab import tracking
from transferlab.config import MlflowConfig
from transferlab.errors import TransferlabError

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"  # a sweep's best child
DEFAULT_ALIAS = "champion"  # `transferlab promote` without --alias
VALIDATION_METRIC = "final_val_accuracy"  # the saved model's: what @candidate compares
MODEL_URI_SCHEMES = ("models:/", "runs:/")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def register_run_model(
    store: tracking.Store, name: str, run_id: str, model_uri: str | None = None, alias: str | None = None
) -> str:
    """The version of `name` holding run `run_id`'s logged model (registered now unless it already is);
    `alias`, if given, is moved to it. Returns the version number."""
    version = store.version_of_run(name, run_id)
    if version is None:
        model_uri = model_uri or store.logged_model_uri(run_id)
        if model_uri is None:
            raise TransferlabError(f"run {run_id} logged no model to register (mlflow.log_model was false)")
        version = store.register_version(name, model_uri, run_id)
        log.info("registered the model of run %s as %s version %s", run_id, name, version)
    if alias:
        previous = store.alias_version(name, alias)
        store.set_alias(name, alias, version)
        moved = f", was version {previous}" if previous and previous != version else ""
        log.info("%s@%s is version %s (run %s%s)", name, alias, version, run_id, moved)
    return version


def register_candidate(store: tracking.Store, name: str, run_id: str) -> str:
    """Register run `run_id`'s model (a sweep's best child) and move `name@candidate` to it, unless
    the version @candidate names was trained on the same splits and reached a higher validation
    accuracy: then the alias stays, and a warning says how to move it anyway. Returns the version."""
    held = store.alias_version(name, CANDIDATE_ALIAS)
    splits, score = _splits_and_score(store, run_id)
    held_splits, held_score = _splits_and_score(store, _version_run(store, name, held)) if held else (None, None)
    comparable = splits is not None and splits == held_splits and score is not None and held_score is not None
    stays = comparable and held_score > score
    version = register_run_model(store, name, run_id, alias=None if stays else CANDIDATE_ALIAS)
    if stays:
        log.warning(
            "%s@%s stays at version %s (validation accuracy %.4f on the same splits); this sweep's best is "
            "version %s (%.4f): `transferlab promote %s --alias %s` moves the alias to it",
            name,
            CANDIDATE_ALIAS,
            held,
            held_score,
            version,
            score,
            version,
            CANDIDATE_ALIAS,
        )
    return version


def _version_run(store: tracking.Store, name: str, version: str) -> str | None:
    try:
        return store.model_version_run(name, version)
    except TransferlabError:
        return None


def _splits_and_score(store: tracking.Store, run_id: str | None) -> tuple[str | None, float | None]:
    """The splits digest a run trained on and its validation accuracy; Nones for a run that is gone."""
    found = store.find_run(run_id) if run_id else None
    if found is None:
        return None, None
    return found.data.tags.get(tracking.TAG_MANIFEST_HASH), found.data.metrics.get(VALIDATION_METRIC)


def promote(store: tracking.Store, name: str, version_or_run: str, alias: str) -> str:
    """Point `name@alias` at a version number, at the version another alias names (`@candidate`),
    or at a run's model (registering it if needed)."""
    previous = store.alias_version(name, alias)
    if _RUN_ID.match(version_or_run):
        version = register_run_model(store, name, version_or_run)
    elif version_or_run.isdigit():
        store.model_version_run(name, version_or_run)  # one clear line if there is no such version
        version = version_or_run
    elif version_or_run.startswith("@"):
        found = store.alias_version(name, version_or_run[1:])
        if found is None:
            raise TransferlabError(f"registered model {name} has no alias {version_or_run}")
        version = found
    else:
        raise TransferlabError(f"{version_or_run!r} is neither a version number, an @alias nor an MLflow run id")
    store.set_alias(name, alias, version)
    moved = f" (was version {previous})" if previous and previous != version else ""
    log.info("%s@%s is version %s%s", name, alias, version, moved)
    return version


def is_model_uri(reference: str) -> bool:
    """True for `models:/...` and `runs:/...`, false for a file path."""
    return reference.startswith(MODEL_URI_SCHEMES)


@contextmanager
def local_model(reference: str, cfg: MlflowConfig, root: Path) -> Iterator[Path]:
    """A `.keras` file for `reference`: a path as given, or a model URI downloaded from the store `cfg`
    names into a temporary folder (removed afterwards), with its `classes.json` beside it."""
    if not is_model_uri(reference):
        yield Path(reference)
        return
    from transferlab.serving import unpack_classifier

    store = tracking.connect(cfg, root)
    with tempfile.TemporaryDirectory(prefix="transferlab-model-") as tmp:
        log.info("fetching %s from %s", reference, store.uri)
        keras_file, classes = unpack_classifier(store.download_model(reference, Path(tmp)), reference)
        (keras_file.parent / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
        yield keras_file
