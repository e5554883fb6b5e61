"""One-line messages for params that fail validation: the file, the dotted key, what was expected.

A pydantic traceback ten frames deep is useless to someone who just mistyped a YAML value, so every
validation error is turned into ``params.yaml: self_align.temperature: expected a number >= 0, got
"hot"``. This module only formats; the typed sections that declare the bounds live in ``config.py``.
"""

from __future__ import annotations

import json
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

__all__ = ["ConfigError", "format_error"]


class ConfigError(ValueError):
    """A params file that cannot be used; ``str()`` is the one-line message shown to the user."""


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "dict": "a mapping",
    "list": "a list",
    "tuple": "a list",
    "model": "a mapping",
}


def _num(value: Any) -> str:
    """``0.0`` -> ``0``: bounds read as a person would write them."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe_expected(error: dict[str, Any], constraints: str) -> str:
    """Turn one pydantic error into the 'expected …' phrase of our message."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}"
    for op, key in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt")):
        if key in ctx:
            return f"expected a number {op} {_num(ctx[key])}"
    base = kind.split("_")[0]
    word = _TYPE_WORDS.get(base)
    if word is None:
        return error["msg"].lower()
    return f"expected {word}{constraints}"


def _field_constraints(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Numeric bounds declared on the field at ``loc`` (so a type error still states them)."""
    current: Any = model
    info = None
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        info = fields[part]
        current = info.annotation
    if info is None:
        return ""
    parts = []
    for meta in info.metadata:
        for cls, op, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
            if isinstance(meta, cls):
                parts.append(f"{op} {_num(getattr(meta, attr))}")
    return (" " + " and ".join(parts)) if parts else ""


def format_error(model: type[BaseModel], source: str, error: dict[str, Any]) -> str:
    """One pydantic error of validating ``model`` (the root, e.g. ``Config``) as a one-line message.

    ``error['loc']`` is read from ``model`` down, so the bounds a field declares are looked up there.
    """
    loc = tuple(error["loc"])
    dotted = ".".join(str(p) for p in loc) or "<root>"
    expected = _describe_expected(error, _field_constraints(model, loc))
    if error["type"] in ("missing",):
        return f"{source}: {dotted}: {expected}"
    return f"{source}: {dotted}: {expected}, got {json.dumps(error.get('input'), default=str)}"
