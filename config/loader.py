"""Load a YAML config: `base:` inheritance, `--set a.b.c=value` overrides, strict typed schema.

Merge order (dinov2-style): schema defaults <- base file(s) <- experiment file <- overrides. The
result is checked once against `config.schema`; unknown keys name the closest valid key and wrong
types name the key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from config.schema import Config


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key path."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the typed config from a YAML file (with `base:` chains) and `key=value` overrides.

    Args:
        path: experiment YAML; None for the schema defaults alone.
        overrides: strings like "model.vision.encoder=swinv2" or "train.stages.0.lr=3e-4".

    Returns:
        The validated `Config`.
    """
    raw = _read_with_bases(Path(path), seen=()) if path is not None else {}
    config = from_dict(Config, raw, prefix="")
    for item in overrides or []:
        config = apply_override(config, item)
    return config


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` chain through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, _read_with_bases(path.parent / base, seen + (path,)))
    return deep_merge(merged, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge mappings; lists and scalars in `update` replace those in `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(path, key, names, prefix))
        kwargs[key] = coerce(value, hints[key], path)
    return cls(**kwargs)


def _unknown_key_message(path: str, key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"{path}: unknown key{hint} (valid keys: {', '.join(names)})"


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp`, converting only where it is lossless and unambiguous."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path)
            except ConfigError:
                continue
        raise _type_error(path, tp, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        return [coerce(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        return {str(k): coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    return _coerce_scalar(value, tp, path)


def _coerce_scalar(value: Any, tp: type, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    raise ConfigError(f"{path}: unsupported schema type {tp!r}")


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ConfigError(f"{path}: expected {name}, got {value!r} ({type(value).__name__})")


def apply_override(config: Config, item: str) -> Config:
    """Apply one "a.b.c=value" override; the value is parsed as YAML, then checked like a file value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.vision.encoder=swinv2")
    key, raw = item.split("=", 1)
    data = to_dict(config)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]))
    parsed = _parse_cli_value(raw)
    _set_child(node, parts[-1], parsed, key)
    try:
        return from_dict(Config, data, prefix="")
    except ConfigError:
        if isinstance(parsed, (dict, list)) or parsed == raw:
            raise
        _set_child(node, parts[-1], raw, key)  # e.g. output_dir=2024 meant as a string
        return from_dict(Config, data, prefix="")


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{path}: list index out of range (length {len(node)})")
        return node[int(part)]
    if not isinstance(node, dict) or part not in node:
        valid = list(node) if isinstance(node, dict) else []
        prefix = path.rsplit(".", 1)[0] if "." in path else ""
        raise ConfigError(_unknown_key_message(path, part, valid, prefix))
    return node[part]


def _set_child(node: Any, part: str, value: Any, path: str) -> None:
    if isinstance(node, list):
        _child(node, part, path)
        node[int(part)] = value
    else:
        node[part] = value  # unknown keys are caught by from_dict with the full path


def _parse_cli_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def to_dict(config: Any) -> Any:
    """Plain dict/list form of a config, ready for YAML or JSON."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


ABSENT = "<absent>"  # what `config_differences` reports for a key one config does not have


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of mappings are numbered ("train.stages.0.lr"), other lists are leaves."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def config_differences(configs: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The leaf keys whose values differ between named configs (or plain dicts), sorted.

    Args:
        configs: name -> config; compared through `to_dict` and `flatten`.
        ignore: key prefixes left out (e.g. "model.vision").

    Returns:
        key -> {name: value, ...}, with `ABSENT` where a config lacks the key.
    """
    flat = {name: flatten(to_dict(c)) for name, c in configs.items()}
    diffs = {}
    for key in sorted({k for f in flat.values() for k in f}):
        values = {name: f.get(key, ABSENT) for name, f in flat.items()}
        if not key.startswith(ignore) and len({repr(v) for v in values.values()}) > 1:
            diffs[key] = values
    return diffs


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (written to a temp file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
