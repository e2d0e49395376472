"""Generate docs/configuration.md from the schema, so the key reference cannot go stale.

    python -m lib.core.schema_doc > docs/configuration.md
"""
import dataclasses
import json
import sys
import typing

from lib.core.schema import Config

HEADER = """# Configuration reference

Generated from `lib/core/schema.py` by `python -m lib.core.schema_doc > docs/configuration.md`; a test fails when
this file is out of date. Every key can be set in a JSON or YAML-lite config file or on the command line
as `--section.key=value`; unknown keys fail with the nearest valid one.
"""


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)
    return (text or str(tp)).replace("typing.", "").replace("NoneType", "null")


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return json.dumps(value)


def _constraints(meta) -> str:
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    if "min" in meta:
        parts.append(f"≥ {meta['min']}")
    if "above" in meta:
        parts.append(f"> {meta['above']}")
    if "max" in meta:
        parts.append(f"≤ {meta['max']}")
    return "; ".join(parts)


def render() -> str:
    lines = [HEADER]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines += [f"## `{section.name}`", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        field_types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meaning = f.metadata.get("doc", "")
            extra = _constraints(f.metadata)
            if extra:
                meaning = f"{meaning} ({extra})"
            meaning = meaning.replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(field_types[f.name])} | "
                         f"`{_default(f)}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
