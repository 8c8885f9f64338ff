"""The supervisor's loopback health server: ``/livez``, ``/readyz``, ``/status`` and ``/metrics``.

Why our own tiny HTTP/1.1 server on h11 (the same library as ``entrypoint/localhttp.py``) rather
than a web framework: PID 1 should carry as little as possible, and four
read-only endpoints do not need routing, middleware or a second event loop.
It runs inside the supervisor's asyncio loop, so ``/livez`` answering *is* the
proof that the loop is alive, and it reads the same ``Status`` object the
supervisor mutates (same thread: no locking).

Caddy proxies ``/livez`` and ``/readyz`` to it on the public port, so
Kubernetes can probe ``http://pod:80/readyz``; ``/status`` (identities, child
PIDs, module hashes) is only answered here, on the loopback address.
``/metrics`` (Prometheus text, ``web/metrics.py``) is answered here and
proxied on the public port only with ``POGLY_PUBLIC_METRICS=true``.

Defensive limits, since anything on the pod network that reaches this port is
untrusted: bounded header size, no request bodies worth the name, a deadline
for each request and for idle keep-alive connections, a cap on concurrent
connections and on requests per connection.

Readiness that an anonymous client cannot flip: Caddy opens one upstream
connection per in-flight request, so a flood of ``GET /readyz`` on the public
port used to exceed the connection cap and turn probes into 503s.  Now (1) the
Caddyfile caps Caddy's connections to this server (``max_conns_per_host``) so
the flood queues inside Caddy, well below our cap; (2) past ``max_connections``
a connection is still served, once, with a short deadline and ``connection:
close`` (every answer is a few bytes computed from memory), and only past
``max_connections + max_overflow`` does a client get the 503; (3) an answer
never waits for a request body (probes have none), so a client trickling a body
through Caddy cannot hold a connection for the request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import h11

from entrypoint.config import HostPort
from entrypoint.localhttp import AsyncClient, HTTPError, Response
from entrypoint.supervision.status import Status
from entrypoint.web import metrics

MAX_HEADER_BYTES = 8 * 1024
MAX_BODY_BYTES = 1024
REQUEST_TIMEOUT = 5.0  # from a request's first byte to its end
IDLE_TIMEOUT = 60.0  # keep-alive: longer than Caddy's upstream keepalive (30 s in the template)
WRITE_TIMEOUT = 5.0
MAX_CONNECTIONS = 64  # keep-alive connections served as usual
MAX_OVERFLOW = 192  # beyond them: one request each with OVERFLOW_TIMEOUT, then closed; beyond that: 503
OVERFLOW_TIMEOUT = 1.0
MAX_REQUESTS_PER_CONNECTION = 1000
READ_CHUNK = 4096

PATHS = ("/livez", "/readyz", "/status", "/metrics")
JSON_TYPE = b"application/json"
_BUSY_BODY = b'{"error":"too many connections"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BUSY_BODY)


class HealthError(Exception):
    """The health server could not be reached or gave an unusable answer."""


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=False).encode()


def answer(status: Status, path: str) -> tuple[int, bytes]:
    """Status code and body for ``path`` (JSON; ``/metrics``: Prometheus text): pure, tested without sockets."""
    if path == "/livez":
        return 200, _json({"status": "alive"})
    if path == "/readyz":
        reasons = status.not_ready()
        if reasons:
            return 503, _json({"status": "not ready", "not_ready": reasons,
                               "shutting_down": status.shutting_down})
        return 200, _json({"status": "ready"})
    if path == "/status":
        return 200, _json(status.to_json())
    if path == "/metrics":
        return 200, metrics.render(status).encode()
    return 404, _json({"error": "not found", "paths": list(PATHS)})


def content_type(path: str, code: int) -> bytes:
    """The ``Content-Type`` of ``answer(status, path)``'s body."""
    return metrics.CONTENT_TYPE.encode() if path == "/metrics" and code == 200 else JSON_TYPE


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # pragma: no cover - h11 rejects a malformed Content-Length
                return 0
    return 0


