"""Start the real ``oidc-provider`` (tests/js/oidc_server.mjs) for a test.

Why a subprocess and a ``READY`` line: the provider picks a free port itself
(port 0) and prints its issuer once it listens, so tests never guess ports and
never sleep; they wait for that one line with a deadline.

Plain context managers rather than pytest fixtures, so any test module (or a
later browser test) can wrap them in fixtures of the scope it needs without
touching tests/conftest.py.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

JS_DIR = Path(__file__).resolve().parent.parent / "js"
SERVER_SCRIPT = JS_DIR / "oidc_server.mjs"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ProviderStartError(RuntimeError):
    """The node provider did not print READY in time (its stderr is in the message)."""


@dataclass(frozen=True)
class NodeProvider:
    """A running provider: its issuer, exactly as it reports it, and its process."""

    issuer: str
    process: subprocess.Popen[bytes]

    @property
    def origin(self) -> str:
        scheme, rest = self.issuer.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}"


def node_available() -> str | None:
    """Why the provider cannot run here, or ``None`` when it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS_DIR / "node_modules" / "oidc-provider").is_dir():
        return f"oidc-provider is not installed: run `npm ci --prefix {JS_DIR}`"
    return None


def _read_ready_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    assert proc.stdout is not None
    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise ProviderStartError(f"no READY line within {READY_TIMEOUT_S} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise ProviderStartError(f"provider exited early (rc={proc.wait()})")
            buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    if not line.startswith("READY "):
        raise ProviderStartError(f"unexpected first line {line!r}")
    return line.removeprefix("READY ").strip()


def stop_provider(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, wait, and only then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


@contextmanager
def node_provider(*args: str, env: dict[str, str] | None = None) -> Iterator[NodeProvider]:
    """Run ``node oidc_server.mjs ARGS`` until the block ends.

    ``args`` are the script's options, e.g. ``("--shape", "keycloak", "--keys",
    "es256")``.  stderr goes to a temporary file that is shown if start-up fails.
    """
    problem = node_available()
    if problem:
        raise ProviderStartError(problem)
    with tempfile.TemporaryFile() as errlog:
        proc = subprocess.Popen(
            ["node", str(SERVER_SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=errlog,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=JS_DIR,
        )
        try:
            try:
                issuer = _read_ready_line(proc, time.monotonic() + READY_TIMEOUT_S)
            except ProviderStartError as exc:
                stop_provider(proc)
                errlog.seek(0)
                raise ProviderStartError(f"{exc}; stderr:\n{errlog.read().decode(errors='replace')}") from None
            yield NodeProvider(issuer=issuer, process=proc)
        finally:
            stop_provider(proc)
