"""Every field the pinned agent CLIs send (tests/captures/*.json, written by scripts/capture_clients.py)
is one the gateway knows: each top-level field is in gateway/fields.py's honoured or advisory table
for its endpoint (never refused), and every field path, with the enum values the client sends, is in
docs/gateway.md's table for that endpoint. A client bump that starts sending something new fails
here, naming the field, before a user meets it as a 400."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from gateway import fields
from tests.harness import REPO

pytestmark = pytest.mark.timeout(30)

CAPTURES = sorted((REPO / "tests" / "captures").glob("*.json"))
DOCS = REPO / "docs" / "gateway.md"
# The fields.py tables that decide each captured endpoint's fields (prefix of *_HONOURED, …).
TABLES = {"POST /v1/messages": "MESSAGES", "POST /v1/messages/count_tokens": "MESSAGES",
          "POST /v1/responses": "RESPONSES"}
# Keys whose values are the API's enums (block types, roles, modes); other values (tool names,
# model ids, numbers) are the caller's own and need no row.
ENUM_KEYS = {"type", "role", "display", "effort", "keep", "summary", "tool_choice", "include", "status"}
# Maps whose keys are the caller's own (Codex's client_metadata ids), not fields of the API.
FREE_MAPS = {"metadata", "client_metadata"}


def _captures() -> list[tuple[str, str, dict]]:
    out = []
    for path in CAPTURES:
        capture = json.loads(path.read_text())
        out += [(path.stem, ep, spec) for ep, spec in capture["endpoints"].items()]
    return out


CAPTURED = _captures()
IDS = [f"{stem}:{ep}" for stem, ep, _ in CAPTURED]


def _section(endpoint: str) -> list[str]:
    """The lines under the docs heading that names `endpoint` in backticks, up to the next heading."""
    lines = DOCS.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and f"`{endpoint}`" in line]
    assert starts, f"docs/gateway.md has no heading naming `{endpoint}`"
    section = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("#"):
            break
        section.append(line)
    return section


def _rows(endpoint: str) -> dict[str, str]:
    """Field name (each backticked name in a row's first cell) -> the whole row's text."""
    rows: dict[str, str] = {}
    for line in _section(endpoint):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= {"-", " ", ":"}:
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = rows.get(name, "") + " " + line
    return rows


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _missing(path: str, values: list[str], rows: dict[str, str]) -> list[str]:
    """What of `path` (a.b[].c) and its enum values the endpoint's table does not mention: the top
    field needs a row; a nested key and an enum value need a mention in that row or in the row of a
    key on the path (`cache_control` has its own). A discriminator (`type`) is told by its values."""
    keys = [k for k in path.replace("[]", "").split(".") if k]
    top = keys[0]
    if top not in rows:
        return [f"{top} (no row)"]
    if top in FREE_MAPS:
        keys = keys[:1]
    text = rows[top] + "".join(rows.get(k, "") for k in keys[1:])
    enum = keys[-1] in ENUM_KEYS
    missing = [f"{path}: `{key}` not mentioned in the `{top}` row" for key in keys[1:]
               if not _mentions(text, key) and not (enum and key == keys[-1] and values)]
    if enum:
        missing += [f"{path} = {v!r}" for v in values if not _mentions(text, v)]
    return missing


@pytest.mark.parametrize("stem,endpoint,spec", CAPTURED, ids=IDS)
def test_every_top_level_field_a_pinned_client_sends_is_honoured_or_advisory(stem: str, endpoint: str,
                                                                              spec: dict) -> None:
    assert endpoint in TABLES, f"{stem} calls {endpoint}, which no fields.py table covers"
    prefix = TABLES[endpoint]
    honoured = getattr(fields, f"{prefix}_HONOURED", None)
    advisory = getattr(fields, f"{prefix}_ADVISORY", None)
    assert honoured is not None and advisory is not None, f"gateway/fields.py has no {prefix}_HONOURED/_ADVISORY"
    refused = set(getattr(fields, f"{prefix}_REFUSED", ()))
    top = sorted({path.split(".")[0].split("[")[0] for path in spec["fields"]})
    assert not [f for f in top if f in refused], f"{stem} sends fields {endpoint} refuses"
    unknown = [f for f in top if f not in honoured and f not in advisory]
    assert not unknown, f"{stem} sends {unknown} to {endpoint}: neither honoured nor advisory in fields.py"


@pytest.mark.parametrize("stem,endpoint,spec", CAPTURED, ids=IDS)
def test_every_field_path_a_pinned_client_sends_is_in_the_docs_table(stem: str, endpoint: str,
                                                                      spec: dict) -> None:
    rows = _rows(endpoint)
    missing = [m for path, values in spec["fields"].items() for m in _missing(path, values, rows)]
    assert not missing, f"docs/gateway.md's {endpoint} table lacks what {stem} sends:\n  " + "\n  ".join(missing)


BETAS = [(stem, ep, spec) for stem, ep, spec in CAPTURED if spec["headers"].get("anthropic-beta")]


@pytest.mark.parametrize("stem,endpoint,spec", BETAS, ids=[f"{s}:{e}" for s, e, _ in BETAS])
def test_every_beta_a_pinned_client_asks_for_is_in_the_docs(stem: str, endpoint: str, spec: dict) -> None:
    text = DOCS.read_text()
    betas = spec["headers"].get("anthropic-beta", [])
    missing = [b for b in betas if not _mentions(text, b)]
    assert not missing, f"docs/gateway.md does not say what the gateway does with {stem}'s betas {missing}"


def test_the_captures_are_of_the_pinned_versions_and_keep_no_secrets() -> None:
    pins = json.loads((REPO / "clients" / "package.json").read_text())["dependencies"]
    assert len(CAPTURES) == len(pins)
    for path in CAPTURES:
        capture = json.loads(path.read_text())
        assert pins[capture["client"]] == capture["version"], f"{path.name}: re-run scripts/capture_clients.py"
        for spec in capture["endpoints"].values():
            assert spec["headers"].get("x-api-key", []) == [] and spec["headers"].get("authorization", []) == []
        text = path.read_text()
        for where in (tempfile.gettempdir(), str(Path.home()), str(REPO)):
            assert len(where) < 2 or where not in text, f"{path.name} keeps a path of this machine"


def test_the_docs_check_finds_what_a_table_lacks() -> None:
    rows = {"thinking": "| `thinking` | honoured | `{type: \"enabled\", budget_tokens}` |"}
    assert _missing("thinking.type", ["enabled"], rows) == []
    assert _missing("thinking.budget_tokens", ["1024"], rows) == []
    assert _missing("thinking.display", ["omitted"], rows) == ["thinking.display = 'omitted'"]
    assert _missing("thinking.shape", [], rows) == ["thinking.shape: `shape` not mentioned in the `thinking` row"]
    assert _missing("thinking.type", ["adaptive"], rows) == ["thinking.type = 'adaptive'"]
    assert _missing("speed", ["fast"], rows) == ["speed (no row)"]
