"""Where settings come from besides flags: ``DRKIT_*`` environment variables and the TOML file,
merged section by section (flags > environment > file > defaults).

The environment is read by pydantic-settings' rules, without importing it (that import alone is
a good part of every command's start-up): variable names are case-insensitive, ``__`` reaches
into a section (``DRKIT_POSTGRES__PORT=5433``), and a value for a section, a list or a
mapping (``DRKIT_REPO='[{"name": ...}]'``) is JSON. Variables that name no setting
(``DRKIT_CONFIG``, ``DRKIT_LOG_LEVEL``) are not settings and are left alone.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

PREFIX = "drkit_"
NESTED = "__"


class EnvironmentValueError(ValueError):
    """A ``DRKIT_*`` variable whose value is not the JSON its setting needs."""


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top: tables merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def environment_values(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings ``environ`` gives ``model``'s fields, nested like the file."""
    variables = {k.lower(): v for k, v in environ.items() if k.lower().startswith(PREFIX)}
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        env_name = PREFIX + name
        direct = variables.get(env_name)
        nested = _exploded(field, env_name + NESTED, variables)
        complex_, lenient = _is_complex(field.annotation)
        if direct is not None and complex_:
            value = _decoded(env_name, direct, lenient)
            values[name] = deep_merge(value, nested) if isinstance(value, dict) else value
        elif direct is not None:
            values[name] = direct
        elif nested:
            values[name] = nested
    return values


def _exploded(field: FieldInfo, prefix: str, variables: Mapping[str, str]) -> dict[str, Any]:
    """``PREFIX_FIELD__A__B=value`` as ``{"a": {"b": value}}``; a value for a section, a list or
    a mapping decoded from JSON."""
    result: dict[str, Any] = {}
    for env_name, raw in variables.items():
        if not env_name.startswith(prefix):
            continue
        *keys, last = env_name[len(prefix) :].split(NESTED)
        target: Any = field.annotation
        table = result
        for key in keys:
            target = _member(target, key)
            nested = table.setdefault(key, {})
            if not isinstance(nested, dict):
                break
            table = nested
        else:
            parent_is_mapping = _is_mapping(target)
            target = _member(target, last)
            value: Any = raw
            if raw and (target is not None or parent_is_mapping):
                complex_, lenient = (True, True) if target is None else _is_complex(target)
                if complex_:
                    value = _decoded(env_name, raw, lenient)
            if last not in table or table[last] == {}:
                table[last] = value
    return result


def _member(annotation: Any, key: str) -> Any:
    """The type of ``key`` inside ``annotation`` (a model's field, found by name or alias
    without regard to case, or a mapping's values), or None."""
    if annotation is None:
        return None
    if _is_mapping(annotation):
        args = typing.get_args(annotation)
        return args[-1] if args else None
    for arg in typing.get_args(annotation):
        found = _member(arg, key)
        if found is not None:
            return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if key in (name.lower(), (field.alias or "").lower()):
                return field.annotation
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _is_complex(annotation: Any) -> tuple[bool, bool]:
    """Whether a value for ``annotation`` is JSON, and whether a value that is not JSON may
    still be given (a union of a complex type with a simple one)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        kinds = [
            _is_complex(arg)[0] for arg in typing.get_args(annotation) if arg is not type(None)
        ]
        return any(kinds), any(kinds) and not all(kinds)
    origin = typing.get_origin(annotation) or annotation
    if typing.get_origin(annotation) is typing.Annotated:
        return _is_complex(typing.get_args(annotation)[0])
    complex_ = isinstance(origin, type) and (
        issubclass(origin, BaseModel | list | set | tuple | frozenset) or _is_mapping(origin)
    )
    return complex_, False


def _decoded(env_name: str, raw: str, lenient: bool) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        if lenient:
            return raw
        raise EnvironmentValueError(
            f"environment variable {env_name.upper()} is not valid JSON, which this setting needs"
        ) from None
