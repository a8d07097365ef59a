"""From YAML text and `key=value` strings to typed dataclasses, for any schema: the reading and
typing `config` applies to its sections, with errors that name the dotted key.

    raw = apply_overrides(read_yaml("c.yaml"), ["train.epochs=5"], Config)
    cfg = build(Config, raw)       # ConfigError: "unknown key 'train.epohcs'; allowed keys: ..."

A section type may declare `config_upgrade(raw, key)` (read keys of an older version) and
`config_class(raw)` (the class a raw section stands for, e.g. the options of the method it names).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

SEED_LIMIT = 2**32  # seeds are integers in [0, SEED_LIMIT)


def parse_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                value = float(num) / float(den)
            else:
                value = float(text)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key} must be a number (or a fraction like 8/255), got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number (or a fraction like 8/255), got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and _named(tp):
            value = {"name": value}
        if isinstance(value, dict) and hasattr(tp, "config_class"):
            tp = tp.config_class(value)  # a section whose fields depend on its name (method)
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        return parse_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def build(cls: type, data: Any, key: str = "") -> Any:
    """Type `data` (a mapping) as dataclass `cls`; errors name the dotted key and allowed keys."""
    where = key or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    if hasattr(cls, "config_upgrade"):  # a section whose keys changed reads its old ones
        data = cls.config_upgrade(data, where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown key '{prefix}{k}'; allowed keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _convert(hints[name], data[name], prefix + name)
    return cls(**kwargs)


def _named(tp: Any) -> bool:
    """Whether `tp` is a config section with a `name` (data, model, method): one that may be given
    by its name alone (`method=trades`, `model: resnet18`)."""
    return dataclasses.is_dataclass(tp) and any(f.name == "name" for f in dataclasses.fields(tp))


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of dataclass `cls` in its source (its meaning, as the code gives
    it), by field name; "" for a field without one. Read with `tokenize`, so a `#` in a string is not one."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a field's comment in the class that (re)declares it last
        if dataclasses.is_dataclass(base) and base is not object:
            comments.update({k: v for k, v in _own_comments(base).items() if v})
    return {f.name: comments.get(f.name, "") for f in dataclasses.fields(cls)}


def _own_comments(cls: type) -> dict[str, str]:
    """The comments of the fields `cls`'s own source declares."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    current = None  # the field whose statement the tokens are in (a comment inside it is its meaning)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and current is None and token.string in names:
            current = token.string
        elif token.type == tokenize.COMMENT and current is not None:
            comments[current] = (comments.get(current, "") + " " + token.string.lstrip("#").strip()).strip()
        elif token.type == tokenize.NEWLINE:
            current = None
    return comments


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.epochs=5)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        out.append((parts, value))
    return out


def _field_type(tp: Any, part: str) -> Any:
    """The type of key `part` inside a section of type `tp` (a dataclass, or a mapping of them); None if unknown."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    if typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1]
    if dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp).get(part)
    return None


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str], schema: type) -> dict[str, Any]:
    """Set each dotted `key=value` in the raw mapping of dataclass `schema`; a named section given
    by its name (`method: trades`) becomes {name: ...} when a key inside it is set (`method.beta=3`)."""
    for parts, value in parse_overrides(overrides):
        node, tp = raw, schema
        for i, part in enumerate(parts[:-1]):
            child, tp = node.get(part), _field_type(tp, part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and _named(tp):
                child = node[part] = {"name": child}
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set '{'.'.join(parts)}': '{'.'.join(parts[: i + 1])}' is not a mapping")
            node = child
        _check_section_value(_field_type(tp, parts[-1]), ".".join(parts), value)
        node[parts[-1]] = value
    return raw


def _check_section_value(tp: Any, key: str, value: Any) -> None:
    """An override that sets a whole section must give it as a mapping (a named section: or its name;
    an optional one: or null); `train=` would otherwise silently put every key back to its default."""
    optional = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if not dataclasses.is_dataclass(tp) or isinstance(value, dict) or (value is None and optional):
        return
    if isinstance(value, str) and _named(tp):
        return
    raise ConfigError(
        f"override '{key}={'' if value is None else value}' would replace the whole {key} section: set its keys "
        f"one by one ({key}.<key>=<value>)" + (f", or name it ({key}=<name>)" if _named(tp) else "")
    )


MAX_YAML_BYTES = 1_000_000  # a config, a grid: kilobytes; anything near this is not one
MAX_YAML_ALIASES = 20  # aliases (*name) expand to at most ~3^(20/3) ~ 1,500 items; a "billion laughs" file nests 1e9


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"duplicate key '{key}' (line {mark.line + 1}): give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes: larger than a config can be ({MAX_YAML_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start})") from None
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise ConfigError(f"{path} uses {aliases} YAML aliases (at most {MAX_YAML_ALIASES}): not a config")
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    return raw
