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

Before a run starts, :func:`validate_config` checks the values every pipeline shares, and raises
:class:`~streamrl.errors.ConfigError` naming the field, the value and what is allowed:

* the fields every config has (``total_frames``, ``seed``, ``device``, ``num_envs``) exist;
* counts are whole numbers >= 1: ``total_frames``, ``num_envs``, ``frames_per_chunk``, ``batch_size``, ``replicas``,
  ``buffer_size``, ``minibatch_size``, ``epochs`` (where the config has them);
* ``buffer_size >= batch_size`` (a batch is drawn from the buffer);
* learning rates (``lr``, ``*_lr``, ``lr_*``, ``*learning_rate*``) are finite and > 0;
* no float field is NaN (infinity stays allowed elsewhere: ``max_grad_norm=inf`` means no clipping);
* ``device`` is one that exists here: ``cpu``, ``auto``, and ``cuda``/``cuda:N``/``mps`` when available.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

from streamrl.errors import ConfigError

REQUIRED_FIELDS = ("total_frames", "seed", "device", "num_envs")
POSITIVE_COUNTS = ("total_frames", "num_envs", "frames_per_chunk", "batch_size", "buffer_size", "minibatch_size",
                   "epochs", "replicas")


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


def _parse_overrides(cls: type, overrides: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` parsed by the types of the fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        if key not in names:
            raise ConfigError(f"--set {key}: {cls.__name__} has no field {key!r}; its fields: {', '.join(names)}")
        changes[key] = _parse(raw.strip(), hints[key], key)
    return changes


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of ``cfg`` with each ``key=value`` applied (parsed by the field's type)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ConfigError(f"a pipeline config must be a dataclass instance, got {type(cfg).__name__}")
    return dataclasses.replace(cfg, **_parse_overrides(type(cfg), overrides))  # type: ignore[type-var]


def make_config(cls: type, overrides: list[str]) -> Any:
    """A new ``cls`` with the overrides applied; a field without a default must be one of them.

    ::

        make_config(Config, ["seed=3"])   # ConfigError if Config has a field without default that is not set
    """
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"a pipeline config must be a dataclass, got {cls!r}")
    values = _parse_overrides(cls, overrides)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__} fields {missing} have no default: give them with "
                          + " ".join(f"--set {name}=VALUE" for name in missing))
    return cls(**values)


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
    """The fields every pipeline config has (``REQUIRED_FIELDS``) are there."""
    missing = [name for name in REQUIRED_FIELDS if not hasattr(cfg, name)]
    if missing:
        raise ConfigError(
            f"{type(cfg).__name__} lacks the fields every pipeline config has: {missing}; add them to the dataclass"
        )


def validate_config(cfg: Any) -> None:
    """Check the values every pipeline shares (see the module docstring); raise ConfigError naming the field."""
    check_required(cfg)
    values = dataclasses.asdict(cfg)
    for name, value in values.items():
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{name}=nan: NaN is not a setting; give a number (--set {name}=VALUE)")
    for name in POSITIVE_COUNTS:
        value = values.get(name)
        if name in values and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value!r}: expected a whole number >= 1 (--set {name}=N)")
    for name, value in values.items():
        if _is_learning_rate(name) and isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: a learning rate must be a finite number > 0, e.g. 3e-4")
    if "buffer_size" in values and "batch_size" in values and values["buffer_size"] < values["batch_size"]:
        raise ConfigError(f"buffer_size={values['buffer_size']} is smaller than batch_size={values['batch_size']}: "
                          "a batch is drawn from the buffer; raise buffer_size or lower batch_size")
    check_device(values["device"])


def _is_learning_rate(name: str) -> bool:
    return name == "lr" or name.endswith("_lr") or name.startswith("lr_") or "learning_rate" in name


def available_devices() -> list[str]:
    """The devices a run can use here: ``cpu``, ``auto``, and ``cuda``, ``cuda:N``, ``mps`` when present."""
    import torch

    devices = ["cpu", "auto"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: Any) -> None:
    """ConfigError unless ``device`` (a config's ``device`` field) names a device that exists here."""
    if device is None or not isinstance(device, str):
        return  # a torch.device or None set by the pipeline itself: the pipeline decides
    devices = available_devices()
    if device not in devices:
        hint = " (no CUDA here: torch.cuda.is_available() is False)" if device.startswith("cuda") else ""
        raise ConfigError(f"device={device!r} is not a device here{hint}; allowed: {', '.join(devices)}")
