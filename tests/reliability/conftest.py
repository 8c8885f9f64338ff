"""Records each reliability scenario's result in ``test-artifacts/reliability.json``.

``bench/reliability_table.py`` renders those results into ``docs/reliability.md``
(``make reliability-doc``).  Results of tests not run this time are kept, so a
partial run updates only its own rows.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "test-artifacts" / "reliability.json"
PREFIX = "tests/reliability/"

_results: dict[str, dict[str, Any]] = {}


def _key(nodeid: str) -> str:
    """``tests/reliability/test_x.py::test_y[param]`` → ``test_x.py::test_y``."""
    return nodeid.removeprefix(PREFIX).split("[", 1)[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith(PREFIX) or report.nodeid.startswith(PREFIX + "test_reliability_doc.py"):
        return
    if report.when != "call" and report.outcome == "passed":
        return
    key = _key(report.nodeid)
    entry = _results.setdefault(key, {"outcome": "passed", "duration_s": 0.0})
    if report.when == "call":
        entry["duration_s"] = round(entry["duration_s"] + report.duration, 2)
    if hasattr(report, "wasxfail") and report.outcome == "skipped":
        entry["outcome"] = "xfailed (known bug, not fixed yet)"  # a strict xfail: the bug still reproduces
    elif report.outcome != "passed" and entry["outcome"] == "passed":
        entry["outcome"] = "failed" if report.outcome == "failed" else report.outcome
    entry["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _results:
        return
    try:
        previous = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        previous = {}
    results = previous.get("results", {}) if isinstance(previous, dict) else {}
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    for entry in _results.values():
        entry["revision"] = revision + ("+changes" if dirty else "")
        entry["python"] = platform.python_version()
    results.update(_results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": dict(sorted(results.items())),
    }, indent=2) + "\n")
