"""project_settings.py: `transferlab compose` saves project settings in conf/, and every way of
composing conf/ (Hydra's compose API as `transferlab-train` uses it, DVC's own Hydra composition
for `dvc exp run -S`) starts from them, with command-line overrides on top.

The end-to-end check with the real commands (`dvc repro`, a sweep, `dvc exp run`) is in
test_entrypoints.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

from transferlab.cli import main
from transferlab.config import compose, compose_raw, conf_dir
from transferlab.errors import ConfigError
from transferlab.project_settings import HEADER, ProjectSettings, save

OWN_IMAGES = ("data=folder", "data.source=/srv/images/pets", "data.name=pets")


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A copy of the repo's conf/ (with no project settings)."""
    return shutil.copytree(REPO_ROOT / "conf", tmp_path / "project" / "conf")


def _files(conf: Path) -> dict[str, str]:
    return {str(p.relative_to(conf)): p.read_text() for p in sorted(conf.rglob("project.yaml"))}


def test_the_repo_has_no_project_settings() -> None:
    assert (REPO_ROOT / "conf" / "project.yaml").read_text() == HEADER
    assert not list((REPO_ROOT / "conf").glob("*/project.yaml"))


def test_saved_settings_are_the_base_of_every_composition(conf: Path) -> None:
    settings, cfg = save([*OWN_IMAGES, "model=mobilenet_v2", "model.alpha=0.35", "train.epochs=3"], conf)
    assert settings == ProjectSettings(
        {"data": "folder", "model": "mobilenet_v2"},
        {"data": {"name": "pets", "source": "/srv/images/pets"}, "model": {"alpha": 0.35}, "train": {"epochs": 3}},
    )
    assert compose([], conf) == cfg  # what params.yaml, a sweep job and `dvc exp run` start from
    assert cfg.data.source == "/srv/images/pets" and cfg.model.alpha == 0.35 and cfg.train.epochs == 3
    # Values of a group's section live in that group's option `project`, which extends the chosen option.
    data_option = yaml.safe_load((conf / "data" / "project.yaml").read_text())
    assert data_option == {"defaults": ["folder", "_self_"], "name": "pets", "source": "/srv/images/pets"}
    top = yaml.safe_load((conf / "project.yaml").read_text())
    assert top == {
        "defaults": [{"override /data": "project"}, {"override /model": "project"}, "_self_"],
        "train": {"epochs": 3},
    }
    assert settings.as_overrides() == [
        "data=folder",
        "data.name=pets",
        "data.source=/srv/images/pets",
        "model=mobilenet_v2",
        "model.alpha=0.35",
        "train.epochs=3",
    ]


def test_command_line_overrides_go_on_top_of_the_settings(conf: Path) -> None:
    save([*OWN_IMAGES, "model=mobilenet_v2", "model.alpha=0.35", "train.epochs=3"], conf)
    assert compose(["model.dropout=0.4"], conf).data.source == "/srv/images/pets"
    # Another option of a group replaces the project's values of that section: nothing is mixed.
    synthetic = compose(["data=synthetic"], conf)
    assert synthetic.data.source == "synthetic" and synthetic.data.name == "synthetic"
    assert compose(["model=small_cnn"], conf).model.alpha is None
    # A preset goes on top too; the project's settings it does not touch stay.
    reference = compose(["+experiment=reference"], conf)
    assert reference.train.epochs == 2 and reference.data.name == "pets"
    demo = compose(["+experiment=demo"], conf)
    assert demo.data.name == "synthetic" and demo.model.backbone == "small_cnn"


def test_dvcs_hydra_composition_sees_the_same_settings(conf: Path, tmp_path: Path) -> None:
    """What `dvc exp run -S ...` writes to params.yaml: DVC's own composition function, in this venv."""
    from dvc.utils.hydra import compose_and_dump

    save([*OWN_IMAGES, "model=small_cnn", "train.epochs=3"], conf)
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(conf), None, "config", str(conf.parent), ["model.dropout=0.3"])
    written = yaml.safe_load(out.read_text())
    assert written == compose(["model.dropout=0.3"], conf).to_dict()
    assert written["data"]["source"] == "/srv/images/pets" and written["train"]["epochs"] == 3


def test_settings_accumulate_and_a_new_group_option_drops_its_old_values(conf: Path) -> None:
    save([*OWN_IMAGES, "model=mobilenet_v2", "model.alpha=0.35"], conf)
    settings, _ = save(["train.epochs=5"], conf)
    assert settings.options == {"data": "folder", "model": "mobilenet_v2"} and settings.values["train"] == {"epochs": 5}
    settings, cfg = save(["model=small_cnn"], conf)
    assert settings.options["model"] == "small_cnn" and "model" not in settings.values
    assert not (conf / "model" / "project.yaml").exists()
    assert cfg.data.name == "pets" and cfg.train.epochs == 5


