"""Generated docs stay in sync with the code."""
from pathlib import Path

from lib.core.schema_doc import render

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert text == render(), "docs/configuration.md is stale: run python -m lib.core.schema_doc > docs/configuration.md"


def test_every_schema_field_has_a_doc():
    import dataclasses
    import typing
    from lib.core.schema import Config
    hints = typing.get_type_hints(Config)
    missing = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
               for f in dataclasses.fields(hints[s.name]) if not f.metadata.get("doc")]
    assert not missing, f"schema fields without a doc: {missing}"
