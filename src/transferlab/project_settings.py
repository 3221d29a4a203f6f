"""Project settings: what `transferlab compose` was told, kept in `conf/` so every entry point sees it.

`conf/config.yaml` includes `conf/project.yaml` after its own defaults. That file holds the
project's choice of option per config group (as `override /<group>: <option>` entries) and its
values for the sections that are not config groups (`train`, `evaluate`, `mlflow`, `sweep`).
Values of a group's section (`data.source`, `model.alpha`, ...) live in the group option
`conf/<group>/project.yaml`, which extends the chosen option. So a sweep or experiment that picks
another option of a group (`model=small_cnn`) replaces the project's values of that section as
well, instead of mixing them with the new option's.

It is plain Hydra (no ConfigStore, no resolvers): DVC's Hydra integration (`dvc exp run -S`)
composes it exactly as `transferlab-train` and `transferlab compose` do.

Saving works on the composed result, not on the override text: `save` composes the current
settings plus the new overrides, then keeps every group option and every value that differs from
`conf/` alone. Hence a preset (`+experiment=demo`) is saved as what it sets, and choosing another
option of a group drops the project's earlier values for that section.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab import atomic
from transferlab.config import (
    SETTINGS_NAME,
    Config,
    compose_with_choices,
    conf_dir,
    dump_yaml,
    override_value,
    read_yaml,
    validate,
)
from transferlab.errors import ConfigError, first_line

GROUPS = ("data", "model", "augment", "finetune")  # config groups that are sections of the config
PER_RUN = ("hydra", "hparams_search")  # chosen per run or sweep, never saved
HEADER = """\
# @package _global_
# Project settings, written by `transferlab compose KEY=VALUE ...` (`--reset` clears them).
# Every entry point composes conf/ with them: `dvc repro` (through params.yaml),
# `transferlab-train [-m]` and `dvc exp run -S`; overrides on their command lines go on top.
"""
GROUP_HEADER = "# Project settings for `{group}`, written by `transferlab compose`: option `{option}` plus these.\n"


@dataclass(frozen=True)
class ProjectSettings:
    """Group options that differ from conf/'s defaults, and values that differ from those options."""

    options: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def as_overrides(self) -> list[str]:
        """The settings as `transferlab compose` arguments, one per setting, section by section."""
        values = _leaves("", self.values)
        sections = [*GROUPS, *(key for key in self.values if key not in GROUPS)]
        lines = []
        for section in sections:
            if section in self.options:
                lines.append(f"{section}={self.options[section]}")
            lines += [f"{k}={override_value(v)}" for k, v in values if k.split(".")[0] == section]
        return lines

    def describe(self, conf: Path) -> str:
        """What a person reads after `transferlab compose`."""
        where = _shown(conf / f"{SETTINGS_NAME}.yaml")
        if not self.options and not self.values:
            return f"project settings ({where}): none, conf/ defaults only"
        lines = "\n".join(f"  {line}" for line in self.as_overrides())
        return f"project settings ({where}):\n{lines}"


def save(overrides: Sequence[str], conf: Path | None = None, reset: bool = False) -> tuple[ProjectSettings, Config]:
    """Make `overrides` part of the project settings (on top of the current ones, or of none with `reset`).

    Everything is composed and validated in a scratch copy of `conf/` first; `conf/` changes only
    when the new settings compose to exactly the requested config.
    """
    conf = (conf or conf_dir()).resolve()
    _refuse_per_run(overrides)
    with tempfile.TemporaryDirectory(prefix="transferlab-compose-") as tmp:
        work = Path(tmp) / "conf"
        shutil.copytree(conf, work)
        if reset:
            _write(work, ProjectSettings(), {})
        raw, choices = compose_with_choices(overrides, work)
        cfg = validate(raw)
        options = {group: _base_option(work, group, choices.get(group)) for group in GROUPS}
        # Compared as written: a value conf/ derives (`${data.name}-classifier`) follows its source.
        written = compose_with_choices(overrides, work, resolve=False)[0]

        _write(work, ProjectSettings(), {})  # conf/ alone: its default options, then those options' values
        default_options = compose_with_choices([], work, missing_ok=True)[1]
        chosen = [f"{g}={o}" for g, o in options.items()]
        reference = compose_with_choices(chosen, work, missing_ok=True, resolve=False)[0]
        changed = {g: o for g, o in options.items() if o != default_options.get(g)}
        settings = ProjectSettings(changed, _differences(written, reference))

        _write(work, settings, options)
        again = compose_with_choices([], work)[0]
        if again != raw:
            key = next(k for k, v in _leaves("", raw) if dict(_leaves("", again)).get(k) != v)
            raise ConfigError(f"cannot save {key} as a project setting (keys cannot be removed): set a value instead")
    _write(conf, settings, options)
    return settings, cfg


def _refuse_per_run(overrides: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(first_line(exc)) from exc
    for override in parsed:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] in PER_RUN:
            raise ConfigError(f"{key} is chosen per run, not saved: pass it to `transferlab-train` instead")
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line} is a sweep: run it with `transferlab-train -m` instead")


def _base_option(conf: Path, group: str, choice: str | None) -> str:
    """The option a group's project option extends (or the choice itself when it is another option)."""
    if choice != SETTINGS_NAME:
        if choice is None:
            raise ConfigError(f"{group} must have an option")
        return choice
    defaults = (read_yaml(conf / group / f"{SETTINGS_NAME}.yaml") or {}).get("defaults") or []
    bases = [entry for entry in defaults if isinstance(entry, str) and entry != "_self_"]
    if len(bases) != 1:
        raise ConfigError(f"{conf / group / SETTINGS_NAME}.yaml must extend one {group} option in its defaults list")
    return bases[0]


def _differences(composed: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `composed` that differ from `reference`, nested as in the config."""
    changed: dict[str, Any] = {}
    for key, value in composed.items():
        before = reference.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = _differences(value, before)
            if inner:
                changed[key] = inner
        elif key not in reference or value != before:
            changed[key] = value
    return changed


def _write(conf: Path, settings: ProjectSettings, options: Mapping[str, str]) -> None:
    """Write conf/project.yaml and the group options it needs; delete group options it no longer needs."""
    defaults: list[Any] = []
    for group in GROUPS:
        group_file = conf / group / f"{SETTINGS_NAME}.yaml"
        if group in settings.values:
            option = options[group]
            body = {"defaults": [option, "_self_"], **settings.values[group]}
            atomic.write_text(group_file, GROUP_HEADER.format(group=group, option=option) + dump_yaml(body))
            defaults.append({f"override /{group}": SETTINGS_NAME})
        else:
            group_file.unlink(missing_ok=True)
            if group in settings.options:
                defaults.append({f"override /{group}": settings.options[group]})
    body = {key: value for key, value in settings.values.items() if key not in GROUPS}
    text = HEADER
    if defaults or body:
        text += dump_yaml({"defaults": [*defaults, "_self_"], **body})
    atomic.write_text(conf / f"{SETTINGS_NAME}.yaml", text)


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _leaves(prefix: str, node: Any) -> list[tuple[str, Any]]:
    if isinstance(node, Mapping) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(f"{prefix}.{key}" if prefix else key, value)]
    return [(prefix, node)]
