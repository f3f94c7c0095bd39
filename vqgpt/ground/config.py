"""Typed configuration: dataclasses loaded from YAML by a small strict loader.

An unknown key, a value of the wrong type or a float that is NaN or infinite is a `ConfigError` that
names the dotted key; so is a section's own check (``dim: must be ...`` becomes ``model.dim: must be ...``).
Overrides use the command-line form ``section.key=value`` (value parsed as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar, Union

import yaml

from vqgpt.ground.files import write_text_whole

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ConfigError("KEY: must be a finite number RANGE, got VALUE")`` unless ``value`` is a finite
    real number in the range (``low``/``high`` inclusive unless ``*_open``; None = unbounded). Written as
    a test that NaN fails, unlike ``value < 0``, which NaN passes."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        span = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        span = f" {'<' if high_open else '<='} {high:g}"
    else:
        span = ""
    raise ConfigError(f"{key}: must be a finite number{span}, got {value!r}")


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown in the README's config reference)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# text keys whose documented values include "no" (accelerate's word for fp32), which YAML reads as false
_NO_WORD = ("mixed_precision",)


class NumberText(str):
    """A YAML number or date written otherwise than Python prints its value (``0123``, ``0x1F``, ``1_000``,
    ``12:30``, ``1.50``, ``2024-1-1``): the text as written, for a text key (a folder named 0123 was read
    as YAML 1.1's octal 83, and the run trained on a folder named 83 if there was one), with ``number``,
    the value YAML read, for a numeric key."""

    number: Any

    def __new__(cls, text: str, number: Any) -> "NumberText":
        made = super().__new__(cls, text)
        made.number = number
        return made


class _TextKeepingLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a number or date not written as Python prints it is a ``NumberText``."""


def _keeping_text(construct: Callable[[yaml.SafeLoader, yaml.Node], Any]) -> Callable[..., Any]:
    def construct_keeping_text(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        value = construct(loader, node)
        return value if str(value) == node.value else NumberText(node.value, value)
    return construct_keeping_text


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _TextKeepingLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keeping_text(_construct))


def _numbers(value: Any) -> Any:
    """``value`` with every ``NumberText`` in it replaced by its number."""
    if isinstance(value, NumberText):
        return value.number
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numbers(v) for v in value)
    return value


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (lists -> tuples etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, NumberText) and tp is not str and origin not in (Union, types.UnionType):
        value = value.number  # what YAML read, for anything but text (a union tries each of its types)
    if tp is Any:
        return _numbers(value)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _numbers(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "3e-4" (no dot) as a string: accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # YAML reads a bare 2024, 1.5 or 2024-01-01 (a folder's name, say) as a number or a date: take its text,
        # which is what Python prints for it (any other text came as a NumberText: _TextKeepingLoader).
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            return str(value)
        if value is False and key.rsplit(".", 1)[-1] in _NO_WORD:  # YAML reads a bare `no` as false
            return "no"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote it to give it as text)")
        return str(value)
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def changed_keys(config: Any, keys: list[str]) -> list[str]:
    """The ``keys`` on which the dataclass ``config`` differs from its class's defaults: the fields a user set
    (in a file or a --set), as the tokenizer's "setting them changes nothing" warnings name them."""
    default = type(config)()
    return [key for key in keys if getattr(config, key) != getattr(default, key)]


