"""entrypoint/localhttp.py: the loopback HTTP/1.1 client PID 1 uses instead of httpx (issue 15).

Three kinds of peer, all real processes or sockets:

* the SpacetimeDB stand-in (tests/standin): identity, a multi-MB publish, a
  followed (chunked) log stream, and ``STANDIN_PUBLISH_CUT`` dropping the
  connection mid-upload;
* a tiny asyncio server in this file, for what no well-behaved server does:
  bodies cut short, answers that never come, chunk boundaries inside lines;
* the real ``pogly-entrypoint run`` as PID 1 under ``python -X importtime``,
  to prove PID 1 never imports ssl, httpx, httpcore, anyio or certifi.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from entrypoint import localhttp
from entrypoint.localhttp import AsyncClient, Request, Response, Timeout
from tests.fixtures.make_wasm import module as make_module
from tests.harness import Running, base_env
from tests.stdbhelp import StandIn

DEADLINE = 20.0  # generous bound for every wait in this file; never a sleep

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """A one-off HTTP peer on 127.0.0.1: ``handler`` gets each raw connection; yields the base URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """Request line, headers (lower-cased names) and a Content-Length body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *fields = head.split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return line, headers, body


# ---------------------------------------------------------------------------
# Against the real SpacetimeDB stand-in
# ---------------------------------------------------------------------------


def test_identity_multi_megabyte_publish_and_a_followed_log_against_the_standin(tmp_path: Path) -> None:
    wasm = make_module(extra="x" * (6 << 20))  # a custom section makes it a 6 MB upload
    assert len(wasm) > 6 << 20

    async def main(base: str) -> None:
        async with AsyncClient(base_url=base, timeout=Timeout(30.0, connect=5.0)) as client:
            assert (await client.get("/v1/ping")).status_code == 200
            created = await client.post("/v1/identity")
            assert created.is_success and created.headers["CONTENT-TYPE"].startswith("application/json")
            token = created.json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            published = await client.put("/v1/database/lh", params={"host_type": "Wasm"}, content=wasm,
                                         headers=auth)
            assert published.is_success, published.text
            assert "Success" in published.json()
            async with client.stream("GET", "/v1/database/lh/logs", params={"num_lines": "0", "follow": "true"},
                                     headers=auth) as logs:
                assert logs.status_code == 200
                assert logs.headers["content-type"] == "application/x-ndjson"
                lines = logs.aiter_lines()
                called = await client.post("/v1/database/lh/call/log_message", json=["Warn", "via localhttp"],
                                           headers=auth)
                assert called.status_code == 200, called.text
                async for line in lines:
                    if "via localhttp" in line:
                        assert json.loads(line)["message"] == "via localhttp"
                        break
            refused = await client.get("/v1/database/lh/logs", params={"num_lines": "1"})  # anonymous: not owner
            assert not refused.is_success and refused.text

    with StandIn(tmp_path / "data", tmp_path / "config") as server:
        run(main(server.addr.url))


def test_a_publish_cut_by_the_standin_is_a_transport_error_and_the_retry_lands(tmp_path: Path) -> None:
    marker = tmp_path / "cut-once"
    wasm = make_module(extra="y" * (1 << 20))

    async def main(base: str) -> None:
        async with AsyncClient(base_url=base, timeout=Timeout(30.0, connect=5.0)) as client:
            token = (await client.post("/v1/identity")).json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            with pytest.raises(localhttp.TransportError) as cut:
                await client.put("/v1/database/cut", params={"host_type": "Wasm"}, content=wasm, headers=auth)
            assert "PUT" in str(cut.value) and cut.value.request is not None
            again = await client.put("/v1/database/cut", params={"host_type": "Wasm"}, content=wasm, headers=auth)
            assert again.is_success, again.text

    with StandIn(tmp_path / "data", tmp_path / "config", env={"STANDIN_PUBLISH_CUT": str(marker)}) as server:
        run(main(server.addr.url))
    assert marker.exists()  # the cut really happened


# ---------------------------------------------------------------------------
# Edge cases against a tiny asyncio server
# ---------------------------------------------------------------------------


def test_chunked_answer_read_whole_and_as_lines_across_chunk_boundaries() -> None:
    chunks = [b"first li", b"ne\r\nsecond", b" line\n", "\u00e9t\u00e9".encode()[:3], "\u00e9t\u00e9".encode()[3:]]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"X-Mixed-Case: yes\r\n\r\n")
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base) as client:
            whole = await client.get("/chunked")
            assert whole.content == b"".join(chunks)
            assert whole.headers["x-mixed-case"] == whole.headers["X-MIXED-CASE"] == "yes"
            async with client.stream("GET", "/chunked") as streamed:
                assert [line async for line in streamed.aiter_lines()] == ["first line", "second line", "\u00e9t\u00e9"]

    run(main())


def test_request_line_headers_json_body_and_a_large_upload_arrive_intact() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []
    upload = hashlib.sha256(b"seed").digest() * ((8 << 20) // 32)  # 8 MB
    bases: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, headers, body = await read_request(reader)
        seen.append((line, headers, body))
        answer = json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}).encode()
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base + "/", headers={"X-Client": "ours"}) as client:
            bases.append(base)
            sent = await client.post("/v1/thing?a=1", params={"b": "two words"}, json={"k": ["v"]})
            assert sent.status_code == 201 and sent.is_success
            big = await client.put("/v1/big", content=upload, timeout=Timeout(30.0, connect=2.0))
            assert big.json() == {"sha256": hashlib.sha256(upload).hexdigest(), "length": len(upload)}

    run(main())
    line, headers, body = seen[0]
    assert line == "POST /v1/thing?a=1&b=two+words HTTP/1.1"
    assert f"http://{headers['host']}" == bases[0]
    assert headers["content-type"] == "application/json" and json.loads(body) == {"k": ["v"]}
    assert headers["x-client"] == "ours" and headers["connection"] == "close"
    assert seen[1][0] == "PUT /v1/big HTTP/1.1" and len(seen[1][2]) == len(upload) == 8 << 20


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_answer_cut_mid_body_is_a_transport_error(framing: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly part")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it")
        await writer.drain()  # then the handler returns and the connection closes

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base) as client:
            with pytest.raises(localhttp.ProtocolError) as whole:
                await client.get("/cut")
            assert isinstance(whole.value, localhttp.TransportError) and "GET /cut" in str(whole.value)
            async with client.stream("GET", "/cut") as streamed:
                assert streamed.status_code == 200
                with pytest.raises(localhttp.TransportError):
                    await streamed.aread()

    run(main())


def test_a_connection_closed_before_any_answer_is_a_transport_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base) as client:
            with pytest.raises(localhttp.ProtocolError):
                await client.get("/nothing")

    run(main())


def test_connection_refused_is_a_connect_error() -> None:
    holder = socket.socket()  # bound, never listening: connecting to it is refused, and nobody else gets the port
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]

    async def main() -> None:
        async with AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=Timeout(5.0, connect=2.0)) as client:
            with pytest.raises(localhttp.ConnectError) as refused:
                await client.get("/v1/ping")
            assert f"127.0.0.1:{port}" in str(refused.value)

    try:
        run(main())
    finally:
        holder.close()


def test_an_answer_that_never_comes_is_a_read_timeout_for_requests_and_for_stream_heads() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await release.wait()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base, timeout=Timeout(0.2, connect=2.0)) as client:
            with pytest.raises(localhttp.ReadTimeout) as late:
                await client.get("/slow")
            assert isinstance(late.value, localhttp.TransportError) and "0.2 s" in str(late.value)
            with pytest.raises(localhttp.TimeoutException):
                async with client.stream("GET", "/slow"):
                    raise AssertionError("no head was ever sent")
            release.set()

    run(main())


def test_a_stream_body_has_no_deadline_once_the_head_arrived() -> None:
    more = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await more.wait()  # held past the client's total timeout, released by the client itself
        writer.write(b"5\r\nlast\n\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base, timeout=Timeout(0.1, connect=2.0)) as client, \
                client.stream("GET", "/follow") as streamed:
            got = []
            async for line in streamed.aiter_lines():
                got.append(line)
                if line == "first":
                    # Not synchronisation: wall time must pass beyond the 0.1 s total before the rest is sent.
                    await asyncio.sleep(0.3)
                    more.set()
            assert got == ["first", "last"]

    run(main())


def test_proxy_variables_are_never_consulted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # would refuse every request
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" if line.startswith("GET /direct ") else
                     b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base) as client:
            answer = await client.get("/direct")
            assert answer.status_code == 204 and answer.content == b""

    run(main())


def test_a_header_value_with_a_newline_is_refused_before_a_byte_is_sent() -> None:
    received: list[bytes] = []
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())  # until the client closes
        ended.set()

    async def main() -> None:
        async with serve(handler) as base, AsyncClient(base_url=base) as client:
            with pytest.raises(ValueError, match="cannot send GET /x"):
                await client.get("/x", headers={"Authorization": "Bearer a\r\nX-Injected: 1"})
            await ended.wait()  # the server saw the connection end (run() bounds the wait)

    run(main())
    assert received == [b""]


def test_tls_urls_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="plain http://"):
        AsyncClient(base_url="https://127.0.0.1:3000")
    client = AsyncClient(base_url="http://127.0.0.1:3000")
    with pytest.raises(ValueError, match="plain http://"):
        run(client.get("https://example.com/"))


# ---------------------------------------------------------------------------
# The scripted transport tests use instead of a socket
# ---------------------------------------------------------------------------


def test_a_scripted_transport_sees_each_request_and_its_answers_read_like_real_ones() -> None:
    seen: list[Request] = []

    async def later(request: Request) -> Response:
        seen.append(request)
        if request.path == "/boom":
            raise localhttp.ConnectError("scripted refusal", request)
        if request.path == "/stream":
            async def lines() -> AsyncIterator[bytes]:
                yield b'{"n": 1}\n{"n"'
                yield b': 2}\n'
            return Response(200, stream=lines())
        return Response(404, text="no such route")

    async def main() -> None:
        async with AsyncClient(base_url="http://127.0.0.1:3000", transport=later,
                               headers={"AUTHORIZATION": "Bearer client-default"}) as client:
            missing = await client.get("/nope", params={"q": "1"}, headers={"Authorization": "Bearer t"})
            assert (missing.status_code, missing.is_success, missing.text) == (404, False, "no such route")
            assert missing.headers["content-type"].startswith("text/plain")
            with pytest.raises(localhttp.TransportError):
                await client.post("/boom", content=b"\x00\x01")
            async with client.stream("GET", "/stream") as streamed:
                assert [json.loads(line)["n"] async for line in streamed.aiter_lines()] == [1, 2]
            whole = await client.get("/stream")
            assert whole.content == b'{"n": 1}\n{"n": 2}\n'

    run(main())
    assert (seen[0].method, seen[0].path, seen[0].params, seen[0].headers["authorization"]) == (
        "GET", "/nope", {"q": "1"}, "Bearer t")
    assert seen[1].content == b"\x00\x01" and seen[1].headers["content-length"] == "2"
    assert Response(200, json={"a": [1]}).json() == {"a": [1]}


# ---------------------------------------------------------------------------
# PID 1 carries no TLS stack
# ---------------------------------------------------------------------------

# `ssl` itself is absent from this list on purpose: `-X importtime` also prints a line for an import that
# sys.modules["ssl"] = None refused.  A real `import ssl` loads the `_ssl` extension first (Lib/ssl.py), so
# no `_ssl` line (and no _ssl/libssl mapped into the process) means ssl never loaded.
NEVER_IN_PID1 = ("_ssl", "httpx", "httpcore", "anyio", "certifi")


def imported_top_level(stderr: list[str]) -> set[str]:
    """Top-level package names from ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    names = set()
    for line in stderr:
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


