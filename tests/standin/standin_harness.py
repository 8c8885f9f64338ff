"""Helpers to run the SpacetimeDB stand-in from tests (importable by any test module).

Usage::

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "standin"))
    from standin_harness import StandinProcess, POGLY_WASM

    with StandinProcess(tmp_path) as st:      # starts on 127.0.0.1:0, waits for the listening line
        st.client().get("/v1/ping")

No sleeps are used for synchronisation: everything waits for a line, a port or a file, with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

HERE = Path(__file__).resolve().parent
STANDIN_BIN = HERE / "bin" / "spacetime"
REPO = HERE.parents[1]

# A minimal wasm module: magic + version + a custom section named "pogly-module".  The stand-in treats
# any bytes containing "pogly" as Pogly's module (tables Config/Heartbeat/Guests/Permissions/Items).
POGLY_WASM = b"\0asm\x01\0\0\0" + b"\x00\x0d\x0cpogly-module"
PLAIN_WASM = b"\0asm\x01\0\0\0" + b"\x00\x0b\x0aother-thing"
FAILING_WASM = POGLY_WASM + b"\x00\x15\x14standin:fail-publish"

LISTEN_RE = re.compile(r"Starting SpacetimeDB listening on (\S+)")

T = TypeVar("T")


def wait_until(fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.005, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class StandinProcess:
    """One ``spacetime start`` process with captured stdout/stderr lines."""

    def __init__(
        self,
        root: Path,
        *,
        data_dir: Path | None = None,
        key_dir: Path | None = None,
        listen: str = "127.0.0.1:0",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.root = Path(root)
        self.data_dir = Path(data_dir) if data_dir else self.root / "data"
        self.key_dir = Path(key_dir) if key_dir else self.root / "keys"
        self.listen = listen
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.wait_ready = wait
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.addr: str | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self._eofs = 0
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return [
            str(STANDIN_BIN), "start", "--data-dir", str(self.data_dir), "--jwt-key-dir", str(self.key_dir),
            "--listen-addr", self.listen, *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> StandinProcess:
        if self.proc is not None:
            raise RuntimeError("this StandinProcess was already started; create a new one to restart")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env
        )
        self._threads = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.stdout_lines), (self.proc.stderr, self.stderr_lines))
        ]
        for t in self._threads:
            t.start()
        if self.wait_ready:
            m = self.wait_for_stdout(LISTEN_RE, timeout)
            self.ready_at = time.monotonic()
            self.addr = m.group(1)
            self.port = int(self.addr.rsplit(":", 1)[1])
        return self

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eofs += 1
            self._cond.notify_all()

    def __enter__(self) -> StandinProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        for t in self._threads:  # let the pumps drain the pipes (EOF once the process is gone)
            t.join(5.0)
        return rc

    def stop(self, timeout: float = 15.0) -> int:
        """Graceful stop the way the supervisor should do it: SIGINT, then wait."""
        self.send(signal.SIGINT)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # -- output --------------------------------------------------------------------------------

    def wait_for_stdout(self, pattern: re.Pattern[str] | str, timeout: float = 15.0) -> re.Match[str]:
        return self._wait_for(self.stdout_lines, pattern, timeout)

    def wait_for_stderr(self, pattern: re.Pattern[str] | str, timeout: float = 15.0) -> re.Match[str]:
        return self._wait_for(self.stderr_lines, pattern, timeout)

    def _wait_for(self, sink: list[str], pattern: re.Pattern[str] | str, timeout: float) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in sink:
                    m = rx.search(line)
                    if m:
                        return m
                if self.proc is not None and self._eofs >= 2:
                    raise RuntimeError(
                        f"stand-in exited ({self.proc.returncode}) before printing {rx.pattern!r}\n"
                        f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line matching {rx.pattern!r} within {timeout}s\nstdout:\n{self.stdout}"
                                       f"\nstderr:\n{self.stderr}")
                self._cond.wait(min(remaining, 0.05))

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.stderr_lines)

    # -- HTTP ----------------------------------------------------------------------------------

    def client(self, token: str | None = None, timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 30.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a non-server ``spacetime`` subcommand to completion (stdin is /dev/null)."""
    return subprocess.run(
        [str(STANDIN_BIN), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )


# -- API shortcuts -----------------------------------------------------------------------------


def new_identity(client: httpx.Client) -> tuple[str, str]:
    """``POST /v1/identity`` -> (identity hex, token)."""
    r = client.post("/v1/identity")
    r.raise_for_status()
    body = r.json()
    return body["identity"], body["token"]


def publish(client: httpx.Client, name: str | None, program: bytes = POGLY_WASM, token: str | None = None,
            clear: bool = False) -> httpx.Response:
    params = {"host_type": "Wasm"}
    if clear:
        params["clear"] = "true"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if name is None:
        return client.post("/v1/database", content=program, params=params, headers=headers)
    return client.put(f"/v1/database/{name}", content=program, params=params, headers=headers)


def sql(client: httpx.Client, db: str, query: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(f"/v1/database/{db}/sql", content=query, headers=headers)


def sql_rows(client: httpx.Client, db: str, query: str, token: str | None = None) -> list[list[Any]]:
    r = sql(client, db, query, token)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()[0]["rows"]


def call(client: httpx.Client, db: str, reducer: str, args: list[Any], token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(f"/v1/database/{db}/call/{reducer}", json=args, headers=headers)


def clog_path(data_dir: Path, replica_id: int = 1) -> Path:
    return data_dir / "replicas" / str(replica_id) / "clog" / "00000000000000000000.stdb.log"
