"""A small asyncio HTTP/1.1 client on h11, for the services PID 1 talks to on loopback.

Why not httpx: PID 1 only ever speaks plain HTTP/1.1 to SpacetimeDB
(``POGLY_SPACETIME_ADDR``) and to our own health server, yet httpx brought
ssl (4.3 MB), httpx (2.7 MB), httpcore (0.9 MB), anyio (0.6 MB) and certifi
into it: resident for the container's whole life, and ~50-70 ms of imports on
the start path, competing with SpacetimeDB's own start on a 2-core machine
(issue 15, docs/performance.md "Where PID 1's memory goes").  h11 is already
pinned for the health server (``web/health.py``), so this client costs a few
hundred lines and no new dependency.  TLS (the OIDC provider) happens only in
the separate ``oidc-check`` helper process, which keeps httpx.

What it does, and what it deliberately does not:

* ``http://`` only: an ``https://`` URL is refused with ``ValueError``.
  ``startup.run`` blocks ``ssl`` in PID 1 altogether.
* Never a proxy: no environment lookup at all (``HTTP_PROXY``, ``NO_PROXY``,
  ``.netrc``), so a cluster-wide proxy setting cannot capture 127.0.0.1.
* One connection per request (``Connection: close``).  On loopback a TCP
  connect costs tens of microseconds, the callers make a few requests a
  minute once started (publish, SQL when a module's log rings, log streams
  that stay open), and a pool would hold connections to a SpacetimeDB that
  may have restarted since: the next request on a stale keep-alive connection
  would fail half-way and need retry-on-stale logic.  Without a pool there is
  nothing to go stale and nothing to close.
* No redirects, cookies or compression (``Accept-Encoding: identity``).
* Timeouts (``Timeout(total, connect=...)``): ``connect`` bounds the TCP
  connect, ``total`` the whole exchange (connect, upload, answer and body).
  For ``stream`` it bounds the exchange up to the response head; the body is
  then read without a deadline (a followed log stays open for as long as the
  server runs).
* Errors: everything that kept an exchange from producing a complete answer
  is a ``TransportError`` (``ConnectError``, ``NetworkError``,
  ``ProtocolError`` for a malformed answer or one cut mid-body,
  ``TimeoutException``); an HTTP error *status* is an answer, not an
  exception.
* Tests script answers with ``AsyncClient(transport=fn)``: ``fn(Request)``
  returns a ``Response`` (or an awaitable of one) or raises, and no socket is
  opened.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json as jsonlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import h11

READ_CHUNK = 64 * 1024
WRITE_CHUNK = 256 * 1024  # upload slices: a multi-MB wasm is sent with bounded extra buffering
DEFAULT_TIMEOUT = 5.0
USER_AGENT = "pogly-entrypoint"
_MISSING: Any = object()


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    """Base of every error this client raises; ``request`` is the exchange it belongs to (when known)."""

    def __init__(self, message: str, request: Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class TransportError(HTTPError):
    """No complete answer: could not connect, the connection broke, the answer was malformed or late."""


class ConnectError(TransportError):
    """The TCP connection could not be established (refused, unreachable, name not resolved)."""


class NetworkError(TransportError):
    """The connection failed while the request was sent or the answer read (reset, broken pipe)."""


class ProtocolError(TransportError):
    """The answer was not valid HTTP/1.1, or the connection closed before its body was complete."""


class TimeoutException(TransportError):
    """A deadline passed (base of ``ConnectTimeout`` and ``ReadTimeout``)."""


class ConnectTimeout(TimeoutException):
    """The TCP connect took longer than ``Timeout.connect``."""


class ReadTimeout(TimeoutException):
    """The exchange took longer than ``Timeout.total`` (for a stream: until the response head)."""


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeout:
    """``total`` bounds the exchange, ``connect`` the TCP connect (default: ``total``); None = no deadline."""

    total: float | None
    connect: float | None = _MISSING

    def __post_init__(self) -> None:
        if self.connect is _MISSING:
            object.__setattr__(self, "connect", self.total)

    @classmethod
    def of(cls, value: float | Timeout | None) -> Timeout:
        return value if isinstance(value, Timeout) else cls(value)


class Headers(Mapping[str, str]):
    """Case-insensitive header mapping that keeps the order and the spelling it was given."""

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        pairs = items.items() if isinstance(items, Mapping) else (items or ())
        self._items: list[tuple[str, str]] = [(str(k), str(v)) for k, v in pairs]

    def __getitem__(self, key: str) -> str:
        wanted = key.lower()
        values = [v for k, v in self._items if k.lower() == wanted]
        if not values:
            raise KeyError(key)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.lower() for k, _ in self._items))

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self._items})

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def set_default(self, key: str, value: str) -> None:
        if key not in self:
            self._items.append((key, value))

    def set(self, key: str, value: str) -> None:
        """Replace every ``key`` header (any spelling) with this one value."""
        wanted = key.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != wanted]
        self._items.append((key, value))

    def raw(self) -> list[tuple[str, str]]:
        return list(self._items)


@dataclass
class Request:
    """One request as sent: what a scripted ``transport`` gets to look at."""

    method: str
    host: str
    port: int
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: Headers = field(default_factory=Headers)
    content: bytes = b""

    @property
    def target(self) -> str:
        return self.path + (f"?{urlencode(self.params)}" if self.params else "")

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}{self.target}"

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


class Response:
    """Status, headers and body of one answer.

    Built by the client (``content`` read, or a stream to read) or by a test's
    ``transport`` from ``content=``, ``text=``, ``json=`` or ``stream=`` (an
    async iterable of bytes).
    """

    def __init__(self, status_code: int, *, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 content: bytes | None = None, text: str | None = None, json: Any = _MISSING,
                 stream: AsyncIterable[bytes] | None = None, reason: str = "") -> None:
        self.status_code = status_code
        self.reason_phrase = reason
        self.headers = Headers(headers)
        self.request: Request | None = None
        if text is not None:
            content = text.encode("utf-8")
            self.headers.set_default("Content-Type", "text/plain; charset=utf-8")
        elif json is not _MISSING:
            content = jsonlib.dumps(json).encode("utf-8")
            self.headers.set_default("Content-Type", "application/json")
        self._content: bytes | None = None if stream is not None else (content or b"")
        self._stream = stream
        self._consumed = False
        self._closer: Callable[[], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("the response body was not read: call 'await response.aread()' first")
        return self._content

    @property
    def encoding(self) -> str:
        """The ``charset`` of ``Content-Type`` when Python knows it, else UTF-8."""
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                with contextlib.suppress(LookupError):
                    return codecs.lookup(value.strip().strip('"')).name
        return "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding, errors="replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return jsonlib.loads(self.content)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive (or at once when already read)."""
        if self._content is not None:
            if self._content:
                yield self._content
            return
        if self._consumed or self._stream is None:
            raise RuntimeError("the response body was already read as a stream")
        self._consumed = True
        async for chunk in self._stream:
            if chunk:
                yield chunk

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body as text lines, without their ``\\n`` / ``\\r\\n``."""
        decoder = codecs.getincrementaldecoder(self.encoding)(errors="replace")
        pending = ""
        async for chunk in self.aiter_bytes():
            *complete, pending = (pending + decoder.decode(chunk)).split("\n")
            for line in complete:
                yield line.removesuffix("\r")
        rest = pending + decoder.decode(b"", final=True)
        if rest:
            yield rest.removesuffix("\r")

    async def aread(self) -> bytes:
        """Read the whole body (a no-op when it was read already)."""
        if self._content is None:
            self._content = b"".join([chunk async for chunk in self.aiter_bytes()])
        return self._content

    async def aclose(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None:
            await closer()


Transport = Callable[[Request], "Response | Awaitable[Response]"]


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class AsyncClient:
    """``async with AsyncClient(base_url="http://127.0.0.1:3000", timeout=...) as client: ...``.

    Holds no connections (one per request), so entering and leaving it costs
    nothing; it exists so call sites read as they did with httpx and so tests
    can hand in a ``transport``.
    """

    def __init__(self, base_url: str = "", *, timeout: float | Timeout | None = DEFAULT_TIMEOUT,
                 headers: Mapping[str, str] | None = None, transport: Transport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        if self.base_url:
            _split(self.base_url)  # refuse https:// and nonsense now, not at the first request
        self.timeout = Timeout.of(timeout)
        self.headers = dict(headers or {})
        self._transport = transport

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to close: kept for the ``async with`` shape."""

    def build_request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                      headers: Mapping[str, str] | None = None, content: bytes | str | None = None,
                      json: Any = _MISSING) -> Request:
        host, port, path, query = _split(url if "://" in url else f"{self.base_url}{url}")
        merged = dict(parse_qsl(query, keep_blank_values=True))
        merged.update({str(k): str(v) for k, v in (params or {}).items()})
        sent = Headers(self.headers)
        for name, value in (headers or {}).items():
            sent.set(name, value)
        body = b""
        if json is not _MISSING:
            body = jsonlib.dumps(json).encode("utf-8")
            sent.set_default("Content-Type", "application/json")
        elif content is not None:
            body = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        request = Request(method.upper(), host, port, path, merged, sent, body)
        sent.set_default("Host", request.authority)
        sent.set_default("User-Agent", USER_AGENT)
        sent.set_default("Accept", "*/*")
        sent.set_default("Accept-Encoding", "identity")
        if body or request.method in ("POST", "PUT", "PATCH"):
            sent.set_default("Content-Length", str(len(body)))
        sent.set_default("Connection", "close")
        return request

    async def request(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                      headers: Mapping[str, str] | None = None, content: bytes | str | None = None,
                      json: Any = _MISSING, timeout: float | Timeout | None = _MISSING) -> Response:
        """Send one request and read the whole answer, all within ``timeout.total``."""
        request = self.build_request(method, url, params=params, headers=headers, content=content, json=json)
        deadline = self.timeout if timeout is _MISSING else Timeout.of(timeout)
        try:
            async with asyncio.timeout(deadline.total):
                response = await self._open(request, deadline)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        except TimeoutError:
            raise ReadTimeout(f"no complete answer within {deadline.total:g} s from {request}", request) from None
        return response

    async def get(self, url: str, **kwargs: Any) -> Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Response:
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> Response:
        return await self.request("PUT", url, **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, params: Mapping[str, Any] | None = None,
                     headers: Mapping[str, str] | None = None, content: bytes | str | None = None,
                     json: Any = _MISSING, timeout: float | Timeout | None = _MISSING) -> AsyncIterator[Response]:
        """The answer with its body unread (``aiter_lines``/``aiter_bytes``/``aread``); closed on exit.

        ``timeout.total`` bounds the exchange up to the response head only.
        """
        request = self.build_request(method, url, params=params, headers=headers, content=content, json=json)
        deadline = self.timeout if timeout is _MISSING else Timeout.of(timeout)
        try:
            async with asyncio.timeout(deadline.total):
                response = await self._open(request, deadline)
        except TimeoutError:
            raise ReadTimeout(f"no answer within {deadline.total:g} s from {request}", request) from None
        try:
            yield response
        finally:
            await response.aclose()

    async def _open(self, request: Request, deadline: Timeout) -> Response:
        """The response head, with the body left to read: from the scripted transport or a new connection."""
        if self._transport is not None:
            answer = self._transport(request)
            response = await answer if isinstance(answer, Awaitable) else answer
            response.request = request
            return response
        return await _Exchange(request).open(deadline.connect)


