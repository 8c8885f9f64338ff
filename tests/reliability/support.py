"""Helpers for the reliability scenarios: raw HTTP load on loopback, a FIFO as stdout.

Loads are bounded (a fixed number of connections and rounds) and only ever
target 127.0.0.1.  Every wait has a deadline and waits for something
observable (a response, a line, a process state), never a fixed time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness import ENTRYPOINT, REPO, start_readers, unshare_child, wait_for


async def get(port: int, path: str, *, headers: dict[str, str] | None = None,
              timeout: float = 10.0) -> tuple[int, bytes]:
    """One ``GET`` on a fresh connection (``Connection: close``): status code and body."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read(-1)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def flood(port: int, path: str, *, concurrency: int, rounds: int,
                timeout: float = 30.0) -> collections.Counter[int | str]:
    """``rounds`` times: open ``concurrency`` connections, then send every request at once.

    Opening all connections before sending anything makes the requests truly
    concurrent (not a queue drained as fast as it fills).  Returns how many
    answers had each status code; a failed exchange counts under its exception name.
    """
    codes: collections.Counter[int | str] = collections.Counter()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()

    async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], go: asyncio.Event) -> None:
        reader, writer = conn
        try:
            await go.wait()
            writer.write(request)
            await writer.drain()
            data = await reader.read(-1)
            codes[int(data.split(b" ", 2)[1])] += 1
        except (OSError, IndexError, ValueError) as exc:
            codes[type(exc).__name__] += 1
        finally:
            writer.close()

    for _ in range(rounds):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
        go = asyncio.Event()
        tasks = [asyncio.create_task(one(c, go)) for c in conns]
        go.set()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*tasks)
    return codes


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class FifoRun:
    """The entrypoint (optionally as PID 1) with stdout a FIFO read by a ``cat`` we can kill or stop.

    ``cat`` copies the FIFO to a pipe this object reads, so the test sees every
    line that got through; killing ``cat`` leaves the entrypoint's stdout with
    no reader (EPIPE), stopping it leaves a full pipe (writes would block).
    """

    def __init__(self, tmp: Path, env: dict[str, str], *, pid1: bool = False) -> None:
        self.fifo = tmp / "stdout.fifo"
        os.mkfifo(self.fifo)
        self.reader = subprocess.Popen(["cat", str(self.fifo)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        fd = os.open(self.fifo, os.O_WRONLY)  # returns once cat has opened its end
        argv = [*ENTRYPOINT, "run"]
        if pid1:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        try:
            self.proc = subprocess.Popen(argv, env=env, stdout=fd, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, cwd=REPO)
        finally:
            os.close(fd)
        self.pid1 = pid1
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._threads = start_readers(self._read_out, self._read_err)

    def _read_out(self) -> None:
        assert self.reader.stdout is not None
        for line in self.reader.stdout:
            with contextlib.suppress(ValueError), self._lock:
                self.events.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, event: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            found = self.find(event, **fields)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {event}: {self.stderr[-10:]}")
            return None

        return wait_for(check, timeout, f"log event {event}")

    @property
    def inner_pid(self) -> int:
        if not self.pid1:
            return self.proc.pid

        return unshare_child(self.proc.pid)

    def signal(self, sig: int) -> None:
        os.kill(self.inner_pid, sig)

    def close(self) -> None:
        """Kill whatever is left (the entrypoint's tree and cat): a failed test leaves nothing behind."""
        from tests.harness import kill_with_descendants

        with contextlib.suppress(ProcessLookupError):
            os.kill(self.reader.pid, signal.SIGCONT)
        for proc in (self.proc, self.reader):
            if proc.poll() is None:
                kill_with_descendants(proc)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> FifoRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def elapsed(since: float) -> float:
    return time.monotonic() - since
