"""One configuration schema per stage: the launchpad's `dg.Config` of a stage is derived
from the core's config dataclass, so a field, its type and its default are written once
(in the core) and the UI always offers exactly what the core accepts.

Tuples in the core become lists in Dagster's config (its schema has no tuples) and back.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import dagster as dg
import pydantic


def _as_config_type(annotation: Any, default: Any) -> tuple[Any, Any]:
    """Dagster config has lists, not tuples: tuple[str, ...] -> list[str] (also inside `| None`)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return list[args[0]], list(default)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if typing.get_origin(inner) is tuple:
            return list[typing.get_args(inner)[0]] | None, None if default is None else list(default)
    return annotation, default


def settings_for(
    core: type,
    doc: str,
    *,
    exclude: tuple[str, ...] = (),
    extra: dict[str, tuple[Any, Any]] | None = None,
) -> type[dg.Config]:
    """A `dg.Config` class with the fields of the core dataclass `core` (less `exclude`,
    which the asset fills in itself) plus `extra` asset-only fields (name: (type, default))."""
    hints = typing.get_type_hints(core)
    fields = {
        field.name: _as_config_type(hints[field.name], field.default)
        for field in dataclasses.fields(core)
        if field.name not in exclude
    }
    fields.update(extra or {})
    name = core.__name__.replace("Config", "Settings")
    return pydantic.create_model(name, __base__=dg.Config, __doc__=doc, __module__=core.__module__, **fields)


def core_config(core: type, settings: dg.Config, **values: Any) -> Any:
    """The core config from the launchpad's settings (and the `values` the asset decides)."""
    names = {field.name for field in dataclasses.fields(core)}
    given = {key: value for key, value in settings.model_dump().items() if key in names}
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in given.items()}
    return core(**given, **values)
