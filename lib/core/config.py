"""Load, validate, override and save configs (JSON or YAML-lite) against the schema in lib/core/schema.py.

Every script calls `add_config_args(parser)` then `config_from_args(args, extra)`; `--section.key=value`
overrides are typed by the schema. Unknown keys fail with the nearest valid key.
"""
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path

from lib.core import safejson, yamllite
from lib.core.atomic import write_text
from lib.core.errors import ConfigError
from lib.core.schema import Config


def read_config_file(path: str | Path) -> dict:
    """Parse a JSON or YAML-lite file into a dict; syntax errors give line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})") \
            from None
    if path.suffix.lower() == ".json":
        data = safejson.loads(text, str(path))
    else:
        data = yamllite.loads(text, where=str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, found {type(data).__name__}")
    return data


def _show(value, limit: int = 80) -> str:
    """repr of a value for a message, cut at `limit` characters (a config value can be a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, where: str, meta: dict):
    """Check `value` against the annotation `tp` (int accepted for float); return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {_show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {_show(value)}")
        (item_tp,) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {_show(value)}")
        return dict(value)
    if tp is typing.Any:
        return value
    if tp is str:
        value = _as_text(value, meta)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, found {_show(value)}")
    _check_range(value, where, meta)
    return value


_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def _as_text(value, meta: dict):
    """YAML reads off/on/yes/no and bare numbers as bool or number: a str field takes them back as text."""
    if isinstance(value, bool):
        words = [w for w in _BOOL_WORDS[value] if w in (meta.get("choices") or ())]
        return words[0] if words else value
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _check_range(value, where: str, meta: dict) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{where}: expected a finite number, found {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {near[0]!r}?" if near else None
        raise ConfigError(f"{where}: {_show(value)} is not one of {list(choices)}", hint=hint)
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['min']}")
    if "above" in meta and not value > meta["above"]:
        raise ConfigError(f"{where}: {value!r} must be above {meta['above']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['max']}")


def _unknown_key(key: str, valid: list[str], where: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {where + near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key {_show(where + key)}", hint=hint)


def _split_override(item: str) -> tuple[str, str, str]:
    """('--a.b=1') -> ('a.b', '1', "override '--a.b=1'"), the last naming it in messages."""
    text = item[2:] if item.startswith("--") else item
    name = f"override {_show(item)}"
    if "=" not in text:
        raise ConfigError(f"{name} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    return dotted, raw, name


def _check_overrides(overrides: list[str]) -> None:
    """Check each override against the schema on its own, so an error names the override and its key
    (not the config file it would have been merged into)."""
    for item in overrides:
        dotted, raw, name = _split_override(item)
        if dotted == "config":  # scripts that read a config file consume --config earlier
            raise ConfigError("this script takes no --config: its config is the one saved in --checkpoint",
                              hint="change keys with overrides, e.g. --data.root=data/mysite")
        cls, prefix, meta = Config, "", {}
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(cls):  # inside a free-form mapping (e.g. model.extra)
                break
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if part not in fields:
                raise _unknown_key(part, list(fields), prefix, name)
            cls, prefix, meta = typing.get_type_hints(cls)[part], f"{prefix}{part}.", dict(fields[part].metadata)
        else:  # a schema key or section: its value is checked here, where the override can be named
            value = _override_value(raw, f"{name}: {dotted}")
            if dataclasses.is_dataclass(cls):
                _build(cls, value, prefix, name)
            else:
                _coerce(value, cls, f"{name}: {dotted}", meta)


def _build(cls, data: dict, prefix: str, source: str):
    """Instantiate dataclass `cls` from `data`, recursing into section dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, found {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix, source)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, f"{source}: {prefix}{name}", dict(fields[name].metadata))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _override_value(text: str, where: str):
    """An override's value: JSON when it parses (numbers, lists, true), YAML-lite scalar otherwise."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {safejson.MAX_DEPTH} levels") from None
    except ValueError:  # not JSON (or an integer past 4,300 digits): read it as YAML-lite
        value = yamllite.parse_scalar(text, where)
    safejson.check_depth(value, where)
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` strings into a nested dict (copied)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        dotted, raw, name = _split_override(item)
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {part!r} is not a section")
        node[leaf] = _override_value(raw, f"{name}: {dotted}")
    return data


def build_config(data: dict | None = None, overrides: list[str] = (), source: str = "<config>") -> Config:
    """Validated Config from a dict (missing keys take their defaults) plus overrides."""
    _check_overrides(list(overrides))
    if not isinstance(data or {}, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, found {_show(data)}")
    safejson.check_depth(data or {}, source)  # a checkpoint's config arrives here without a JSON parse
    try:
        data = apply_overrides(data or {}, list(overrides))
    except (TypeError, ValueError) as exc:  # keys or values JSON cannot hold (a checkpoint's config)
        raise ConfigError(f"{source}: not plain JSON data ({str(exc)[:120]})") from None
    return _build(Config, data, "", source)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Validated Config from a file (or defaults when path is None) plus overrides."""
    data = read_config_file(path) if path else {}
    return build_config(data, overrides, source=str(path) if path else "<defaults>")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Short stable hash of the resolved config (trial ids, model versions)."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as JSON, atomically, so the run can be reproduced from it."""
    write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def add_config_args(parser, default: str | None = None) -> None:
    """Add `--config FILE`; overrides `--section.key=value` are collected by config_from_args."""
    parser.add_argument("--config", default=default, metavar="FILE",
                        help="JSON or YAML-lite config; any key can be overridden as --section.key=value")


def config_from_args(args, extra: list[str]) -> Config:
    """Config from parsed args plus the leftover `--section.key=value` arguments."""
    return load_config(args.config, overrides_from_args(extra))


def overrides_from_args(extra: list[str]) -> list[str]:
    """Leftover CLI arguments -> `section.key=value` overrides; accepts `--a.b=1` and `--a.b 1`."""
    overrides, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {item!r}", hint="overrides look like --optim.lr=1e-3")
        if "=" not in item:
            if i + 1 >= len(extra):
                raise ConfigError(f"override {item!r} has no value")
            item = f"{item}={extra[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    return overrides
