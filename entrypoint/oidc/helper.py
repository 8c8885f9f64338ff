"""The ``oidc-check`` helper process: its settings file, its command line, and its start before the event loop.

Why before the loop: the OIDC verdict is part of "ready", and the helper spends
most of its life importing (httpx, authlib, joserfc, cryptography).  Started
when SpacetimeDB is (``startup.run``), it imports while PID 1 imports asyncio
and the supervisor, instead of after them: the verdict is in by the time the
children are ready.  So this module is on the start path and imports neither
asyncio nor the logging library; ``verdict.py`` adopts what it starts.

The helper checks the settings PID 1 resolved, handed over as JSON in a
private file (mode 0600, in ``POGLY_RUN_DIR``): our children's stdin is
``/dev/null``.  The environment still goes along, for proxies and CA bundles,
with ``PYTHONUNBUFFERED=1`` so its one-line verdict reaches us when it is
printed, not when the interpreter has torn itself down (~100 ms later).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from entrypoint.errors import Fatal
from entrypoint.fsutil import WriteFailed
from entrypoint.supervision.spawn import spawn

if TYPE_CHECKING:
    from entrypoint.config import Settings


@dataclass(frozen=True)
class Spawned:
    """A helper started before the event loop: what ``verdict.settle`` needs to adopt it."""

    pid: int
    stdout: int  # non-blocking read ends
    stderr: int
    at: float  # wall-clock time of the spawn
    settings_file: Path  # removed by whoever adopts it, once the helper is done with it
    provisional: bool = False  # a restart with remembered settings (``memo``): readiness need not wait for it


def write_settings(settings: Settings) -> Path:
    """The settings as JSON in a new 0600 file in the run dir; ``WriteFailed`` (exit 78) naming the dir if not."""
    try:
        fd, name = tempfile.mkstemp(dir=settings.run_dir, prefix=".oidc-check-", suffix=".json")  # mode 0600
    except OSError as exc:
        raise WriteFailed(settings.run_dir / ".oidc-check-*.json", exc).fatal("POGLY_RUN_DIR",
                                                                             settings.run_dir) from exc
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(settings.to_json(), handle)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise WriteFailed(path, exc).fatal("POGLY_RUN_DIR", settings.run_dir) from exc
    return path


def command(settings_file: Path, timeout: float) -> list[str]:
    return [sys.executable, "-m", "entrypoint", "oidc-check", "--settings", str(settings_file),
            "--timeout", f"{timeout:g}"]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


#: The nice value of a re-check nobody waits for: it runs on CPU the children's start leaves idle.
BACKGROUND_NICE = 19


def lower_priority(pid: int) -> None:
    """Make a helper whose answer readiness does not wait for yield the CPU to everything else.

    On a 2-core node its ~0.4 s of imports would otherwise stretch SpacetimeDB's
    start.  Raising a child's nice value needs no privilege; on any error it
    simply keeps ours.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, BACKGROUND_NICE)


def prespawn(settings: Settings) -> Spawned | None:
    """Start the first check now, before asyncio exists; None when there is nothing to check or any doubt.

    The run dir is created as ``startup.prepare_dirs`` would a moment later
    (without a mounted volume there is none yet).  On any doubt (OIDC off, the
    run dir not a writable directory, a failed write or spawn) return None:
    ``verdict.settle`` then starts the helper from the event loop, after
    ``prepare_dirs`` has named whatever is wrong with the directory.  On a
    restart whose settings were verified before (``memo``) it runs at nice 19:
    readiness does not wait for it, so it should not slow what readiness waits for.
    """
    if not settings.oidc_enabled:
        return None
    from entrypoint.oidc import memo

    provisional = memo.remembered(settings)
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        if not os.access(settings.run_dir, os.W_OK | os.X_OK):
            return None
        path = write_settings(settings)
    except (Fatal, OSError):  # mkdir: EEXIST for a file, ENAMETOOLONG, EACCES, EROFS …
        return None
    try:
        pid, out, err = spawn(command(path, settings.oidc_discovery_timeout), environment())
    except OSError:
        path.unlink(missing_ok=True)
        return None
    if provisional:
        lower_priority(pid)
    return Spawned(pid, out, err, time.time(), path, provisional)
