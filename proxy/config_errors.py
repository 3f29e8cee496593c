"""A configuration problem as the line `lmswitch` prints: the dotted key (and the `LMSWITCH_*`
variable it came from), then what is wrong, with the key most likely meant or the shape that
was expected. Pure: it reads pydantic's error, the settings model and the environment."""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, TypeGuard, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

_NAMES = "a list of model names"
_PATTERNS = "a list of model names or patterns"
# What a list or a mapping holds, by its key (list indexes left out), for "should be ...".
_SHAPES = {
    "models.pinned": _NAMES,
    "models.preload": _NAMES,
    "auth.api_keys": "a list of keys",
    "auth.admin_keys": "a list of keys",
    "auth.keys": "a list of keys, each a mapping with name and key or key_sha256",
    "auth.keys.models": _PATTERNS,
    "upstreams": "a list of hosts, each a mapping with name and base_url",
    "models.aliases": "a mapping of names to model keys",
    "models.load_options": "a mapping of model keys to load options",
    "models.replicas": "a mapping of model keys to numbers of hosts",
}
_SHAPE_ERRORS = {
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping of keys",
}
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def describe_error(error: ErrorDetails, root: type[BaseModel], env_prefix: str) -> str:
    """`error`, from validating the settings model `root` (whose variables start with
    `env_prefix`), as one line."""
    loc = error["loc"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    variable, own = _variable_of(loc, env_prefix)
    where = key if variable is None else f"{key} ({variable if own else f'in {variable}'})"
    if error["type"] == "extra_forbidden":
        if (meant := _meant(loc, root)) is None:
            return f"{where}: unknown key"
        if own:  # the variable that would set the key meant
            meant = env_prefix + meant.replace(".", "__").upper()
        return f"{where}: unknown key; did you mean {meant}?"
    return f"{where}: {_problem(error, from_env=variable is not None)}"


def _problem(error: ErrorDetails, *, from_env: bool) -> str:
    loc = error["loc"]
    kind, ctx = error["type"], error.get("ctx", {})
    value = error.get("input")
    secret = loc[:1] == ("auth",) or "api_token" in loc  # never echo a key
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        return f"must be {op} {ctx.get(name)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in _SHAPE_ERRORS:
        shape = _SHAPES.get(_path(loc), _SHAPE_ERRORS[kind])
        message = f"should be {shape}"
        if shape in (_NAMES, _PATTERNS) and isinstance(value, str):  # one name for a list of one
            message += f", e.g. {json.dumps([value]) if from_env else f'[{value}]'}"
    else:
        message = error["msg"][:1].lower() + error["msg"][1:]
    if isinstance(value, str | int | float) and not secret:
        return f"{message} (got {value!r})"
    return message


def _path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, int))


def _variable_of(loc: tuple[int | str, ...], env_prefix: str) -> tuple[str | None, bool]:
    """The variable a value at `loc` came from, if one is set, and whether it is the key's own
    (`LMSWITCH_MODELS__MAX_LOADED`) rather than one holding it as JSON (`LMSWITCH_UPSTREAMS`)."""
    names = {name.upper(): name for name in os.environ}
    for end in range(len(loc), 0, -1):
        name = names.get(env_prefix + "__".join(str(part) for part in loc[:end]).upper())
        if name is not None:
            return name, end == len(loc)
    return None, False


def _meant(loc: tuple[int | str, ...], root: type[BaseModel]) -> str | None:
    """The key an unknown key at `loc` most likely meant: one of its name in another section
    (`models.queue_timeout` is `scheduler.queue_timeout`), else a close one in its place, else
    the one in its place it is the start of."""
    *parent, unknown = loc
    here = _section_at(tuple(parent), root)
    if here is None:
        return None
    if len(parent) == 1:
        for section, field in root.model_fields.items():
            if _is_section(field.annotation) and str(unknown) in field.annotation.model_fields:
                return f"{section}.{unknown}"
    wanted, fields = str(unknown).lower(), list(here.model_fields)
    close = difflib.get_close_matches(wanted, fields, n=1)
    if not close and len(wanted) >= 3:  # the start of one (`flash`: `flash_attention`)
        close = [field for field in fields if field.startswith(wanted)][:2]
    return ".".join([*map(str, parent), close[0]]) if len(close) == 1 else None


def _section_at(loc: tuple[int | str, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model whose keys are at `loc` (`()`: `root`'s), following list indexes and mapping
    keys; None if there is none."""
    kind: Any = root
    for part in loc:
        if _is_section(kind):
            field = kind.model_fields.get(str(part))
            kind = None if field is None else field.annotation
        elif get_origin(kind) is tuple:
            kind = get_args(kind)[0]
        elif get_origin(kind) is dict:
            kind = get_args(kind)[1]
        else:
            return None
    return kind if _is_section(kind) else None


def _is_section(kind: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(kind, type) and issubclass(kind, BaseModel)
