"""Caddy as a supervised child: validated before it runs, ready when it logs so, exit 1 is final."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import atomic_write
from entrypoint.supervision.process import ChildSpec
from entrypoint.supervision.service import Service

Clock = Callable[[], float]
log = logs.get("supervisor")


class CaddyService(Service):
    """Caddy: validated before it runs, ready when it logs so, exit 1 is final."""

    name = "caddy"
    stop_signal = signal.SIGTERM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caddyfile: Path | None = None
        self._ready_msg: str | None = None  # caddy.READY_MSG, set in prepare (caddy.py imports jinja2)

    async def prepare(self) -> None:
        from entrypoint.supervision.process import run_capture
        from entrypoint.web import caddy, webapp
        from entrypoint.web import config_js as webconfig

        self._ready_msg = caddy.READY_MSG
        webconfig.write_config_js(self.settings)
        # Which web build this is, from the files as the build made them (before the patch below);
        # a bounded read in a thread so SpacetimeDB's readiness is not held up meanwhile.
        build = await asyncio.to_thread(webapp.detect, self.settings.web_root)
        loads = webconfig.ensure_index_loads_config(self.settings.web_root)  # logs what it did
        self.status.webapp = webapp.report(self.settings, build, served_loads_config=loads)  # Fatal 78 if strict
        try:
            text = caddy.render(self.settings)
        except Exception as exc:  # template errors are configuration errors
            raise Fatal(EXIT_CONFIG, f"could not render Caddyfile.j2: {exc}", event="caddy.render_failed") from exc
        path = caddy.write(self.settings, text)

        self.caddyfile = path
        stamp = path.with_name(path.name + ".validated")
        key = caddy.validation_key(self.settings, text)
        with contextlib.suppress(OSError):
            if stamp.read_text() == key:
                log.info("caddy.validate_skipped", reason="this Caddyfile was validated by this caddy binary")
                return

        async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
            return await run_capture(argv, env, timeout, self.reaper)

        try:
            await caddy.validate(self.settings, path, runner)
        except caddy.CaddyConfigError as exc:
            raise Fatal(EXIT_CONFIG, str(exc), event="caddy.invalid_config") from exc
        except OSError as exc:
            raise Fatal(EXIT_CONFIG, f"cannot run CADDY_BIN={self.settings.caddy_bin}: {exc}",
                        event="caddy.not_executable") from exc
        except TimeoutError as exc:
            raise Fatal(EXIT_UNAVAILABLE, "`caddy validate` did not finish in time",
                        event="caddy.validate_timeout") from exc
        atomic_write(stamp, key)

    def spec(self) -> ChildSpec:
        from entrypoint.web import caddy

        assert self.caddyfile is not None
        return ChildSpec(self.name, caddy.run_command(self.settings, self.caddyfile),
                         caddy.environment(self.settings, dict(os.environ)), signal.SIGTERM, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        if fields.get("event") == self._ready_msg:
            self._ready.set()

    def grace(self) -> float:
        from entrypoint.web import caddy

        return caddy.stop_grace(self.settings)

    def fatal_exit(self, code: int, was_ready: bool) -> Fatal | None:
        if code == 1 and not was_ready:
            return Fatal(1, "Caddy failed to start (exit 1 = failed startup; Caddy's docs say not to restart "
                         f"it). Its last lines: {self._tail[-5:]}", event="caddy.startup_failed")
        return None
