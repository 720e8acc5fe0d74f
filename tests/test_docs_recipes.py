"""docs/recipes.md documents every field of every registered stage type, and nothing else.

The doc drifted once (the on-policy stage gained the training loop's fields and the doc kept
the old list): this test reads the doc's field tables and compares them with the config
classes in stages.STAGES, so a field added, renamed or removed without its doc row fails here.

How the doc is read: a `### \\`name\\`` section is stage `name`'s own; a `###` section whose first
line is a parenthesised list of stage names, e.g. "(`complete`, `preference`)", is shared by
those stages. In both, the fields are the back-quoted names in the first column of the table
rows; a single-field row's default column, when it is a plain literal, must be the config's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic_core import PydanticUndefined

from stillhouse.stages import STAGES

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
_TICKED = re.compile(r"`([a-z_][a-z0-9_]*)`")


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, body lines) for every `###` section."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append((line, []) if line.startswith("### ") else ("", []))
        elif out:
            out[-1][1].append(line)
    return [s for s in out if s[0]]


def _rows(body: list[str]) -> list[tuple[list[str], str]]:
    """(field names, default cell) of each table row below the header."""
    rows = []
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 2 and cells[0] != "field" and not set(cells[0]) <= set("-: "):
            rows.append((_TICKED.findall(cells[0]), cells[1]))
    return rows


def documented() -> tuple[dict[str, list[tuple[list[str], str]]], list[tuple[tuple[str, ...], list]]]:
    """Each stage's own rows, and the shared sections as (stage names, rows)."""
    own, shared = {}, []
    for heading, body in _sections(DOC.read_text()):
        name = re.match(r"### `([a-z_]+)`", heading)
        if name:
            own[name.group(1)] = _rows(body)
            continue
        first = next((line for line in body if line.strip()), "")
        if first.startswith("("):
            shared.append((tuple(_TICKED.findall(first)), _rows(body)))
    return own, shared


def _literal(cell: str):
    """The default cell as a value, or ... when it is prose (then it is not compared). Bare
    `none` is None; back-quoted text is a string value (`none` is the string 'none')."""
    cell = cell.strip()
    quoted = cell.startswith("`") and cell.endswith("`") and len(cell) > 1
    cell = cell.strip("`")
    if cell in ("true", "false"):
        return cell == "true"
    if cell == "[]":
        return []
    try:
        return float(cell)
    except ValueError:
        pass
    if quoted:
        return yaml.safe_load(cell)  # `{}`, `[1, 16]`, `reuse`
    return {"required": PydanticUndefined, "none": None}.get(cell, ...)


def _same(doc_value, default) -> bool:
    if isinstance(doc_value, float) and not isinstance(default, bool) and isinstance(default, (int, float)):
        return doc_value == pytest.approx(default)
    if isinstance(default, tuple):
        default = list(default)
    return doc_value == default if doc_value is not PydanticUndefined else default is PydanticUndefined


def _applicable_rows(name: str):
    own, shared = documented()
    rows = list(own.get(name, []))
    for stages, shared_rows in shared:
        if name in stages:
            rows += shared_rows
    return rows


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_field_of_the_stage_is_in_its_section_of_recipes_md(name):
    own, _ = documented()
    assert name in own, f"docs/recipes.md has no '### `{name}`' section"
    fields = set(STAGES[name].config.model_fields) - {"type"}
    written = {f for names, _ in _applicable_rows(name) for f in names}
    assert not fields - written, f"{name}: fields missing from docs/recipes.md: {sorted(fields - written)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipes_md_names_no_field_the_stage_does_not_have(name):
    own, _ = documented()
    fields = set(STAGES[name].config.model_fields)
    stale = {f for names, _ in own.get(name, []) for f in names} - fields
    assert not stale, f"{name}: docs/recipes.md documents fields the config does not have: {sorted(stale)}"


def test_shared_sections_hold_only_fields_every_listed_stage_has():
    _, shared = documented()
    assert shared, "docs/recipes.md: no shared section found (the parser no longer matches the doc)"
    for stages, rows in shared:
        for stage in stages:
            assert stage in STAGES, f"docs/recipes.md: shared section names unknown stage type '{stage}'"
            stale = {f for names, _ in rows for f in names} - set(STAGES[stage].config.model_fields)
            assert not stale, f"docs/recipes.md: shared section lists {sorted(stale)}, which '{stage}' does not have"


def _check_defaults(name: str) -> int:
    """Assert each plain-literal default of stage `name`'s rows; return how many were checked."""
    fields = STAGES[name].config.model_fields
    seen = 0
    for names, cell in documented()[0].get(name, []):
        values = [_literal(v) for v in cell.split(",")] if len(names) > 1 else [_literal(cell)]
        if len(values) != len(names):
            continue
        for field, value in zip(names, values):
            if value is ... or field not in fields:
                continue
            seen += 1
            assert _same(value, fields[field].default), (
                f"{name}.{field}: docs/recipes.md says default {cell!r}, the config has {fields[field].default!r}")
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_plain_defaults_in_recipes_md_are_the_configs(name):
    _check_defaults(name)


def test_defaults_are_checked_at_all():
    assert sum(_check_defaults(name) for name in STAGES) > 100


def test_the_parser_sees_a_known_row():
    """Guards the reader itself: a doc reshuffle that hides every row must not pass vacuously."""
    rows = documented()[0]["rejection"]
    assert (["samples"], "4") in rows
    assert _literal("`true`") is True and _literal("required") is PydanticUndefined and _literal("prose") is ...
