"""Caddy as a supervised child: validated before it runs, ready when it logs so, exit 1 is final.

What differs from the generic ``Service`` loop: ``prepare`` writes
``config.js``, reads which web build is served, renders the Caddyfile (or
reuses the one on disk when its inputs did not change) and validates it
(cached per Caddyfile and binary); an exit 1 before readiness is
Caddy's "failed startup", which its docs say not to restart, so it is fatal.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import atomic_write, read_small_file
from entrypoint.supervision.process import ChildSpec, describe_exit
from entrypoint.supervision.service import Died, Outcome, Service

log = logs.get("supervisor")

#: Caddy's last line on a clean stop: every server drained, the process about to exit (~8 ms later).
DONE_MSG = "shutdown complete"


class CaddyService(Service):
    """Caddy: validated before it runs, ready when it logs so, exit 1 is final."""

    name = "caddy"
    stop_signal = signal.SIGTERM

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caddyfile: Path | None = None
        self._ready_msg: str | None = None  # caddy.READY_MSG, set in prepare (caddy.py is imported there)

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
        text = self._render()
        path = caddy.caddyfile_path(self.settings)

        self.caddyfile = path
        stamp = path.with_name(path.name + ".validated")
        key = caddy.validation_key(self.settings, text)
        # Read like the render stamp beside it: whatever is not a small regular file (a FIFO would block the
        # loop in open()) means "validate again".
        if read_small_file(stamp) == key.encode():
            log.info("caddy.validate_skipped", reason="this Caddyfile was validated by this caddy binary")
            return

        async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
            return await run_capture(argv, env, timeout, self.reaper)

        try:
            await caddy.validate(self.settings, path, runner, timeout=caddy.VALIDATE_TIMEOUT)
        except caddy.CaddyConfigError as exc:
            raise Fatal(EXIT_CONFIG, str(exc), event="caddy.invalid_config") from exc
        # Before OSError: TimeoutError is a subclass of it, and a hang is not a bad binary.
        except TimeoutError as exc:
            raise Fatal(EXIT_UNAVAILABLE, f"`caddy validate` did not finish within {caddy.VALIDATE_TIMEOUT:g} s "
                        f"(CADDY_BIN={self.settings.caddy_bin}); that binary hangs: run `caddy validate` by hand "
                        "to see why", event="caddy.validate_timeout") from exc
        except OSError as exc:
            raise Fatal(EXIT_CONFIG, f"cannot run CADDY_BIN={self.settings.caddy_bin}: {exc}",
                        event="caddy.not_executable") from exc
        try:
            atomic_write(stamp, key)
        except OSError as exc:  # only a cache: the next start validates again
            log.warning("caddy.validate_stamp_unwritable", path=str(stamp), error=str(exc))

    def _render(self) -> str:
        """The Caddyfile's text, written to the run dir: reused as it is when nothing that renders it changed.

        On a restart the file on disk usually is what a render would produce;
        reusing it keeps jinja2 (~1.8 MB of RSS, ~40 ms of CPU) out of PID 1 for good.
        Whatever is doubtful (no stamp, another key, a hand-edited or truncated
        file, an unreadable input) renders as before.
        """
        from entrypoint.web import caddy

        key = caddy.render_key(self.settings)
        reused = caddy.reusable_caddyfile(self.settings, key)
        if reused is not None:
            log.info("caddy.render_reused", path=str(caddy.caddyfile_path(self.settings)),
                     reason="the Caddyfile on disk was rendered from this template, these settings and this version")
            return reused
        try:
            text = caddy.render(self.settings)
        except Exception as exc:  # template errors are configuration errors
            raise Fatal(EXIT_CONFIG, f"could not render Caddyfile.j2: {exc}", event="caddy.render_failed") from exc
        caddy.write(self.settings, text)
        if key is not None:
            try:
                caddy.write_render_stamp(self.settings, key, text)
            except OSError as exc:  # only a cache: the next start renders again
                log.warning("caddy.render_stamp_unwritable", path=str(caddy.render_stamp_path(self.settings)),
                            error=str(exc))
        return text

    def spec(self) -> ChildSpec:
        from entrypoint.web import caddy

        assert self.caddyfile is not None
        return ChildSpec(self.name, caddy.run_command(self.settings, self.caddyfile),
                         caddy.environment(self.settings, dict(os.environ)), signal.SIGTERM, self.grace())

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        message = fields.get("message")
        if message == self._ready_msg:
            self._ready.set()
        elif message == DONE_MSG:
            # Logged once every app has stopped (each HTTP server drained) and just before os.Exit
            # (caddyserver/caddy caddy.go, exitProcess, at 0cf03d3): nothing proxied is in flight any more.
            self.mark_done_serving()

    def grace(self) -> float:
        from entrypoint.web import caddy

        return caddy.stop_grace(self.settings)

    async def pause_after(self, outcome: Outcome) -> float:
        if isinstance(outcome, Died) and outcome.code == 1 and not outcome.was_ready:
            self._record_exit(describe_exit(outcome.code), outcome.code)
            port = self.settings.http_port
            if any(f":{port}: bind: address already in use" in line for line in self._tail):
                # The one start failure an operator causes most often: say which variable, not only Caddy's words.
                raise Fatal(1, f"POGLY_HTTP_PORT={port} is already in use: another process listens on port {port}, "
                            "so Caddy cannot. Stop that process or set POGLY_HTTP_PORT to a free port. Caddy's "
                            f"last lines: {self._tail[-2:]}", event="caddy.startup_failed", variable="POGLY_HTTP_PORT",
                            port=port, reason="port_in_use")
            raise Fatal(1, "Caddy failed to start (exit 1 = failed startup; Caddy's docs say not to restart "
                        f"it). Its last lines: {self._tail[-5:]}", event="caddy.startup_failed")
        return await super().pause_after(outcome)
