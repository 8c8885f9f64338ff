"""The control channel: short-lived commands (``backup``) ask the running supervisor to pause a child.

Why a unix socket, not the health server: a pause stops the database, so the
caller must be someone who may do that.  The health server is reachable
through Caddy's proxy from loopback, so "from loopback" proves nothing; a
socket file in ``POGLY_RUN_DIR`` with mode 0600 is reachable only by this
user (``kubectl exec`` runs as the container's user), and the peer's uid is
checked again on every connection (``SO_PEERCRED``: ours or root).

Why a lease: a backup that dies (``kubectl exec`` cut, the CronJob's pod
evicted, Ctrl-C) must never leave the database stopped.  The pause belongs to
the connection that asked for it and ends at the first of: the client's
``resume``, the connection closing, ``max_s`` seconds (default 300, at most
3600; logged as ``control.pause_expired``), or the supervisor's shutdown
(which stops everything anyway).

The protocol, one JSON object per line each way, one answer per request::

    {"op": "hello"}                 → {"ok": true, "pid": N, "version": "…", "services": ["spacetimedb"]}
    {"op": "status"}                → {"ok": true, "status": {… as /status …}}
    {"op": "pause", "service": "spacetimedb", "reason": "backup", "max_s": 300}
                                    → {"ok": true, "paused": true, "stopped": "exit code 0", "stop_ms": …}
    {"op": "resume"}                → {"ok": true, "resumed": true, "ready": true, "paused_ms": …, "expired": false}
    anything else                   → {"ok": false, "error": "…", "reason": "bad_request" | "busy" | …}

The socket is made in a private temporary directory beside it, given mode
0600, then renamed into place: it is never reachable with other permissions,
and a stale socket from a killed run is replaced.  A socket that still
answers belongs to another live supervisor on the same run directory: it is
left alone and this one runs without a control channel (logged), since
serving matters more than backups.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.version import __version__

if TYPE_CHECKING:
    from entrypoint.supervision.service import Service
    from entrypoint.supervision.status import Status

log = logs.get("control")

SOCKET_NAME = "control.sock"
DEFAULT_MAX_PAUSE_S = 300.0
MAX_PAUSE_CAP_S = 3600.0
LINE_LIMIT = 64 * 1024


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


# ---------------------------------------------------------------------------
# The supervisor's side
# ---------------------------------------------------------------------------


class _Lease:
    """One connection's pause: which service, since when, and the timer that ends it."""

    def __init__(self, service: Service, reason: str, max_s: float) -> None:
        self.service = service
        self.reason = reason
        self.max_s = max_s
        self.since = time.monotonic()
        self.expired = False
        self.ended = False
        self.timer: asyncio.TimerHandle | None = None

    def end(self, why: str) -> bool:
        """Resume the service (once); False when it already ended (expired)."""
        if self.ended:
            return False
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
        self.service.resume(why)
        log.info("control.lease_released", child=self.service.name, reason=self.reason, why=why,
                 paused_ms=round((time.monotonic() - self.since) * 1000, 1))
        return True


