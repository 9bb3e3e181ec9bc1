"""Typed configs from the command line: `key=value` overrides on frozen dataclasses.

Dotted keys reach nested dataclasses (`rl.group_size=8`); values are parsed by the
field's annotation, so a typo or a bad value fails before anything runs.
"""
import dataclasses
import difflib
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
    """A copy of `cfg` with each "a.b.c=value" applied.

    Errors are ValueErrors naming the key: an unknown key with the nearest real ones, a
    value that does not parse, or a dataclass's `__post_init__` check the new value fails.
    """
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), value.strip(), key.strip(), cfg)
    return cfg


def _set(obj: Any, path: list[str], value: str, full_key: str, root: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise ValueError(f"unknown setting {full_key!r}{_did_you_mean(full_key, path, fields, root)}; "
                         f"settings here: {', '.join(fields)}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{full_key!r}: {name} has no sub-settings")
        new = _set(current, path[1:], value, full_key, root)
    elif dataclasses.is_dataclass(current):
        raise ValueError(f"{full_key!r} is a group; set one of its fields, e.g. {full_key}.<name>=...")
    else:
        new = _parse(value, hints[name], full_key)
    try:  # runs __post_init__ of this level, so its checks see the new value
        return dataclasses.replace(obj, **{name: new})
    except (ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"{full_key}={value}: {e}") from e


def _did_you_mean(full_key: str, path: list[str], fields: dict, root: Any) -> str:
    # Close names at the failing level, then whole keys ending with what was typed
    # ("group_size" -> "rl.group_size", "optim.lr" -> every "*.optim.lr"), then close whole keys.
    keys = list(flatten(root))
    prefix = full_key.split(".")[: -len(path)]
    near = [".".join([*prefix, m, *path[1:]]) for m in difflib.get_close_matches(path[0], fields, n=3)]
    near += [k for k in keys if k.endswith("." + full_key)]
    near += difflib.get_close_matches(full_key, keys, n=3)
    near = [k for k in dict.fromkeys(near) if k in keys][:5]
    if not near:
        return ""
    return f" (did you mean {near[0]}?)" if len(near) == 1 else f" (did you mean one of {', '.join(near)}?)"


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