@pytest.mark.pid1
def test_pid1_runs_to_ready_without_importing_ssl_or_httpx(tmp_path: Path) -> None:
    # CPython 3.11 Lib/asyncio/base_events.py (and sslproto.py, selector_events.py) does
    # `try: import ssl` / `except ImportError: ssl = None`: startup.run makes that import fail.
    env = base_env(tmp_path)
    command = [sys.executable, "-X", "importtime", "-m", "entrypoint"]
    with Running(env, pid1=True, command=command) as running:
        running.wait_event("entrypoint.ready", timeout=60)
        running.wait_event("module_logs.following", timeout=30)  # the streaming call is open too
        maps = Path(f"/proc/{running.inner_pid}/maps").read_text()
        running.stop()
    imported = imported_top_level(running.stderr)
    assert {"asyncio", "h11", "entrypoint"} <= imported, sorted(imported)  # importtime did report
    assert not imported & set(NEVER_IN_PID1), sorted(imported & set(NEVER_IN_PID1))
    assert "/_ssl." not in maps and "libssl.so" not in maps, [line for line in maps.splitlines() if "ssl" in line]
    # Nor OpenSSL's libcrypto through hashlib's `_hashlib` (startup.run refuses it too: built-in sha256 instead).
    assert "/_hashlib." not in maps and "libcrypto" not in maps, [ln for ln in maps.splitlines() if "crypto" in ln]