# ---------------------------------------------------------------------------
# One connection, one exchange
# ---------------------------------------------------------------------------


def _split(url: str) -> tuple[str, int, str, str]:
    """``http://host:port/path?query`` → its parts; anything but plain ``http://`` is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"localhttp speaks plain http:// to loopback services only, got {url!r} "
                         "(TLS belongs in the oidc-check helper, which uses httpx)")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return parts.hostname, port, parts.path or "/", parts.query


class _Exchange:
    """One TCP connection carrying one request and its answer, then closed."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.conn = h11.Connection(h11.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, connect_timeout: float | None) -> Response:
        request = self.request
        try:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result and drops a cancellation
                # that lands in the turn the connection completes (fixed in 3.12), and a stop must never be lost.
                async with asyncio.timeout(connect_timeout):
                    self.reader, self.writer = await asyncio.open_connection(request.host, request.port)
            except TimeoutError:
                raise ConnectTimeout(f"connecting to {request.authority} took over {connect_timeout:g} s "
                                     f"({request.method} {request.target})", request) from None
            except OSError as exc:
                raise ConnectError(f"cannot connect to {request.authority} ({request.method} {request.target}): "
                                   f"{exc}", request) from exc
            head = await self._send_and_read_head()
        except BaseException:
            await self.close()
            raise
        response = Response(head.status_code, reason=head.reason.decode("latin-1"),
                            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
                            stream=self._body())
        response.request = request
        response._closer = self.close
        return response

    async def _send_and_read_head(self) -> h11.Response:
        assert self.writer is not None
        request = self.request
        sent_failure: OSError | None = None
        try:
            try:
                head = self.conn.send(h11.Request(
                    method=request.method, target=request.target,
                    headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.raw()]))
            except (h11.LocalProtocolError, UnicodeEncodeError) as exc:  # e.g. a newline in a header value
                raise ValueError(f"cannot send {request.method} {request.target}: {exc}") from None
            self.writer.write(head or b"")
            body = memoryview(request.content)
            for start in range(0, len(body), WRITE_CHUNK):
                self.writer.write(self.conn.send(h11.Data(data=body[start:start + WRITE_CHUNK])) or b"")
                await self.writer.drain()
            self.writer.write(self.conn.send(h11.EndOfMessage()) or b"")
            await self.writer.drain()
        except OSError as exc:
            # The server may have answered before reading the whole upload (a refusal) and closed: read that.
            sent_failure = exc
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Response):
                    return event
                if not isinstance(event, h11.InformationalResponse):
                    raise ProtocolError(f"unexpected {type(event).__name__} before the response head "
                                        f"from {request}", request)
        except TransportError:
            if sent_failure is not None:
                raise NetworkError(f"sending {request} failed: {sent_failure}", request) from sent_failure
            raise

    async def _next_event(self) -> Any:
        assert self.reader is not None
        request = self.request
        try:
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    if isinstance(event, h11.ConnectionClosed):
                        raise ProtocolError(f"{request.authority} closed the connection without a complete "
                                            f"answer to {request.method} {request.target}", request)
                    return event
                self.conn.receive_data(await self.reader.read(READ_CHUNK))
        except h11.RemoteProtocolError as exc:
            raise ProtocolError(f"bad or incomplete answer from {request.authority} to {request.method} "
                                f"{request.target}: {exc}", request) from None
        except OSError as exc:
            raise NetworkError(f"reading the answer to {request} failed: {exc}", request) from exc

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return

    async def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


__all__ = [
    "DEFAULT_TIMEOUT", "AsyncClient", "ConnectError", "ConnectTimeout", "HTTPError", "Headers", "NetworkError",
    "ProtocolError", "ReadTimeout", "Request", "Response", "Timeout", "TimeoutException", "Transport",
    "TransportError",
]
