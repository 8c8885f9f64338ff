"""A tiny HTTP server with canned answers, for provider failures a real OP won't produce.

Why a real server instead of mocking httpx: the checks under test are about
what goes over a socket (timeouts, huge bodies, redirect loops, retries), and a
mock would only test our assumptions about httpx.  ``http.server`` in a thread
on 127.0.0.1 port 0 keeps it dependency-free and parallel-safe.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc.jwk import ECKey, OctKey, RSAKey


@dataclass
class Reply:
    """One canned answer.  ``body`` may be bytes, text, or JSON data.

    ``huge``: stream that many bytes of filler instead of ``body`` (with a
    Content-Length unless ``declare_length`` is false); ``hang``: accept the
    request and never answer.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    huge: int = 0
    declare_length: bool = True
    hang: bool = False


class CannedServer:
    """Serves ``routes[path]`` replies in order; the last one repeats."""

    def __init__(self) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.hits: list[str] = []
        self.bytes_sent: dict[str, int] = {}
        self._lock = threading.Condition()
        self._released = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="canned-http", daemon=True
        )

    def set(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self.routes[path] = list(replies)

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits.count(path)

    def wait_for_hits(self, path: str, n: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``path`` was requested ``n`` times (a condition, not a sleep)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.hits.count(path) >= n, timeout)

    def _next(self, path: str) -> Reply | None:
        with self._lock:
            self.hits.append(path)
            self._lock.notify_all()
            queue = self.routes.get(path)
            if not queue:
                return None
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: simplest to reason about

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                reply = server._next(path)
                if reply is None:
                    reply = Reply(404, {"error": "no canned reply", "path": path})
                if reply.hang:
                    server._released.wait(120)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.huge:
                    self._send_huge(path, reply)
                    return
                body = reply.body
                if body is None:
                    data = b""
                elif isinstance(body, bytes):
                    data = body
                elif isinstance(body, str):
                    data = body.encode()
                else:
                    data = json.dumps(body).encode()
                    if "Content-Type" not in reply.headers:
                        self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send_huge(self, path: str, reply: Reply) -> None:
                if reply.declare_length:
                    self.send_header("Content-Length", str(reply.huge))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                chunk = b" " * 65536
                sent = 0
                try:
                    while sent < reply.huge:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except OSError:
                    pass  # the client hung up, which is the point
                finally:
                    with server._lock:
                        server.bytes_sent[path] = sent

        return Handler

    def __enter__(self) -> CannedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@contextmanager
def silent_listener() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel does) but never answers.

    The socket listens and is never ``accept()``-ed: the client connects, sends
    its request into the void, and waits.  Yields ``http://127.0.0.1:PORT``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# --------------------------------------------------------------------------- documents


def rsa_public_jwk(kid: str = "rsa-1") -> dict[str, Any]:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}).as_dict(
        private=False
    )


def rsa_private_jwk(kid: str = "rsa-leaked") -> dict[str, Any]:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}).as_dict(
        private=True
    )


def ec_public_jwk(kid: str = "ec-1", curve: str = "P-256", alg: str | None = "ES256") -> dict[str, Any]:
    params: dict[str, Any] = {"kid": kid, "use": "sig"}
    if alg:
        params["alg"] = alg
    return ECKey.generate_key(curve, parameters=params).as_dict(private=False)


def oct_jwk(kid: str = "hmac-1") -> dict[str, Any]:
    return OctKey.generate_key(256, parameters={"kid": kid, "use": "sig", "alg": "HS256"}).as_dict(
        private=False
    )


def discovery_doc(issuer: str, base: str, /, **overrides: Any) -> dict[str, Any]:
    """A minimal valid OpenID Provider document; ``None`` overrides delete a field."""
    prefix = base.rstrip("/")
    doc: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": f"{prefix}/authorize",
        "token_endpoint": f"{prefix}/token",
        "jwks_uri": f"{prefix}/jwks",
        "userinfo_endpoint": f"{prefix}/userinfo",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "profile"],
    }
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


REQUIRED_FIELDS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "jwks_uri",
    "response_types_supported",
    "subject_types_supported",
    "id_token_signing_alg_values_supported",
)