def test_a_preset_is_saved_as_what_it_sets(conf: Path) -> None:
    settings, cfg = save(["+experiment=demo"], conf)
    assert settings.options == {"data": "synthetic", "model": "small_cnn", "finetune": "all"}
    assert settings.values["mlflow"] == {"experiment": "transferlab-demo"}
    assert cfg == compose(["+experiment=demo"], REPO_ROOT / "conf")  # the repo's conf/ holds no settings
    assert compose([], conf) == cfg
    assert "/experiment" not in (conf / "project.yaml").read_text()  # no reference to the preset itself


def test_reset_goes_back_to_conf_defaults(conf: Path) -> None:
    before = _files(conf)
    save([*OWN_IMAGES, "train.epochs=3"], conf)
    settings, cfg = save([], conf, reset=True)
    assert settings == ProjectSettings()
    assert _files(conf) == before
    assert cfg == compose([], REPO_ROOT / "conf")
    settings, _ = save(["model.dropout=0.5"], conf, reset=True)
    assert settings.values == {"model": {"dropout": 0.5}} and settings.options == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dropout=1.5"], r"model\.dropout must be in \[0, 1\)"),
        (["+model.dropuot=0.3"], r"unknown key model\.dropuot"),
        (["data=folder"], r"data\.source"),
        (["hparams_search=optuna"], r"hparams_search is chosen per run"),
        (["hydra.job.chdir=true"], r"hydra\.job\.chdir is chosen per run"),
        (["model.dropout=0.1,0.2"], r"is a sweep: run it with `transferlab-train -m`"),
    ],
)
def test_bad_input_changes_nothing(conf: Path, overrides: list[str], message: str) -> None:
    save([*OWN_IMAGES], conf)
    before = _files(conf)
    with pytest.raises(ConfigError, match=message):
        save(overrides, conf)
    assert _files(conf) == before


def test_cli_compose_saves_prints_and_writes_params(
    conf: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = conf.parent
    monkeypatch.chdir(project)
    assert conf_dir() == conf
    assert main(["compose", *OWN_IMAGES, "model.dropout=0.3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:5] == [
        "project settings (conf/project.yaml):",
        "  data=folder",
        "  data.name=pets",
        "  data.source=/srv/images/pets",
        "  model.dropout=0.3",
    ]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params == compose_raw([], conf) and params["model"]["dropout"] == 0.3
    assert main(["compose", "--reset"]) == 0
    assert "none, conf/ defaults only" in capsys.readouterr().out
    assert main(["compose", "model.dropout=2"]) == 2
    assert "ConfigError: model.dropout must be in [0, 1), got 2" in capsys.readouterr().err


def test_compose_from_a_folder_inside_the_project_writes_the_projects_params(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It wrote src/params.yaml, which DVC never reads, while it changed conf/project.yaml."""
    inside = conf.parent / "src"
    inside.mkdir()
    monkeypatch.chdir(inside)
    assert conf_dir() == conf
    assert main(["compose", "model.dropout=0.3"]) == 0
    assert not (inside / "params.yaml").exists()
    assert yaml.safe_load((conf.parent / "params.yaml").read_text())["model"]["dropout"] == 0.3


def test_a_value_conf_derives_follows_its_source_unless_set(conf: Path) -> None:
    """`mlflow.registered_model: ${data.name}-classifier` is not frozen into the settings by a data.name."""
    settings, cfg = save(OWN_IMAGES, conf)
    assert "mlflow" not in settings.values and cfg.mlflow.registered_model == "pets-classifier"
    assert save(["data.name=cats"], conf)[1].mlflow.registered_model == "cats-classifier"
    settings, cfg = save(["mlflow.registered_model=zoo"], conf)
    assert settings.values["mlflow"] == {"registered_model": "zoo"}
    assert save(["data.name=dogs"], conf)[1].mlflow.registered_model == "zoo", "a value set stays set"


def test_the_settings_option_is_not_offered_as_an_option_of_its_group(conf: Path) -> None:
    """conf/model/project.yaml holds the project's model values; it is no model to choose."""
    save(["model=mobilenet_v2", "model.alpha=0.35"], conf)
    assert (conf / "model" / "project.yaml").is_file()
    models = ", ".join(sorted(p.stem for p in (REPO_ROOT / "conf" / "model").glob("*.yaml")))
    for choice in ("mobilenetv2", "project"):
        with pytest.raises(ConfigError) as caught:
            compose([f"model={choice}"], conf)
        assert str(caught.value) == f"model={choice}: no such option (available: {models})"
