"""Typed configs: dataclasses loaded from a YAML/JSON file plus dotted command-line overrides.

    cfg = load_config(PretrainConfig, "train/configs/pretrain_demo.yaml", ["optim.lr=1e-4", "data.batch_size=64"])
    save_config(cfg, run_dir / "config.yaml")

Rules (nanoGPT's override idea without its ``exec``):
- the file is a mapping that mirrors the dataclass tree; an override is ``dotted.key=value`` where the
  value is parsed as YAML (``1e-4`` -> float, ``[a, b]`` -> list, ``null`` -> None, ``true`` -> bool);
- an unknown key, in the file or on the command line, is a :class:`ConfigError` that names the key and
  lists the valid keys at that level;
- values are checked against the field's annotation (int, float, str, bool, Optional, list, tuple,
  dict, Literal, nested dataclass); an int is accepted where a float is wanted, nothing else is coerced
  silently;
- the resolved config is saved as YAML (``save_config``) next to every checkpoint and run.
"""
from __future__ import annotations

from vlm.errors import UserError

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(UserError):
    """A config file or override that does not fit the config's dataclass."""


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; ``where`` is the dotted key for messages."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}: " + " / ".join(errors))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a spec or language code that YAML read as a number
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise with the valid keys listed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    names = field_names(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}"
            + (f" (and {', '.join(prefix + str(u) for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f". Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    hints = _type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default that the file did not give
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    """Plain nested dict of a dataclass config (tuples become lists, for YAML/JSON)."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4" -> (["optim", "lr"], 1e-4)``. Values are YAML (so ``1e-4`` is a float)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads "1e-4" as a string
    return key.split("."), value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
        return s.strip().lower() not in ("nan", "inf", "-inf", "infinity")
    except ValueError:
        return False


def apply_overrides(cls, data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict, checking each key against the dataclass tree."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for ov in overrides:
        path, value = parse_override(ov)
        node, tp, where = data, cls, ""
        for i, part in enumerate(path):
            hints = _type_hints(tp) if dataclasses.is_dataclass(tp) else None
            if hints is None:
                if isinstance(node, dict):  # free-form dict field (e.g. per-part learning rates)
                    if i == len(path) - 1:
                        node[part] = value
                    else:
                        node = node.setdefault(part, {})
                    continue
                raise ConfigError(f"override {ov!r}: {where.rstrip('.')} is not a section")
            if part not in hints:
                raise ConfigError(
                    f"unknown config key {where}{part} in override {ov!r}. "
                    f"Valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(field_names(tp))}")
            if i == len(path) - 1:
                node[part] = value
            else:
                sub = hints[part]
                if _is_optional(sub):
                    sub = next(a for a in get_args(sub) if a is not type(None))
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node, tp, where = node[part], sub, f"{where}{part}."
    return data


def read_config_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory; pass a YAML or JSON file path")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (pass a YAML or JSON file path)")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML: {what}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple = (), base: dict | None = None):
    """File (optional) -> dotted overrides -> typed dataclass. See the module docstring."""
    data = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_config_file(path))
    data = apply_overrides(cls, data, list(overrides))
    return from_dict(cls, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, p)
    return p
