"""Events from a short-lived command into the container's log: the supervisor's stdout.

Why this exists: ``kubectl exec deploy/pogly -- pogly-entrypoint owner set …``
starts a second process whose stdout is the operator's terminal, while the
container log (``kubectl logs``, the log collector) is whatever the supervisor
writes.  A change of owner must be in that log, next to everything else.

How, and why this way: Linux lets a process reopen another process's open
file through ``/proc/<pid>/fd/1``.  The supervisor's stdout is a pipe or FIFO
from the container runtime, a file, or a TTY, and each reopens as such; one
``write()`` of a line shorter than ``PIPE_BUF`` (4096 bytes) into a pipe is
atomic, so the line never interleaves with the supervisor's own.  It needs no
new interface in PID 1.  The alternative, a POST endpoint on the health
server, would need authentication: Caddy's proxied requests come from
loopback too, so "from loopback" proves nothing.

Which PID: the one ``/status`` reports (the supervisor answering on
``POGLY_HEALTH_ADDR``), else PID 1; either only when its command line is
pogly-entrypoint's.  When none can be opened (another PID namespace, a socket
as stdout, no permission), lines go to the fallback stream (the command's
stderr) and the command says so: the event is never silently dropped.
"""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from entrypoint.config import HostPort

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def is_entrypoint(pid: int) -> bool:
    """Whether ``pid`` runs pogly-entrypoint (``pogly-entrypoint …`` or ``python -m entrypoint …``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"pogly-entrypoint") for arg in argv) or (b"-m", b"entrypoint") in pairwise(argv)


async def find_supervisor(health_addr: HostPort) -> tuple[int | None, str]:
    """The supervisor's PID and how it was found, or None and why not."""
    from entrypoint.web.health import HealthError, fetch_status

    reasons: list[str] = []
    try:
        status = await fetch_status(health_addr)
    except (OSError, HealthError) as exc:
        reasons.append(f"no supervisor answers on {health_addr} ({exc})")
    else:
        pid = status.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and is_entrypoint(pid):
            return pid, f"/status on {health_addr}"
        reasons.append(f"/status names pid {pid!r}, which is not pogly-entrypoint in this PID namespace")
    if is_entrypoint(1):
        return 1, "PID 1"
    reasons.append("PID 1 is not pogly-entrypoint")
    return None, "; ".join(reasons)


class EventSink:
    """A text stream for the log renderer: each complete line goes out in one ``write()``.

    To the supervisor's stdout when ``fd`` is open; otherwise, or once a
    write there fails, to ``fallback``.  ``delivered`` counts the lines that
    reached the container log and ``failure`` says why the last one did not.
    """

    def __init__(self, fd: int | None, fallback: TextIO, target: str) -> None:
        self.fd = fd
        self.fallback = fallback
        self.target = target
        self.delivered = 0
        self.failure: str | None = None
        self._buffer = ""

    @classmethod
    def open(cls, pid: int | None, fallback: TextIO, why_not: str = "") -> EventSink:
        """A sink on ``/proc/<pid>/fd/1``; on any error, one that writes to ``fallback`` and says why."""
        if pid is None:
            sink = cls(None, fallback, "")
            sink.failure = why_not or "no supervisor found"
            return sink
        try:
            fd = os.open(f"/proc/{pid}/fd/1", _OPEN_FLAGS)
        except OSError as exc:
            sink = cls(None, fallback, "")
            sink.failure = f"cannot open the stdout of pid {pid}: {exc.strerror or exc}"
            return sink
        return cls(fd, fallback, f"pid {pid}")

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._emit(line + "\n")
        return len(text)

    def _emit(self, line: str) -> None:
        if self.fd is not None:
            data = line.encode("utf-8", "replace")
            try:
                written = os.write(self.fd, data)
            except OSError as exc:
                self.failure = f"writing to the stdout of {self.target} failed: {exc.strerror or exc}"
            else:
                if written == len(data):
                    self.delivered += 1
                    return
                self.failure = f"short write to the stdout of {self.target} ({written} of {len(data)} bytes)"
            self.close()
        self.fallback.write(line)
        self.fallback.flush()

    def flush(self) -> None:
        """Lines are written whole as they complete; nothing is held back."""

    def isatty(self) -> bool:
        """Decides ``LOG_FORMAT=auto`` the way the supervisor decided it for the same stdout."""
        if self.fd is not None:
            return os.isatty(self.fd)
        return self.fallback.isatty()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


__all__ = ["EventSink", "find_supervisor", "is_entrypoint"]
