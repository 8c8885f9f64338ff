"""Fixtures shared by every test module (helpers live in tests/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.harness import base_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(tmp_path)


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """A test that calls ``logs.configure`` (say, at info level) must not decide what the next one's
    ``capture_logs`` sees: structlog's configuration is process-wide, so each test gets it back as it was."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