def _request_path(target: bytes) -> str:
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):  # absolute-form (a proxy-style request) or "*"
        text = urlsplit(text).path or text
    return text.split("?", 1)[0]


class HealthServer:
    """HTTP/1.1 server for the probes, bound to ``host:port`` (port 0 = any free port)."""

    def __init__(self, status: Status, host: str, port: int, *,
                 request_timeout: float = REQUEST_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_overflow: int = MAX_OVERFLOW,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.status = status
        # Asked before /readyz and /status are answered (e.g. "does SpacetimeDB still answer?"):
        # checking only when someone asks costs no wake-ups while nobody probes.
        self.refresh = refresh
        self.host = host
        self._port = port
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_overflow = max_overflow
        self.overflow_served = 0  # connections answered past max_connections (for tests and /status readers)
        self._server: asyncio.Server | None = None
        # Connection task -> its writer, so close() can end both.
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with 0, once started)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def address(self) -> HostPort:
        return HostPort(self.host, self.port)

    async def start(self) -> None:
        """Bind and start accepting; raises ``OSError`` if the address is taken."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self._port,
                                                  limit=MAX_HEADER_BYTES * 2)

    async def close(self) -> None:
        """Stop listening and drop open connections (probes just reconnect elsewhere)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._port = int(server.sockets[0].getsockname()[1]) if server.sockets else self._port
        server.close()
        # Closing the transports ends any pending read; cancelling covers the rest.
        # (asyncio.timeout rather than wait_for: 3.11's wait_for can swallow a cancel.)
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await server.wait_closed()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections -------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always set inside a callback task
            return
        if len(self._conns) >= self.max_connections + self.max_overflow:
            # Answer without reading the request, then close: a clear 503
            # rather than a reset for the client that came one too many.
            writer.write(_BUSY)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            writer.close()
            return
        overflow = len(self._conns) >= self.max_connections
        if overflow:
            self.overflow_served += 1
        self._conns[task] = writer
        try:
            await self._serve(reader, writer, overflow=overflow)
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            # close() cancels connection tasks; ending quietly keeps asyncio's
            # server callback from logging the cancellation as an error.
            pass
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     overflow: bool = False) -> None:
        """Requests on one connection until it closes, idles out or hits a limit.

        ``overflow``: past the connection cap; one request, answered within
        ``OVERFLOW_TIMEOUT`` of the connection's start or not at all.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        loop = asyncio.get_running_loop()
        request_timeout = min(self.request_timeout, OVERFLOW_TIMEOUT) if overflow else self.request_timeout
        idle_timeout = min(self.idle_timeout, OVERFLOW_TIMEOUT) if overflow else self.idle_timeout
        limit = 1 if overflow else MAX_REQUESTS_PER_CONNECTION
        for served in range(limit):
            deadline: float | None = None  # set once the request's first byte arrives
            request: h11.Request | None = None
            try:
                while request is None:  # until the request line and headers are in
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        if deadline is None and conn.trailing_data[0]:
                            deadline = loop.time() + request_timeout
                        wait = idle_timeout if deadline is None else deadline - loop.time()
                        try:
                            async with asyncio.timeout(max(wait, 0.0)):
                                data = await reader.read(READ_CHUNK)
                        except TimeoutError:
                            if deadline is not None:
                                await self._send_error(conn, writer, 408, "request timeout")
                            return
                        if deadline is None and data:
                            deadline = loop.time() + request_timeout
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
                if _content_length(request) > MAX_BODY_BYTES:
                    await self._send_error(conn, writer, 413, "request body too large")
                    return
                # The answer never waits for a body (probes send none): take what has already
                # arrived, and if the rest has not, answer and close instead of waiting for it.
                complete, body = False, 0
                while not complete:
                    event = conn.next_event()
                    if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.Data):
                        body += len(event.data)
                        if body > MAX_BODY_BYTES:
                            await self._send_error(conn, writer, 413, "request body too large")
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        complete = True
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, writer, exc.error_status_hint, "bad request")
                return
            last = served == limit - 1 or not complete
            await self._respond(conn, writer, request, close=last)
            if last or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                       request: h11.Request, *, close: bool) -> None:
        method = request.method.upper()
        path = _request_path(request.target)
        extra: list[tuple[bytes, bytes]] = []
        ctype = JSON_TYPE
        if path in PATHS and method not in (b"GET", b"HEAD"):
            code, body = 405, _json({"error": "method not allowed"})
            extra.append((b"allow", b"GET, HEAD"))
        else:
            if self.refresh is not None and path in ("/readyz", "/status", "/metrics"):
                with contextlib.suppress(Exception):
                    await self.refresh()
            code, body = answer(self.status, path)
            ctype = content_type(path, code)
        await self._send(conn, writer, code, body, head=method == b"HEAD", close=close, extra=extra,
                         content_type=ctype)

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, code: int, body: bytes,
                    *, head: bool = False, close: bool = False,
                    extra: list[tuple[bytes, bytes]] | None = None, content_type: bytes = JSON_TYPE) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *(extra or []),
        ]
        if close:
            headers.append((b"connection", b"close"))
        try:
            reason = HTTPStatus(code).phrase.encode()
        except ValueError:
            reason = b""
        out = conn.send(h11.Response(status_code=code, headers=headers, reason=reason)) or b""
        if not head:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        writer.write(out)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                          code: int, message: str) -> None:
        # h11 lets a server answer from IDLE too (a request it could not parse).
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, TimeoutError):
            await self._send(conn, writer, code, _json({"error": message}), close=True)


# -- clients -----------------------------------------------------------------


def _connect_host(addr: HostPort) -> HostPort:
    """A wildcard bind address is reached through loopback."""
    if addr.host in ("0.0.0.0", ""):
        return HostPort("127.0.0.1", addr.port)
    if addr.host == "::":
        return HostPort("::1", addr.port)
    return addr


async def _get(addr: HostPort, path: str, timeout: float) -> Response:
    # localhttp, not httpx: this module is imported by PID 1 (issue 15), and localhttp never reads
    # HTTP(S)_PROXY, so a proxy set in the container cannot capture loopback probes.
    async with AsyncClient(base_url=_connect_host(addr).url, timeout=timeout) as client:
        return await client.get(path)


async def probe(addr: HostPort, which: Literal["ready", "live"], timeout: float = 2.0,
                out: TextIO | None = None) -> int:
    """Exit status for ``pogly-entrypoint probe ready|live``: 0 on HTTP 200, else 1.

    Writes a one-line reason to ``out`` when given (Docker keeps a HEALTHCHECK's
    output in ``docker inspect``).
    """
    if which not in ("ready", "live"):
        raise ValueError(f"probe: expected 'ready' or 'live', got {which!r}")
    path = "/readyz" if which == "ready" else "/livez"
    try:
        response = await _get(addr, path, timeout)
    except (HTTPError, OSError) as exc:
        if out is not None:
            print(f"{which}: cannot reach {_connect_host(addr)}{path}: {exc or type(exc).__name__}", file=out)
        return 1
    if out is not None:
        print(f"{which}: HTTP {response.status_code} {response.text.strip()}", file=out)
    return 0 if response.status_code == 200 else 1


async def fetch_status(addr: HostPort, timeout: float = 2.0) -> dict[str, Any]:
    """``GET /status`` from the health server, for ``pogly-entrypoint status``."""
    try:
        response = await _get(addr, "/status", timeout)
    except (HTTPError, OSError) as exc:
        raise HealthError(f"cannot reach the health server at {_connect_host(addr)}: "
                          f"{exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise HealthError(f"/status answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        data = response.json()
    except ValueError as exc:
        raise HealthError(f"/status did not answer JSON: {response.text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise HealthError(f"/status answered {type(data).__name__}, not an object")
    return data


def main_probe(addr: HostPort, which: Literal["ready", "live"], timeout: float = 2.0) -> int:
    """Synchronous wrapper for the CLI verb (no event loop is running there)."""
    return asyncio.run(probe(addr, which, timeout, out=sys.stdout))
