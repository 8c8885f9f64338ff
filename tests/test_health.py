"""The loopback health server, its clients (probe, fetch_status), and /readyz through Caddy.

Timeouts are exercised with small configured deadlines and waited for with
bounded reads (EOF or a status line), never with sleeps.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from entrypoint.config import HostPort
from entrypoint.supervision.status import BACKOFF, READY, STARTING, Status
from entrypoint.web.health import HealthError, HealthServer, answer, fetch_status, probe
from tests import caddyhelp as ch

Scenario = Callable[[HealthServer, Status], Awaitable[None]]


def serve(scenario: Scenario, status: Status | None = None, **kwargs: float) -> None:
    """Run ``scenario`` against a fresh server on a free loopback port."""
    status = status if status is not None else ch.ready_status()

    async def main() -> None:
        async with HealthServer(status, "127.0.0.1", 0, **kwargs) as server:  # type: ignore[arg-type]
            assert server.port != 0
            await scenario(server, status)

    asyncio.run(main())


async def get(server: HealthServer, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        return await client.request(method, f"http://127.0.0.1:{server.port}{path}")


async def exchange(port: int, data: bytes, deadline: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (bounded by ``deadline``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(deadline):
            return await reader.read(-1)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    code = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return code, headers, body


# -- pure answers --------------------------------------------------------------------


def test_answer_livez_and_unknown() -> None:
    status = Status()
    assert answer(status, "/livez") == (200, b'{"status":"alive"}')
    code, body = answer(status, "/nope")
    assert code == 404 and json.loads(body)["error"] == "not found"


def test_answer_readyz_names_what_is_not_ready() -> None:
    status = Status()
    code, body = answer(status, "/readyz")
    assert code == 503
    reasons = json.loads(body)["not_ready"]
    assert "spacetimedb: not started" in reasons and "caddy: not started" in reasons
    assert "oidc: checking the provider" in reasons  # a wrong provider must fail us before we serve
    status = ch.ready_status()
    assert answer(status, "/readyz") == (200, b'{"status":"ready"}')
    status.module("overlay2")
    code, body = answer(status, "/readyz")
    assert code == 503 and json.loads(body)["not_ready"] == ["module overlay2: pending"]


def test_answer_status_is_full_status() -> None:
    status = ch.ready_status()
    code, body = answer(status, "/status")
    assert code == 200 and json.loads(body) == json.loads(json.dumps(status.to_json()))


# -- the server ------------------------------------------------------------------------


def test_livez_readyz_status_over_http() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        live = await get(server, "/livez")
        assert live.status_code == 200 and live.json() == {"status": "alive"}
        assert live.headers["content-type"] == "application/json"
        assert live.headers["cache-control"] == "no-store"
        ready = await get(server, "/readyz?verbose=1")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        full = await get(server, "/status")
        assert full.status_code == 200 and full.json()["ready"] is True
        assert set(full.json()["children"]) == {"spacetimedb", "caddy"}

    serve(scenario)


def test_readyz_503_while_spacetimedb_restarts_and_livez_stays_200() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        status.child("spacetimedb").state = BACKOFF
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"] == ["spacetimedb: backoff"]
        assert (await get(server, "/livez")).status_code == 200
        status.child("spacetimedb").state = STARTING
        assert (await get(server, "/readyz")).status_code == 503
        assert (await get(server, "/livez")).status_code == 200
        status.child("spacetimedb").state = READY
        assert (await get(server, "/readyz")).status_code == 200

    serve(scenario)


def test_readyz_503_while_a_module_is_unpublished() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        module = status.module("pogly")
        module.serving, module.publish_result = False, "pending"
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"] == ["module pogly: pending"]
        module.serving, module.publish_result = True, "created"
        assert (await get(server, "/readyz")).status_code == 200

    serve(scenario)


def test_readyz_503_after_a_refused_update_although_the_old_module_serves() -> None:
    """Issue 14: a failed update must be visible to `kubectl rollout status` / `flux --wait` (pod not Ready)."""
    async def scenario(server: HealthServer, status: Status) -> None:
        module = status.module("pogly")
        module.serving, module.publish_result = True, "failed: 400: incompatible schema change"
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"] == ["module pogly: update failed: 400: incompatible schema change"]
        assert (await get(server, "/livez")).status_code == 200  # not restarted: the old module keeps running
        module.publish_result = "unchanged"  # the previous image rolled back
        assert (await get(server, "/readyz")).status_code == 200

    serve(scenario)


def test_readyz_503_when_caddy_is_not_serving() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        status.child("caddy").state = STARTING
        assert (await get(server, "/readyz")).json()["not_ready"] == ["caddy: starting"]

    serve(scenario)


def test_readyz_503_when_shutting_down_and_livez_200() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        status.shutting_down = True
        ready = await get(server, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["shutting_down"] is True
        assert "shutting down" in ready.json()["not_ready"]
        assert (await get(server, "/livez")).status_code == 200

    serve(scenario)


def test_head_has_headers_but_no_body() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        status.shutting_down = True
        got = await get(server, "/readyz")
        head = await get(server, "/readyz", "HEAD")
        assert head.status_code == 503 and head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"]

    serve(scenario)


def test_unknown_path_404_and_wrong_method_405() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        assert (await get(server, "/healthz")).status_code == 404
        assert (await get(server, "/")).status_code == 404
        post = await get(server, "/readyz", "POST")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"

    serve(scenario)


def test_keep_alive_and_pipelining() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            # Same connection, two pipelined requests in one write.
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\nHEAD /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            code, _, body = await read_response(reader)
            assert code == 200 and json.loads(body) == {"status": "ready"}
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    serve(scenario)


def test_connection_close_is_honoured() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        data = await exchange(server.port, b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
        assert data.endswith(b'{"status":"alive"}')  # then EOF: exchange() returned

    serve(scenario)


def test_http10_gets_an_answer_and_is_closed() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        data = await exchange(server.port, b"GET /readyz HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"ready"}')

    serve(scenario)


def test_oversized_headers_are_refused() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        big = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        data = await exchange(server.port, big)
        assert data.startswith(b"HTTP/1.1 431")

    serve(scenario)


def test_request_body_is_bounded() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        data = await exchange(server.port, b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                              + b"x" * 5000)
        assert data.startswith(b"HTTP/1.1 413")
        small = await exchange(server.port, b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                               b"Connection: close\r\n\r\nok")
        assert small.startswith(b"HTTP/1.1 200")

    serve(scenario)


def test_garbage_gets_400() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        data = await exchange(server.port, b"\x16\x03\x01\x02\x00 not http\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400")

    serve(scenario)


def test_slow_request_times_out_with_408() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        # Half a request line, then silence: answered 408 and closed after request_timeout.
        data = await exchange(server.port, b"GET /livez HTTP/1.1\r\nHo", deadline=5.0)
        assert data.startswith(b"HTTP/1.1 408")

    serve(scenario, request_timeout=0.3)


def test_idle_keep_alive_connection_is_closed() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            async with asyncio.timeout(5):
                assert await reader.read(1) == b""  # EOF after idle_timeout
        finally:
            writer.close()

    serve(scenario, idle_timeout=0.3)


def test_connection_cap() -> None:
    # Past max_connections a connection is still answered once (then closed): a probe is never
    # refused because others hold connections.  Only past max_connections + max_overflow: 503.
    async def scenario(server: HealthServer, status: Status) -> None:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        # Make sure both are accepted and being served before the third arrives.
        for reader, writer in conns:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        third_reader, third = await asyncio.open_connection("127.0.0.1", server.port)
        # The fourth gets a 503 and is closed (read before sending, so no reset races it).
        data = await exchange(server.port, b"")
        assert data.startswith(b"HTTP/1.1 503") and data.endswith(b'{"error":"too many connections"}')
        third.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        code, headers, body = await read_response(third_reader)
        assert code == 200 and headers["connection"] == "close" and json.loads(body) == {"status": "ready"}
        async with asyncio.timeout(5):
            assert await third_reader.read(1) == b""  # one request only, then closed
        assert server.overflow_served == 1
        third.close()
        for _, writer in conns:
            writer.close()

    serve(scenario, max_connections=2, max_overflow=1)


def test_close_stops_listening_and_drops_connections() -> None:
    async def main() -> None:
        server = HealthServer(Status(), "127.0.0.1", 0)
        await server.start()
        port = server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        await server.close()
        async with asyncio.timeout(5):
            assert await reader.read(1) == b""
        writer.close()
        assert server.port == port
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await server.close()  # idempotent

    asyncio.run(main())


def test_port_in_use_raises() -> None:
    async def main() -> None:
        async with HealthServer(Status(), "127.0.0.1", 0) as first:
            with pytest.raises(OSError):
                await HealthServer(Status(), "127.0.0.1", first.port).start()

    asyncio.run(main())


# -- probe and fetch_status --------------------------------------------------------------


def test_probe_ready_and_live() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        addr = HostPort("127.0.0.1", server.port)
        out = io.StringIO()
        assert await probe(addr, "ready", out=out) == 0
        assert await probe(addr, "live") == 0
        status.shutting_down = True
        assert await probe(addr, "ready", out=out) == 1
        assert await probe(addr, "live") == 0
        assert "HTTP 503" in out.getvalue() and "shutting down" in out.getvalue()
        with pytest.raises(ValueError):
            await probe(addr, "sideways")  # type: ignore[arg-type]

    serve(scenario)


def test_probe_wildcard_address_goes_to_loopback() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        assert await probe(HostPort("0.0.0.0", server.port), "live") == 0

    serve(scenario)


def test_probe_unreachable_is_1() -> None:
    port = ch.free_port()
    out = io.StringIO()
    assert asyncio.run(probe(HostPort("127.0.0.1", port), "ready", timeout=2, out=out)) == 1
    assert "cannot reach" in out.getvalue()


def test_probe_timeout_is_1() -> None:
    # A listener that accepts and never answers: the probe gives up at its timeout.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        addr = HostPort("127.0.0.1", sock.getsockname()[1])
        assert asyncio.run(probe(addr, "live", timeout=0.3)) == 1


def test_fetch_status() -> None:
    async def scenario(server: HealthServer, status: Status) -> None:
        data = await fetch_status(HostPort("127.0.0.1", server.port))
        assert data["ready"] is True and data["children"]["caddy"]["state"] == READY

    serve(scenario)
    with pytest.raises(HealthError, match="cannot reach"):
        asyncio.run(fetch_status(HostPort("127.0.0.1", ch.free_port())))


# -- through Caddy's public port ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    bg = ch.BackgroundLoop()
    stack = bg.run(ch.start_stack(tmp_path_factory.mktemp("health")))
    yield bg, stack
    assert bg.run(ch.stop_stack(stack)) == 0
    bg.close()


def _set(stack: ch.Stack, **changes: object) -> Callable[[], None]:
    """A mutation of the stack's Status, to run in the loop thread that owns it."""
    def apply() -> None:
        for key, value in changes.items():
            if key == "spacetimedb":
                stack.status.child("spacetimedb").state = str(value)
            else:
                setattr(stack.status, key, value)
    return apply


