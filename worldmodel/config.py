"""Presets as plain YAML, typed per-module config dataclasses, and `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

# the presets ship as the `configs` package's data, beside this package in a source tree and in an installed wheel
# alike; found by this file's place, never through the import path, where a `configs` folder of the user's own
# working directory would come first
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or override that does not match the config dataclasses."""


def whole(value: Any, low: int | None = None) -> bool:
    """An integer, Python's or numpy's but not a bool (`True` is an int), of at least `low` when given."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    return is_int and (low is None or value >= low)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (`tiny`) to `configs/tiny.yaml`, or return an existing YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; expected one of {known} or a path to a .yaml file")
    return candidate


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ConfigError naming `what` the file is (`preset`, `run config`) where it is not
    text, not YAML, empty, or something other than a mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {_one_line(err)}") from None
    if raw is None:
        raise ConfigError(f"{what} {path} is empty; expected a mapping of sections (collect:, tokenizer:, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error's problem and where, on one line ("expected ',' or ']' ... at line 3, column 9")."""
    return " ".join(str(err).split())


def load_preset(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a preset into nested dicts and apply `section.key=value` overrides (values parsed as YAML)."""
    raw = read_yaml_mapping(preset_path(name_or_path), "preset")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in nested dicts; the value is parsed as YAML (`3`, `1e-3`, `[8, 6, 5]`, `true`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key!r} is not a section")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value {value!r} is not valid YAML ({_one_line(err)})") from None
    node[keys[-1]] = _numeric(parsed)


def _numeric(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string: turn such strings into floats, leave the rest alone."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses and rejecting unknown keys."""
    data = dict(data or {})
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass that checks its own values (`__post_init__`)
        raise ConfigError(f"{where}: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_coerce(item_hint, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        value = _numeric(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON/YAML-able data."""
    return dataclasses.asdict(config)


def check_run_name(name: Any, what: str = "run.name") -> str:
    """`name` if it names one folder (the run's, made under `runs_dir`); ConfigError for a path (`../x`, `a/b`),
    `.`, `..` or an empty name."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"{what}: expected a plain folder name (no / or \\, not . or ..), got {name!r}; the run's folder is made"
            " under run.runs_dir, which takes a path"
        )
    return name


@dataclasses.dataclass
class RunConfig:
    name: str = "tiny"
    """Run folder name under `runs_dir`."""
    runs_dir: str = "runs"
    device: str = "cpu"
    """cpu, cuda, or auto."""
    wandb: typing.Literal["disabled", "offline", "online"] = "disabled"
    val_fraction: float = 0.1
    """Fraction of episodes held out for validation (every k-th episode)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    time_scale: float | str = 1.0
    """Multiplies every minute budget of the stages (tokenizer, dynamics, PPO and the loop's; the preset's and those
    given as overrides alike) as the config is loaded. The presets' minutes were set on one 2-core CPU; a machine N
    times slower trains as many steps with N (the summary prints the steps each stage trained). `auto`:
    `worldmodel run` measures N when the run starts (a few seconds of the tokenizer's and the dynamics model's
    training steps against `reference_rates`, never below 1; a resumed run keeps the scale it started with). A run's
    config.yaml holds the minutes it ran with, so it records 1.0 here, and the factor in `scaled_by`."""
    scaled_by: float = 1.0
    """What the minute budgets were multiplied by (`time_scale`): a record in a run's config.yaml, not a setting
    (refused as an override)."""
    reference_rates: tuple[float, float] | None = None
    """The tokenizer's and the dynamics model's training steps/s (`worldmodel bench train-step`, float32) on the
    machine where the preset's minutes were set: what `time_scale: auto` compares this machine with."""

    def __post_init__(self) -> None:
        check_run_name(self.name)
