"""Build typed dataclass configs from plain dicts (YAML/JSON) with errors that name the field path,
say what was expected and suggest the closest known name for a typo."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of dataclass `cls` from `data` (a dict, or an instance already)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping of {cls.__name__} fields, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(fields))})"
        raise ValueError(f"{_join(where, k)}: unknown field{hint}")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain dicts/lists of a (nested) dataclass config, for saving next to a run."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def _convert(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, v, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {_show(v)} matches none of {tp}")
    if origin is typing.Literal:
        if v not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {_show(v)}")
        return v
    if dataclasses.is_dataclass(tp):
        return build(tp, v, where)
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {_show(v)}")
        inner = args[0] if args else Any
        return [_convert(inner, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a mapping, got {_show(v)}")
        inner = args[1] if len(args) == 2 else Any
        return {k: _convert(inner, x, _join(where, k)) for k, x in v.items()}
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{where}: expected true or false, got {_show(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: expected an integer, got {_show(v)}")
        return v
    if tp is float:
        if isinstance(v, str):       # YAML reads 1e-4 as a string; accept numeric strings
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: expected a number, got {_show(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ValueError(f"{where}: expected a string, got {_show(v)}")
        return v
    return v
