"""Strict (de)serialisation between config dataclasses and YAML-like data, with dotted-path errors.

Python objects are primary; YAML is their serialisation. Fields typed by a protocol
(``TransferPolicy``, ``Codec`` …) are written as mappings with a ``kind:`` tag resolved by
:mod:`fedtransfer.experiment.registry`. Unknown keys, missing kinds and type mismatches raise
:class:`~fedtransfer.errors.ConfigError` naming the dotted path, e.g. ``arms.1.training.lr``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fedtransfer.errors import ConfigError
from fedtransfer.experiment import registry

T = TypeVar("T")


def parse(tp: Any, data: Any, path: str = "") -> Any:
    """Build a value of type ``tp`` from plain data, strictly."""
    where = path or "<root>"
    origin = get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return parse(opt, data, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no type matched: {errors}")
    if origin is Literal:
        if data not in get_args(tp):
            raise ConfigError(f"{where}: {data!r} is not one of {list(get_args(tp))}")
        return data
    if origin in (tuple, list, Sequence):
        return _parse_sequence(tp, data, path)
    if origin in (dict, Mapping):
        _, vt = get_args(tp)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
        return {str(k): parse(vt, v, _join(path, str(k))) for k, v in data.items()}
    if tp in registry.GROUPS:
        return _parse_component(tp, data, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _parse_dataclass(tp, data, path)
    return _parse_scalar(tp, data, where)


def _parse_scalar(tp: Any, data: Any, where: str) -> Any:
    if tp is type(None):
        if data is not None:
            raise ConfigError(f"{where}: expected null, got {_show(data)}")
        return None
    if tp is bool:
        if not isinstance(data, bool):
            raise ConfigError(f"{where}: expected true/false, got {_show(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ConfigError(f"{where}: expected an integer, got {_show(data)}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise ConfigError(f"{where}: expected a number, got {_show(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise ConfigError(f"{where}: expected a string, got {_show(data)}")
        return data
    raise ConfigError(f"{where}: cannot read a value of type {tp!r} from config")


def _parse_sequence(tp: Any, data: Any, path: str) -> Any:
    where = path or "<root>"
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise ConfigError(f"{where}: expected a list, got {_show(data)}")
    args = get_args(tp)
    if get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(data) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(data)}")
        return tuple(
            parse(a, v, _join(path, str(i)))
            for i, (a, v) in enumerate(zip(args, data, strict=True))
        )
    item = args[0] if args else Any
    values = [parse(item, v, _join(path, str(i))) for i, v in enumerate(data)]
    return tuple(values) if get_origin(tp) is tuple else values


def _parse_component(tp: Any, data: Any, path: str) -> Any:
    where = path or "<root>"
    kinds = registry.kinds(tp)
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ConfigError(
            f"{where}: expected a mapping with a 'kind:' tag, one of {sorted(kinds)}; got {_show(data)}"
        )
    kind = data["kind"]
    if kind not in kinds:
        near = difflib.get_close_matches(str(kind), kinds, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"{_join(path, 'kind')}: unknown kind {kind!r}; expected one of {sorted(kinds)}{hint}"
        )
    return _parse_dataclass(kinds[kind], {k: v for k, v in data.items() if k != "kind"}, path)


def _parse_dataclass(cls: type[T], data: Any, path: str) -> T:
    where = path or "<root>"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    data = {k: v for k, v in data.items() if not (k == "kind" and registry.kind_of(cls) == v)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.4)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"{_join(path, key)}: unknown key for {cls.__name__}; expected one of {sorted(fields)}{hint}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: parse(hints[k], v, _join(path, k)) for k, v in data.items()}
    prefix = f"{path}: " if path else ""
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def dump(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config object, with ``kind:`` tags."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        kind = registry.kind_of(type(obj))
        if kind is not None:
            out["kind"] = kind
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.init and not (value is None and f.default is None):
                out[f.name] = dump(value)
        return out
    if isinstance(obj, tuple | list):
        return [dump(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): dump(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    """YAML text of a config object."""
    return yaml.safe_dump(dump(obj), sort_keys=False, default_flow_style=None)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=v`` overrides (values parsed as YAML) to plain config data.

    Path segments index mappings by key and lists by position or by an item's ``name``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE, e.g. rounds=40 or arms.scratch.training.lr=0.1"
            )
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: value {raw!r} is not valid YAML: {exc}") from None
        parts = dotted.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, part, here)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), dict | list):
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"--set {dotted}: {here} is a {type(node).__name__}, not a mapping or list"
                )
    return data


def _list_index(node: list[Any], part: str, here: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for idx, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    names = [item.get("name") for item in node if isinstance(item, dict)]
    raise ConfigError(
        f"--set {here}: no list item {part!r}; use an index < {len(node)} or a name in {names}"
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(data: Any) -> str:
    text = repr(data)
    return f"{type(data).__name__} {text if len(text) < 60 else text[:57] + '...'}"
