"""Typed configuration: one loader, one override syntax, one command front-end.

Every config is a pydantic model with `extra="forbid"` (`StrictModel`), so a misspelt key is an
error that names the key instead of a silent default. `load_config` builds one from three layers,
later ones winning:

1. the YAML file (`--config FILE.yaml`), on top of an optional `base` mapping (defaults);
2. overrides, `key.path=value` strings: the value is parsed as YAML (`3`, `true`, `[1, 2]`,
   `{a: 1}`), except that a field typed `str` keeps the text as written (`run.name=001`);
3. a command's own flags, mapped to config paths (`--data X` is `data.dir=X` with the value
   argparse gave), applied through the same mechanism, after the overrides.

Override keys are checked against the model before validation: an unknown key or a key below a
field that is not a section is an error naming the key. `add_config_arguments`,
`parse_config` and `usage_errors` are the argparse front-end every command with a typed config shares.
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ehrfm.paths import absolute_path

T = TypeVar("T", bound="StrictModel")

# a `key.path=value` string, or an already typed (key.path, value) pair (flags, Serve builder args)
Override = str | tuple[str, Any]
# argparse dest -> config path, or a function of the flag's value giving {config path: value}
FlagMap = Mapping[str, str | Callable[[Any], Mapping[str, Any]]]


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are rejected, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ConfigError(ValueError):
    """A config that cannot be built; the message names the key."""


def _parse(item: Override) -> tuple[str, Any, str | None]:
    """(key, value, the text as written or None for a typed pair)."""
    if not isinstance(item, str):
        key, value = item
        return key, value, None
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        return key, yaml.safe_load(raw), raw.strip()
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override {key}: value {raw.strip()!r} is not valid YAML ({reason})") from err


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X (a union of several types other than None is left as it is)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _sections(node: Any) -> tuple[dict[str, Any], bool] | None:
    """(field annotations, unknown keys forbidden) of a pydantic model or dataclass; None otherwise."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        return {k: f.annotation for k, f in node.model_fields.items()}, node.model_config.get("extra") == "forbid"
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(node)
        forbid = getattr(node, "__pydantic_config__", {}).get("extra") == "forbid"
        return {f.name: hints[f.name] for f in dataclasses.fields(node)}, forbid
    return None


def _field_type(cls: type, key: str) -> Any:
    """The annotation `key` names in `cls`; `Any` below a mapping of free-form values.
    Raises ConfigError for an unknown key or a key below a field that is not a section."""
    node: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        node, where = _unwrap(node), ".".join(parts[:i])
        if (section := _sections(node)) is not None:
            fields, forbid = section
            if part not in fields:
                if not forbid:
                    return Any
                known = ", ".join(fields)
                raise ConfigError(f"unknown key {'.'.join(parts[: i + 1])!r} ({where or 'top level'} has: {known})")
            node = fields[part]
        elif typing.get_origin(node) in (dict, collections.abc.Mapping) or node in (dict, Any):
            args = typing.get_args(node)
            node = args[1] if len(args) == 2 else Any  # `part` is a dict key; descend into the value type
        else:
            raise ConfigError(f"override {key}: {where!r} is not a section")
    return node


def _set(data: dict[str, Any], key: str, value: Any, merge: bool) -> None:
    node = data
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[: i + 1])!r} is not a section")
    if merge and isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for inner_key, inner in value.items():
            _set(node[leaf], inner_key, inner, merge)
    else:
        node[leaf] = value


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[Override], cls: type[BaseModel] | None = None, merge: bool = False
) -> dict[str, Any]:
    """Apply overrides to a nested dict, in place. With `cls`, keys are checked against the model
    and a `str` field keeps the override's text; with `merge`, a mapping value merges into an
    existing section instead of replacing it (Serve builder args)."""
    for item in overrides:
        key, value, raw = _parse(item)
        if cls is not None:
            field = _unwrap(_field_type(cls, key))
            if field is str and raw is not None and not isinstance(value, str) and value is not None:
                value = raw
        _set(data, key, value, merge)
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[Override] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    merge: bool = False,
) -> T:
    """Build `cls` from `base` (merged key by key with) an optional YAML file, then overrides;
    the model's defaults fill everything else. Errors are ConfigError (a ValueError) naming the key."""
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping, got {type(loaded).__name__}")
        _merge(data, loaded)
    apply_overrides(data, overrides or [], cls, merge)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid {cls.__name__}{f' ({path})' if path else ''}: {problems}") from err


def split_overrides(overrides: Iterable[Override], section: str) -> tuple[list[Override], list[Override]]:
    """(the overrides outside `section.`, those under it with the prefix removed)."""
    outside: list[Override] = []
    inside: list[Override] = []
    prefix = section + "."
    for item in overrides:
        key = item.partition("=")[0].strip() if isinstance(item, str) else item[0]
        if key.startswith(prefix):
            inside.append(item[len(prefix) :] if isinstance(item, str) else (key[len(prefix) :], item[1]))
        else:
            outside.append(item)
    return outside, inside


def dump_config(config: BaseModel) -> str:
    """YAML text of a config, for logging next to a run's outputs."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---- the command front-end ---------------------------------------------------------------------------
def add_config_arguments(
    parser: argparse.ArgumentParser, what: str, *, flag: str = "--config", default: str | None = None
) -> None:
    """`--config FILE` (a YAML of `what`) and the positional `key.path=value` overrides."""
    parser.add_argument(flag, default=default, help=f"{what} YAML" + (f" (default {default})" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help=f"{what} overrides")


def flag_overrides(args: argparse.Namespace, flags: FlagMap) -> list[Override]:
    """(config path, value) of every flag that was given (not None), in `flags` order."""
    out: list[Override] = []
    for dest, target in flags.items():
        value = getattr(args, dest)
        if value is not None:
            out += [(target, value)] if isinstance(target, str) else list(target(value).items())
    return out


def out_dir(storage_key: str, name_key: str) -> Callable[[str], dict[str, str]]:
    """An `--out DIR` flag: DIR (made absolute) is <storage_key>/<name_key>."""

    def settings(value: str) -> dict[str, str]:
        path = Path(absolute_path(value))
        return {storage_key: str(path.parent), name_key: path.name}

    return settings


def parse_config(
    parser: argparse.ArgumentParser,
    cls: type[T],
    args: argparse.Namespace,
    flags: FlagMap | None = None,
    *,
    config: str = "config",
    overrides: str = "overrides",
    base: Mapping[str, Any] | None = None,
) -> T:
    """`cls` from a parsed command line: the YAML file in `args.<config>`, the overrides in
    `args.<overrides>`, then the flags in `flags`; a bad config is a usage error naming the key."""
    settings = [*getattr(args, overrides), *flag_overrides(args, flags or {})]
    with usage_errors(parser):
        return load_config(cls, getattr(args, config), settings, base=base)


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ConfigError or a missing config file inside the block is the command's usage error (exit 2)."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as err:
        parser.error(str(err))
