"""Pipeline configs: plain dataclasses whose fields carry docstrings, overridden with ``--set key=value``.

::

    @dataclass
    class Config:
        total_frames: int = 100_000
        \"\"\"Stop after this many env frames.\"\"\"
        lr: float = 1e-3
        \"\"\"Adam learning rate.\"\"\"

    cfg = apply_overrides(Config(), ["lr=3e-4", "total_frames=20_000"])
    field_docs(Config)   # {"total_frames": "Stop after this many env frames.", ...}

Values are parsed by the field's type: ``int`` (``100_000`` and ``1e5`` allowed), ``float``, ``bool``
(true/false/1/0/yes/no), ``str``, ``Literal[...]``, optional types (``none``), and tuples/lists of these written
comma-separated (``hidden=128,128``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

from streamrl.errors import ConfigError

REQUIRED_FIELDS = ("total_frames", "seed", "device", "num_envs")


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a dataclass (read from its source), a subclass's first."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    stmts = body.body
    for i, stmt in enumerate(stmts[:-1]):
        nxt = stmts[i + 1]
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parse(raw: str, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if raw == str(choice):
                return choice
        raise ConfigError(f"--set {name}={raw!r}: expected one of {list(choices)}")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(options) < len(get_args(tp)):
            return None
        errors = []
        for arg in options:
            try:
                return _parse(raw, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"--set {name}={raw!r}: " + "; ".join(errors))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = args[0] if args else str
        values = [_parse(part.strip(), inner, name) for part in raw.split(",") if part.strip()]
        return tuple(values) if origin is tuple else list(values)
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {name}={raw!r}: expected a bool (true/false)")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"--set {name}={raw!r}: expected an integer") from None
            if not value.is_integer():
                raise ConfigError(f"--set {name}={raw!r}: expected an integer") from None
            return int(value)
    if tp is float:
        try:
            return float(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--set {name}={raw!r}: expected a number") from None
    if tp is str or tp is Any:
        return raw
    raise ConfigError(f"--set {name}: fields of type {tp!r} cannot be set from the command line")


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of ``cfg`` with each ``key=value`` applied (parsed by the field's type)."""
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"a pipeline config must be a dataclass instance, got {type(cfg).__name__}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        if key not in names:
            raise ConfigError(f"--set {key}: {type(cfg).__name__} has no field {key!r}; its fields: {', '.join(names)}")
        changes[key] = _parse(raw.strip(), hints[key], key)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]  # checked by is_dataclass above


def config_from_record(cls: type, values: dict[str, Any]) -> Any:
    """The config a run recorded in its ``config.json`` (JSON lists back to the tuples the fields default to)."""
    defaults = cls()
    known = {f.name for f in dataclasses.fields(defaults)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"the run's config has fields {unknown} that {cls.__name__} lacks: resume with the "
                          "pipeline file the run started with")
    changes = {k: tuple(v) if isinstance(v, list) and isinstance(getattr(defaults, k), tuple) else v
               for k, v in values.items()}
    return dataclasses.replace(defaults, **changes)


def check_required(cfg: Any) -> None:
    missing = [name for name in REQUIRED_FIELDS if not hasattr(cfg, name)]
    if missing:
        raise ConfigError(
            f"{type(cfg).__name__} lacks the fields every pipeline config has: {missing}; add them to the dataclass"
        )