def missing_keys(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``cls`` (nested sections included) that ``data`` does not set."""
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            missing.append(key)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], Mapping):
            missing.extend(missing_keys(hints[f.name], data[f.name], key))
    return missing


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", require_all: bool = False,
              optional: typing.Collection[str] = ()) -> T:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types raise.

    ``require_all``: every field (by dotted name, nested sections included) must be present, except
    those named in ``optional``; used for saved files, where a silent default would hide damage.
    YAML configs leave it off: there, a missing key means "the default".
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    if require_all:
        absent = [k for k in missing_keys(cls, data, prefix) if k not in optional]
        if absent:
            raise ConfigError(f"missing required key{'s' if len(absent) > 1 else ''} {', '.join(absent)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(sorted(fields))})")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise _in_section(exc, prefix, fields) from None
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc
    for name in fields:
        # NaN passes every comparison and inf most range checks: no config float may be either
        value = getattr(obj, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: must be a finite number, got {value}")
    return obj


def _in_section(exc: ConfigError, prefix: str, fields: Mapping[str, Any]) -> ConfigError:
    """A section's own ConfigError that names its key bare ("dim: must be ...") with the section's dotted
    path in front ("model.dim: must be ..."), so that it names the key as a config file and --set do."""
    message = str(exc)
    head = re.match(r"(\w+)(?=[:.=,\[\s]|$)", message)
    if prefix and head and head.group(1) in fields:
        return ConfigError(f"{prefix}.{message}")
    return exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of JSON/YAML-friendly values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], 3e-4); the value is parsed as YAML, and text that is no
    valid YAML (``data.source=*.png``, ``@raw``) is taken as it is, a string (type-checked as any value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    if not raw.strip():
        return key.split("."), ""
    try:
        value = yaml.load(raw, Loader=_TextKeepingLoader)
    except yaml.YAMLError:
        return key.split("."), raw
    text = raw.strip()
    # A plain YAML scalar loses a ' #...' (a comment) and folds a line break into a space: a path such as
    # 'photos #2' would silently become another folder. Quoted text is YAML's own, and kept as it reads.
    changed = ((isinstance(value, str) and value != text)
               or (value is None and text not in ("null", "Null", "NULL", "~")))
    if changed and not text.startswith(("'", '"')):
        raise ConfigError(f"--set {item!r}: YAML reads the value as {value!r} (' #' starts a comment, a line break "
                          f"becomes a space); quote it to keep it as written: --set '{key}=\"{text}\"'")
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict in place; returns it."""
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file in any error.

    Stricter than ``yaml.safe_load``: a key given twice in one mapping (which YAML would silently
    resolve to the last value) and an empty file (no keys at all: write ``{}`` for every default)
    are errors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                          "save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    loader = _TextKeepingLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{path}: the config file is empty (write {{}} to take every default)")
        duplicate = _duplicate_key(node)
        if duplicate is not None:
            key, first, second = duplicate
            raise ConfigError(f"{path}: duplicate key '{key}' (lines {first} and {second}); give each key once")
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (write {{}} to take every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _duplicate_key(node: yaml.Node, path: str = "", seen: set[int] | None = None) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping of the composed YAML ``node`` (a merge ``<<`` aside), as
    (dotted key, line of the first, line of the second), else None."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: its node was walked where its anchor is
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in lines:
                return key, lines[key_node.value], line
            lines[key_node.value] = line
            found = _duplicate_key(value_node, key, seen)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, f"{path}[{i}]", seen)
            if found is not None:
                return found
    return None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults) with ``a.b=c`` overrides applied."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        # Name where the bad key came from: an override (--set KEY=VALUE) or the file.
        culprit = _override_named_in(str(exc), overrides or [])
        if culprit is not None:
            raise ConfigError(f"--set {culprit}: {exc}") from None
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _override_named_in(message: str, overrides: list[str]) -> str | None:
    """The last override whose dotted key (or a key inside it) the error message names, else None."""
    unknown = re.search(r"unknown config key '([^']+)'", message)
    if unknown:  # the first unknown part of a dotted key: 'modle' of modle.dim, 'model.quantizer' of its sub-keys
        name = unknown.group(1)
        return next((item for item in reversed(overrides)
                     if item.split("=", 1)[0].strip() == name or item.startswith((f"{name}.", f"{name}["))), None)
    message = message.split(" (valid keys here:")[0]  # a list of keys names no culprit
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        # the key as a whole dotted name: 'train.lr', train.lr: ..., train.lr=..., or a sub-key train.lr.x /
        # list item train.lr[0]
        if key and re.search(rf"(?:^|['\s]){re.escape(key)}(?:$|['.:,=\[\s])", message):
            return item
        # a section's own check names the section (or a sibling key in it), then the field:
        # "model: channels must be positive", "model.dim: must be divisible by n_head=3"
        section, _, field = key.rpartition(".")
        if section and re.match(rf"{re.escape(section)}(?:\.\w+)?: .*\b{re.escape(field)}\b", message):
            return item
    return None


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass as YAML (``.yaml``) or JSON (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(obj)
    yaml_file = path.suffix in (".yaml", ".yml")
    text = yaml.safe_dump(data, sort_keys=False) if yaml_file else json.dumps(data, indent=2) + "\n"
    write_text_whole(path, text)  # a run's config.yaml is what a resume is checked against: never cut off


def config_reference(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Rows (key, type, default, help) for every leaf key; help comes from field metadata."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(config_reference(tp, prefix=key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def reference_markdown(sections: dict[str, type]) -> str:
    """A markdown table of every key (with type, default and help) of each named config class."""
    out = []
    for title, cls in sections.items():
        out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, help_text in config_reference(cls):
            shown = json.dumps(default) if not isinstance(default, str) else f"`{default}`"
            out.append(f"| `{key}` | {tp.replace(' | ', ' or ')} | {shown} | {help_text.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