class ControlServer:
    """Serves the control socket until cancelled; every pause it grants ends with its connection."""

    def __init__(self, path: Path, status: Status, services: Mapping[str, Service], *,
                 ready: asyncio.Event | None = None, start_timeout: float = 120.0) -> None:
        self.path = path
        self.status = status
        self.services = dict(services)
        self.ready = ready  # pauses wait for this (the first publish done): never pause a start half-way
        self.start_timeout = start_timeout
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._inode: int | None = None

    async def serve(self) -> None:
        """The job in the supervisor's task group: listen, answer, and clean up when cancelled."""
        sock = self._listen()
        if sock is None:
            return
        self._server = await asyncio.start_unix_server(self._session, sock=sock, limit=LINE_LIMIT)
        log.info("control.listening", path=str(self.path))
        try:
            await asyncio.Future()  # until cancelled: the supervisor's stop
        finally:
            self._server.close()
            for task in list(self._sessions):
                task.cancel()
            self._remove()

    def _listen(self) -> socket.socket | None:
        """The listening socket, bound with mode 0600 and renamed into place; None when another owns it."""
        if answers(self.path):
            log.warning("control.in_use", path=str(self.path),
                        message="another pogly-entrypoint answers on this control socket (same POGLY_RUN_DIR); "
                                "this one runs without a control channel: `backup` talks to the other")
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=".control-", dir=self.path.parent))  # mode 0700
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staged = private / SOCKET_NAME
            with _addressable(staged) as address:
                sock.bind(address)
            os.chmod(staged, 0o600)
            sock.listen(16)
            os.replace(staged, self.path)  # atomically replaces a stale socket from a killed run
            self._inode = os.stat(self.path).st_ino
        except OSError as exc:
            sock.close()
            log.warning("control.unavailable", path=str(self.path), error=str(exc),
                        message="no control channel: `pogly-entrypoint backup` cannot pause SpacetimeDB")
            return None
        finally:
            with contextlib.suppress(OSError):
                for leftover in private.iterdir():
                    leftover.unlink()
            with contextlib.suppress(OSError):
                private.rmdir()
        sock.setblocking(False)
        return sock

    def _remove(self) -> None:
        """Unlink the socket file if it is still ours (not one a later run put there)."""
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        lease: list[_Lease] = []  # at most one
        try:
            if not _peer_allowed(writer):
                await _send(writer, _error("forbidden", "only this container's user (or root) may use the "
                                                        "control socket"))
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, _error("bad_request", f"request line over {LINE_LIMIT} bytes"))
                    return
                except ConnectionError:
                    return
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    await _send(writer, _error("bad_request", f"one JSON object per line: {exc}"))
                    continue
                await _send(writer, await self._answer(request, lease))
        except ConnectionError:
            return
        finally:
            if lease:
                lease[0].end("connection closed")
            self._sessions.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, request: dict[str, Any], lease: list[_Lease]) -> dict[str, Any]:
        op = request.get("op")
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "version": __version__, "services": sorted(self.services)}
        if op == "status":
            return {"ok": True, "status": self.status.to_json()}
        if op == "pause":
            return await self._pause(request, lease)
        if op == "resume":
            return await self._resume(lease)
        return _error("bad_request", f"unknown op {op!r}: one of hello, status, pause, resume")

    async def _pause(self, request: dict[str, Any], lease: list[_Lease]) -> dict[str, Any]:
        from entrypoint.supervision.service import PauseRefused

        name = request.get("service")
        service = self.services.get(name) if isinstance(name, str) else None
        if service is None:
            return _error("bad_request", f"service {name!r} cannot be paused; one of {sorted(self.services)}")
        reason = request.get("reason")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 64:
            return _error("bad_request", "reason: a short text, e.g. \"backup\"")
        max_s = request.get("max_s", DEFAULT_MAX_PAUSE_S)
        if isinstance(max_s, bool) or not isinstance(max_s, int | float) or not 0 < max_s <= MAX_PAUSE_CAP_S:
            return _error("bad_request", f"max_s: seconds, above 0 and at most {MAX_PAUSE_CAP_S:g}")
        if lease and not lease[0].ended:
            return _error("busy", "this connection already holds a pause; resume it first")
        lease.clear()
        if self.status.shutting_down:
            return _error("shutting_down", "the supervisor is shutting down")
        if self.ready is not None and not self.ready.is_set():
            return _error("not_ready", "still starting (modules not published yet); try again once ready")
        started = time.monotonic()
        try:
            stopped = await service.pause(reason.strip())
        except PauseRefused as exc:
            return _error("busy", str(exc))
        except Exception as exc:  # a bug or a failed stop: never leave the child held without a lease
            service.resume("pause failed")
            log.error("control.pause_failed", child=service.name, error=repr(exc), exc_info=exc)
            return _error("internal", f"pausing {service.name} failed: {exc!r}")
        held = _Lease(service, reason.strip(), float(max_s))
        held.timer = asyncio.get_running_loop().call_later(float(max_s), self._expire, held)
        lease.append(held)
        log.info("control.paused", child=service.name, reason=held.reason, max_pause_s=max_s, stopped=stopped)
        return {"ok": True, "paused": True, "service": service.name, "stopped": stopped,
                "stop_ms": round((time.monotonic() - started) * 1000, 1), "max_s": max_s,
                "status": self.status.to_json()}

    def _expire(self, lease: _Lease) -> None:
        lease.expired = True
        log.warning("control.pause_expired", child=lease.service.name, reason=lease.reason, max_pause_s=lease.max_s,
                    message=f"{lease.service.name} was paused for {lease.reason} longer than {lease.max_s:g} s; "
                            "starting it again (the client's copy may be inconsistent and is refused)")
        lease.end("expired")

    async def _resume(self, lease: list[_Lease]) -> dict[str, Any]:
        if not lease:
            return _error("not_paused", "this connection holds no pause")
        held = lease.pop()
        paused_ms = round((time.monotonic() - held.since) * 1000, 1)
        generation = held.service.generation
        held.end("resume")
        ready = True
        if not held.expired:
            try:
                async with asyncio.timeout(self.start_timeout):
                    await held.service.ready_after(generation)
            except TimeoutError:
                ready = False
        return {"ok": True, "resumed": True, "service": held.service.name, "ready": ready, "expired": held.expired,
                "paused_ms": paused_ms}


def _error(reason: str, message: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "error": message}


async def _send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    await writer.drain()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """The peer runs as our uid or as root (``SO_PEERCRED``); the socket's mode already says so."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def answers(path: Path) -> bool:
    """Whether a live process accepts connections on ``path`` (a stale socket file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            with _addressable(path) as address:
                probe.connect(address)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """``path`` as a socket address: a unix socket address holds at most 107 bytes, a run dir may be deeper.

    A longer path is reached through its directory's descriptor
    (``/proc/self/fd/N/name``), which Linux resolves like the path itself.
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The client's side (blocking: the commands that use it are plain programs)
# ---------------------------------------------------------------------------


class ControlError(Exception):
    """The control channel refused or failed; ``reason`` is the server's (or ``unavailable``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ControlClient:
    """One connection to the supervisor's control socket; closing it ends any pause it holds."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self._file = sock.makefile("rb")

    @classmethod
    def connect(cls, run_dir: Path, timeout: float = 5.0) -> ControlClient:
        """Connect, or ``ControlError("unavailable")`` naming the socket and why (no supervisor)."""
        path = socket_path(run_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            with _addressable(path) as address:
                sock.connect(address)
        except OSError as exc:
            sock.close()
            why = "it does not exist" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
            raise ControlError("unavailable", f"no supervisor answers on {path} ({why})") from None
        return cls(sock, path)

    def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one request and return the answer; ``ControlError`` when it says ``ok: false``."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            line = self._file.readline(LINE_LIMIT * 64)
        except OSError as exc:
            raise ControlError("unavailable", f"the control socket {self.path} failed during {op!r}: "
                                              f"{exc.strerror or exc}") from None
        if not line:
            raise ControlError("unavailable", f"the supervisor closed the control socket during {op!r}")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError("bad_answer", f"the control socket answered {line[:200]!r}") from None
        if not answer.get("ok"):
            raise ControlError(str(answer.get("reason")), str(answer.get("error")))
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ControlClient", "ControlError", "ControlServer", "answers", "socket_path"]