def test_readyz_and_livez_through_caddy(stack) -> None:  # type: ignore[no-untyped-def]
    bg, st = stack
    with httpx.Client(base_url=st.url, trust_env=False, timeout=10) as public:
        ready = public.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        assert ready.headers["cache-control"] == "no-store"
        assert ready.headers["x-frame-options"] == "SAMEORIGIN" and "server" not in ready.headers

        bg.call(_set(st, spacetimedb=BACKOFF))
        down = public.get("/readyz")
        assert down.status_code == 503 and down.json()["not_ready"] == ["spacetimedb: backoff"]
        assert public.get("/livez").status_code == 200

        bg.call(_set(st, spacetimedb=READY, shutting_down=True))
        # Right after SIGTERM the supervisor flips shutting_down while Caddy still serves.
        draining = public.get("/readyz")
        assert draining.status_code == 503 and draining.json()["shutting_down"] is True
        assert public.head("/readyz").status_code == 503
        assert public.get("/livez").status_code == 200
        bg.call(_set(st, shutting_down=False))
        assert public.get("/readyz").status_code == 200


def test_status_only_on_loopback(stack) -> None:  # type: ignore[no-untyped-def]
    _bg, st = stack
    with httpx.Client(trust_env=False, timeout=10) as c:
        assert c.get(f"{st.url}/status").status_code == 403
        local = c.get(f"http://127.0.0.1:{st.health.port}/status")
        assert local.status_code == 200 and "children" in local.json()


def test_probe_through_public_port(stack) -> None:  # type: ignore[no-untyped-def]
    # `pogly-entrypoint probe` targets the health address, but the same answer is on :80.
    _bg, st = stack
    addr = HostPort("127.0.0.1", st.settings.http_port)
    assert asyncio.run(probe(addr, "ready")) == 0
    assert asyncio.run(probe(addr, "live")) == 0


def test_health_server_tolerates_caddy_keepalive(stack) -> None:  # type: ignore[no-untyped-def]
    # Many probes through Caddy reuse its upstream connections; all must succeed.
    _bg, st = stack
    with httpx.Client(base_url=st.url, trust_env=False, timeout=10) as public:
        codes = {public.get("/livez").status_code for _ in range(50)}
    assert codes == {200}
