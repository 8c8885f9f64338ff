"""A hanging ``caddy validate`` is a dependency that stayed unavailable, not an invalid Caddyfile (issue 13, fault 7).

``run_capture`` used to kill the helper at its deadline and return -9, which
``caddy.validate`` read as a failed validation: exit 78 ``caddy.invalid_config``
and the documented ``caddy.validate_timeout`` (69) never happened.  Here the
real ``CaddyService.prepare`` runs a real ``CADDY_BIN`` that hangs on
``validate`` (a shell script; any other sub-command is the real Caddy), with the
validation deadline shortened for the test.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from entrypoint import config
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.supervision.process import Reaper, run_capture
from entrypoint.supervision.status import Status
from entrypoint.web import caddy
from entrypoint.web.caddy_service import CaddyService
from tests.harness import VENV_BIN, base_env

HANGS_ON_VALIDATE = """#!/bin/sh
if [ "$1" = validate ]; then touch "$0.started"; exec sleep 600; fi
exec {caddy} "$@"
"""


def _hanging_caddy(tmp: Path) -> Path:
    script = tmp / "caddy-hangs"
    script.write_text(HANGS_ON_VALIDATE.format(caddy=VENV_BIN / "caddy"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_run_capture_raises_timeout_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            with pytest.raises(TimeoutError):
                await run_capture(["/bin/sh", "-c", "echo $$ > pid; exec sleep 600"], dict(os.environ), 0.5, reaper)
        finally:
            reaper.uninstall()

    os.chdir(tmp_path)
    asyncio.run(main())
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists(), "the timed-out helper is still there"


def test_hanging_caddy_validate_exits_69_caddy_validate_timeout(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = base_env(tmp_path, CADDY_BIN=str(_hanging_caddy(tmp_path)))
    settings = config.load(env)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(caddy, "VALIDATE_TIMEOUT", 0.5)

    async def main() -> Fatal:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            service = CaddyService(settings, Status(), reaper)
            with pytest.raises(Fatal) as failed:
                await service.prepare()
            return failed.value
        finally:
            reaper.uninstall()

    fatal = asyncio.run(main())
    assert (tmp_path / "caddy-hangs.started").exists(), "caddy validate was never run"
    assert fatal.exit_code == EXIT_UNAVAILABLE and fatal.event == "caddy.validate_timeout", fatal
    assert "did not finish within 0.5 s" in fatal.message and str(tmp_path / "caddy-hangs") in fatal.message
