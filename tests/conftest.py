"""Fixtures shared by every test module (helpers live in tests/harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import base_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(tmp_path)
