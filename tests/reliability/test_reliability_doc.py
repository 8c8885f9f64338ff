"""docs/reliability.md lists every reliability scenario, and every row names a real test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.reliability.scenarios import SCENARIOS

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "reliability.md"


def _scenario_tests() -> set[str]:
    found = set()
    for path in sorted(HERE.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found.add(f"{path.name}::{node.name}")
    return found


def _doc_rows() -> set[str]:
    table = DOC.read_text().split("reliability-table:begin", 1)[1].split("reliability-table:end", 1)[0]
    return {f"{file}::{test}" for test, file in re.findall(r"^\| [^|]+ \| `(test_\w+)` \((test_\w+\.py)\)",
                                                            table, re.M)}


def test_every_scenario_test_is_in_the_table_and_nothing_else() -> None:
    assert set(SCENARIOS) == _scenario_tests()


def test_the_doc_has_a_row_for_every_scenario() -> None:
    rows = _doc_rows()
    missing = set(SCENARIOS) - rows
    assert not missing, f"run `make reliability-doc`: docs/reliability.md has no row for {sorted(missing)}"
    assert rows <= set(SCENARIOS), f"rows for tests that do not exist: {sorted(rows - set(SCENARIOS))}"
