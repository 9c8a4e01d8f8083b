"""The generic config machinery: YAML (unique keys) + dotted overrides -> a strict dataclass.

Knows nothing about any particular config: the schemas (one dataclass per part, with their
`validate`) are utils/config_*.py, and `utils/config.py` calls these functions. Loading rejects unknown
keys (naming the closest valid one) and wrong types, always naming the key and the value;
nothing in a config is evaluated or executed (`yaml.SafeLoader`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Callable, Collection, Literal, Optional, Union

import yaml

from utils.errors import ConfigError, MissingFileError

RawCheck = Callable[[dict, str], None]  # a schema's check of the raw mapping before building
INT64 = (-2 ** 63, 2 ** 63 - 1)  # an integer setting's range: what torch and numpy take


def load_config(cls: type, path: Optional[str], overrides: Collection[str] = (), *,
                path_fields: Collection[str] = (), raw_check: Optional[RawCheck] = None) -> Any:
    """YAML file + dotted `key.sub=value` overrides -> validated `cls` instance.

    `path_fields`: field names whose string values get a leading `~` expanded;
    `raw_check(raw, prefix)`: the schema's own refusals of the raw mapping (e.g. removed keys)."""
    raw = read_yaml_mapping(path) if path is not None else {}
    apply_overrides(raw, overrides)
    if raw_check is not None:
        raw_check(raw, "")
    cfg = build(cls, raw, "", path_fields)
    cfg.validate()
    return cfg


def read_yaml_mapping(path: str) -> dict:
    """The top-level mapping of the YAML file `path`; a UserError naming the file otherwise."""
    if os.path.isdir(path):
        raise ConfigError(f"--config {path} is a directory; give the YAML file (e.g. "
                          "config_advanced.yaml)")
    if not os.path.exists(path):
        raise MissingFileError(f"config file not found: {path} (pass --config <file.yaml>)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a YAML text file (it holds binary data that is "
                          "not UTF-8 text); give the YAML config, e.g. config_advanced.yaml") from None
    if "\0" in text:
        raise ConfigError(f"--config {path}: not a YAML text file (it holds NUL bytes); give the "
                          "YAML config, e.g. config_advanced.yaml")
    try:
        raw = safe_load_unique(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(f"--config {path} is empty (no keys at all); give a YAML mapping of "
                          "keys: the shipped config of the command (config_advanced.yaml, "
                          "config_vae.yaml, predict_advanced.yaml or evaluate.yaml), or a copy of it")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: Collection[str]) -> None:
    """Set each dotted `key.sub=value` (value parsed as a YAML scalar) into `raw`, in place."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write it as key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip().split("."), parsed, item)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (the safe
    loader keeps the last one silently, so a setting a user believes in is ignored)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key] + 1}, again on line "
                    f"{key_node.start_mark.line + 1}); keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def safe_load_unique(stream) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (UniqueKeyLoader is a SafeLoader: no objects)."""
    loader = UniqueKeyLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, raw: dict, path_fields: Collection[str] = ()) -> Any:
    """Rebuild a config stored in a checkpoint (already resolved; still type-checked)."""
    cfg = build(cls, raw, "", path_fields)
    cfg.validate()
    return cfg


class _Dumper(yaml.SafeDumper):
    """Lists of plain values on one line (`resolution: [32, 64]`), as the shipped YAML writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(v is None or isinstance(v, (bool, int, float, str)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def dump_config(cfg: Any, path: str) -> None:
    """Write the resolved config (every key, defaults filled in) next to the run."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.dump(config_to_dict(cfg), f, Dumper=_Dumper, sort_keys=False)
    os.replace(tmp, path)


def _set_dotted(raw: dict, keys: list[str], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def build(cls: type, raw: Any, prefix: str = "", path_fields: Collection[str] = ()) -> Any:
    """`raw` (a mapping) -> `cls(**coerced)`: unknown keys and wrong types are ConfigErrors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), "
                          f"got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else \
                f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = coerce(hints[key], value, full, path_fields)
        if key in path_fields and isinstance(kwargs[key], str):
            kwargs[key] = os.path.expanduser(kwargs[key])  # `~/clips` as typed in a shell
    return cls(**kwargs)


def _list_example(tp: Any) -> str:
    """How a list of `tp` is written: [1, 2], or [{a: ..., b: ...}] for a list of sections."""
    item = typing.get_args(tp)[0]
    if dataclasses.is_dataclass(item):
        return "[{" + ", ".join(f"{f.name}: ..." for f in dataclasses.fields(item)) + "}]"
    return "[1, 2]"


def coerce(tp: Any, value: Any, key: str, path_fields: Collection[str] = ()) -> Any:
    """`value` as type `tp` (dataclass, Optional/Union, Literal, list, bool, int, float, str)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".", path_fields)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        if len(inner) == 1 or not lists:
            return coerce(inner[0], value, key, path_fields)
        # A number or a list (data.resolution): the value's own shape picks the alternative.
        if isinstance(value, (list, tuple)):
            return coerce(lists[0], value, key, path_fields)
        try:
            return coerce(next(a for a in inner if a not in lists), value, key, path_fields)
        except ConfigError as e:
            raise ConfigError(f"{e}, or a list, e.g. {_list_example(lists[0])}") from None
    if origin is Literal:
        if isinstance(value, bool) and {"off", "on"} & set(args):  # YAML 1.1 reads off/on as bools
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. [1, 2]")
        return [coerce(args[0], v, f"{key}[{i}]", path_fields) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        if not INT64[0] <= value <= INT64[1]:  # torch and numpy take no larger integer
            raise ConfigError(f"{key} = {value}: does not fit in 64 bits (between {INT64[0]} and "
                              f"{INT64[1]}); no setting takes a number this large")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: must be a finite number (not NaN or infinite)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in the schema
