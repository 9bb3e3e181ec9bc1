"""Typed configs from the command line: `key=value` overrides on frozen dataclasses.

Dotted keys reach nested dataclasses (`rl.group_size=8`); values are parsed by the
field's annotation, so a typo or a bad value fails before anything runs.
"""
import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _parse(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}={value!r}: " + "; ".join(errors))
    if origin is Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise ValueError(f"{key}={value!r}: choose from {list(args)}")
    if origin is tuple:
        items = [v for v in value.strip("()[]").split(",") if v.strip()]
        inner = args[0] if args else str
        return tuple(_parse(v.strip(), inner, key) for v in items)
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r}: expected true/false")
    if annotation in (int, float, str):
        try:
            return annotation(float(value)) if annotation is int and "e" in value.lower() else annotation(value)
        except ValueError:
            raise ValueError(f"{key}={value!r}: expected {annotation.__name__}") from None
    raise ValueError(f"{key}: cannot parse a value of type {annotation}")


def override(cfg: T, assignments: list[str]) -> T:
    """A copy of `cfg` with each "a.b.c=value" applied."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), value.strip(), key)
    return cfg


def _set(obj: Any, path: list[str], value: str, full_key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise ValueError(f"unknown setting {full_key!r}; settings here: {', '.join(fields)}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{full_key!r}: {name} has no sub-settings")
        return dataclasses.replace(obj, **{name: _set(current, path[1:], value, full_key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"{full_key!r} is a group; set one of its fields, e.g. {full_key}.<name>=...")
    return dataclasses.replace(obj, **{name: _parse(value, hints[name], full_key)})


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"rl.group_size": 16, ...}: every leaf setting, in declaration order."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)


def from_dict(cls: type[T], data: dict) -> T:
    """Inverse of dataclasses.asdict for nested config dataclasses."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, annotation = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(annotation):
            value = from_dict(annotation, value)
        elif typing.get_origin(annotation) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def help_text(cfg: Any) -> str:
    """One line per setting: key, type and current value."""
    lines = []
    for key, value in flatten(cfg).items():
        owner, name = cfg, key.split(".")
        for part in name[:-1]:
            owner = getattr(owner, part)
        annotation = typing.get_type_hints(type(owner))[name[-1]]
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        lines.append(f"  {key:<32} {kind:<28} {value!r}")
    return "\n".join(lines)
