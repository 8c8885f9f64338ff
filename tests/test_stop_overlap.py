"""Adversarial tests for the overlapped stop (issue 15): SpacetimeDB's SIGINT at Caddy's "shutdown complete".

The supervisor lets SpacetimeDB's stop begin once Caddy has said it serves
nothing any more instead of after Caddy's exit.  These tests try what could go
wrong with that: a second signal while both exits overlap, the stop budget when
Caddy is slow after its line, the line coming from the wrong child or the wrong
field, a Caddy restarted after a run that said it, a stop before Caddy is
ready, a fatal error's stop, and (with the real Caddy and the stand-in) a
request still in flight through Caddy when SIGTERM arrives.  Last, what made
a stop never end while these were run: a cancellation swallowed by PID 1's
loopback HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from entrypoint.errors import EXIT_CONFIG, Fatal
from entrypoint.supervision.status import STOPPED
from entrypoint.supervision.supervisor import STOP_MARGIN
from entrypoint.web import caddy
from tests.harness import Running, base_env, wait_for
from tests.supervision.fakes import (
    CADDY_DONE,
    CADDY_READY,
    LISTENING,
    Run,
    World,
    history,
    play,
    ready_caddy,
    run_virtual,
    serving_spacetime,
    settings_for,
    stop_at,
    stop_signals,
)


def test_a_second_signal_during_the_overlap_kills_both_children_at_once(tmp_path: Path) -> None:
    # Caddy said it is done but its process hangs; SpacetimeDB ignores its SIGINT: both are stopping at once
    # when the second signal comes, and both must be SIGKILLed then, not one after the other's grace.
    caddy_run = ready_caddy(stop_takes=None, stop_lines=[(0.1, CADDY_DONE)])
    code, world, _ = play(tmp_path, [serving_spacetime(stop_takes=None)], [caddy_run],
                           stops=((1.0, signal.SIGTERM), (2.0, signal.SIGINT)), stop_timeout=120.0)
    assert code == 0
    assert stop_signals(world) == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.1))]
    kills = {name: t for t, name, what, _ in world.journal if what == "sigkill"}
    assert kills == {"caddy": pytest.approx(2.0), "spacetimedb": pytest.approx(2.0)}
    assert world.status.stop_seconds == pytest.approx(1.0)


def test_a_caddy_slow_to_exit_after_its_line_keeps_the_whole_stop_within_the_budget(tmp_path: Path) -> None:
    # Caddy logs "shutdown complete" at once and then never exits (killed at its grace); SpacetimeDB ignores
    # SIGINT.  SpacetimeDB's grace is its own, capped by what is left of POGLY_STOP_TIMEOUT at Caddy's line, and
    # the whole stop ends within the budget (minus our own margin), not at Caddy's grace plus SpacetimeDB's.
    caddy_run = ready_caddy(stop_takes=None, stop_lines=[(0.1, CADDY_DONE)])
    code, world, _ = play(tmp_path, [serving_spacetime(stop_takes=None)], [caddy_run],
                           stops=((1.0, signal.SIGTERM),), stop_timeout=6.0)
    assert code == 0
    caddy_grace = caddy.stop_grace(world.settings)
    [(_, spacetime_stop)] = history(world.journal, "stop_signal", "spacetimedb")
    grace = min(world.spacetime.grace(), 6.0 - STOP_MARGIN - 0.1)  # its own grace, capped by what is left
    assert spacetime_stop["grace"] == pytest.approx(grace)
    kills = {name: t for t, name, what, _ in world.journal if what == "sigkill"}
    assert kills == {"caddy": pytest.approx(1.0 + caddy_grace), "spacetimedb": pytest.approx(1.1 + grace)}
    assert world.status.stop_seconds == pytest.approx(0.1 + grace) and 0.1 + grace <= 6.0 - STOP_MARGIN
    assert world.spacetime.info.state == world.caddy.info.state == STOPPED


def test_a_late_line_leaves_spacetimedb_only_what_is_left_of_the_budget(tmp_path: Path) -> None:
    caddy_run = ready_caddy(stop_takes=2.2, stop_lines=[(2.0, CADDY_DONE)])
    code, world, _ = play(tmp_path, [serving_spacetime(stop_takes=None)], [caddy_run],
                           stops=((1.0, signal.SIGTERM),), stop_timeout=6.0)
    assert code == 0
    [(at, spacetime_stop)] = history(world.journal, "stop_signal", "spacetimedb")
    assert at == pytest.approx(3.0) and spacetime_stop["grace"] == pytest.approx(6.0 - STOP_MARGIN - 2.0)
    assert world.status.stop_seconds == pytest.approx(6.0 - STOP_MARGIN)


def test_spacetimedb_exiting_first_still_waits_for_caddy_before_the_stop_is_over(tmp_path: Path) -> None:
    caddy_run = ready_caddy(stop_takes=1.0, stop_lines=[(0.05, CADDY_DONE)])
    code, world, logs = play(tmp_path, [serving_spacetime(stop_takes=0.1)], [caddy_run],
                              stops=((1.0, signal.SIGTERM),))
    assert code == 0
    exits = [(name, t) for t, name, what, _ in world.journal if what == "exited"]
    assert exits == [("spacetimedb", pytest.approx(1.15)), ("caddy", pytest.approx(2.0))]
    assert world.status.stop_seconds == pytest.approx(1.0)
    assert {e["child"] for e in logs if e["event"] == "child.stopped"} == {"caddy", "spacetimedb"}


@pytest.mark.parametrize("line", [
    '{"level":"info","msg":"handled request","request":{"uri":"/shutdown complete"}}',  # a field, not its msg
    '{"level":"error","msg":"unclean shutdown","exit_code":1}',  # Caddy's line when stopping failed
    "shutdown completed",
])
def test_only_caddys_own_done_message_releases_spacetimedb(tmp_path: Path, line: str) -> None:
    caddy_run = ready_caddy(stop_takes=0.3, stop_lines=[(0.1, line)])
    code, world, _ = play(tmp_path, [serving_spacetime()], [caddy_run], stops=((1.0, signal.SIGTERM),))
    assert code == 0
    assert stop_signals(world) == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.3))]


def test_a_spacetimedb_line_saying_shutdown_complete_releases_nothing(tmp_path: Path) -> None:
    spacetime = Run(lines=[(0.0, LISTENING), (0.5, '{"msg":"shutdown complete"}'), (0.6, "shutdown complete")],
                    serving_at=0.0)
    code, world, _ = play(tmp_path, [spacetime], [ready_caddy(stop_takes=0.3)], stops=((1.0, signal.SIGTERM),))
    assert code == 0
    assert not world.caddy.done_serving.is_set()
    assert stop_signals(world) == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.3))]


def test_a_restarted_caddy_is_waited_for_although_its_previous_run_said_it_was_done(tmp_path: Path) -> None:
    # Run 1 logs "shutdown complete" and exits 0 by itself (e.g. someone sent it SIGTERM); run 2 is a new
    # server: the line of the run before must not let SpacetimeDB stop while run 2 still drains.
    first = Run(lines=[(0.01, CADDY_READY), (0.5, CADDY_DONE)], exit_at=0.51)
    second = ready_caddy(stop_takes=0.3)
    code, world, _ = play(tmp_path, [serving_spacetime()], [first, second], stops=((3.0, signal.SIGTERM),))
    assert code == 0
    assert len(world.caddy_runs.children) == 2
    assert stop_signals(world) == [("caddy", 3.0), ("spacetimedb", pytest.approx(3.3))]


def test_a_stop_before_caddy_is_ready_overlaps_too_and_restarts_nothing(tmp_path: Path) -> None:
    not_yet = Run(lines=[(5.0, CADDY_READY)], stop_takes=0.4, stop_lines=[(0.05, CADDY_DONE)])
    code, world, _ = play(tmp_path, [serving_spacetime(stop_takes=0.1)], [not_yet], stops=((1.0, signal.SIGTERM),))
    assert code == 0
    assert stop_signals(world) == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.05))]
    assert len(world.caddy_runs.children) == len(world.spacetime_runs.children) == 1
    assert world.status.stop_seconds == pytest.approx(0.4)


def test_a_fatal_errors_stop_overlaps_the_same_way_and_keeps_its_exit_code(tmp_path: Path) -> None:
    # What an OIDC provider answering wrongly does (exit 78): main ends with a Fatal, then the same stop.
    async def wrong_provider() -> None:
        await asyncio.sleep(2.0)
        raise Fatal(EXIT_CONFIG, "the provider answers wrongly", event="oidc.invalid")

    caddy_run = ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])
    code, world, logs = play(tmp_path, [serving_spacetime(stop_takes=0.5)], [caddy_run],
                              jobs={"oidc": wrong_provider})
    assert code == EXIT_CONFIG
    assert stop_signals(world) == [("caddy", 2.0), ("spacetimedb", pytest.approx(2.1))]
    assert [e["child"] for e in logs if e["event"] == "child.stopped"] == ["caddy", "spacetimedb"]
    assert world.spacetime.info.state == world.caddy.info.state == STOPPED


# -- the real Caddy and the stand-in ----------------------------------------------------------------------------


def _recv_until(sock: socket.socket, marker: bytes, buffer: bytearray, timeout: float) -> bytes:
    """Read until ``marker`` is in what was received; everything received so far."""
    sock.settimeout(timeout)
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; received {bytes(buffer)!r}")
        buffer += chunk
    return bytes(buffer)


def _final_response(sock: socket.socket, buffer: bytearray, timeout: float) -> tuple[int, bytes]:
    """The first non-1xx response on ``sock``: its status and body (Content-Length framed)."""
    while True:
        data = _recv_until(sock, b"\r\n\r\n", buffer, timeout)
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200:
            buffer[:] = rest
            continue
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        length = int(headers.get(b"content-length", b"0"))
        body = bytearray(rest)
        sock.settimeout(timeout)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, bytes(body)


@pytest.mark.pid1
def test_a_request_in_flight_through_caddy_at_sigterm_still_gets_spacetimedbs_answer(tmp_path: Path) -> None:
    """No stand-in switch makes a request slow, so the client makes it slow: half a SQL body before SIGTERM.

    Caddy has the request (it answered ``100 Continue`` and is streaming the
    body to SpacetimeDB) when SIGTERM arrives; the rest of the body is sent
    only once Caddy logs that its servers are shutting down.  SpacetimeDB must
    still be there to answer it: a 200 with the query's result, not a 502.
    """
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    query = b"SELECT * FROM Config"
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", 60)
        with socket.create_connection(("127.0.0.1", int(env["POGLY_HTTP_PORT"])), timeout=10) as sock:
            sock.sendall(b"POST /v1/database/pogly/sql HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
                         b"Expect: 100-continue\r\nContent-Length: " + str(len(query)).encode() + b"\r\n\r\n")
            buffer = bytearray()
            _recv_until(sock, b" 100 ", buffer, 10)  # Caddy is handling it: reading the body for SpacetimeDB
            buffer.clear()
            sock.sendall(query[:6])
            run.signal(signal.SIGTERM)
            wait_for(lambda: run.find(lambda e: e.get("service") == "caddy" and e.get("event") == "child.output"
                                      and "servers shutting down" in str(e.get("message"))),
                     20, "Caddy's servers shutting down")
            sock.sendall(query[6:])
            status, body = _final_response(sock, buffer, 20)
        assert run.wait(40) == 0
    assert status == 200, (status, body)
    assert isinstance(json.loads(body), list)
    order = [(e.get("event"), e.get("service"), e.get("child"), e.get("message")) for e in run.events]
    done = next(i for i, (what, service, _, message) in enumerate(order)
                if what == "child.output" and service == "caddy" and message == "shutdown complete")
    spacetime_stop = next(i for i, (what, _, child, _) in enumerate(order)
                          if what == "child.stopping" and child == "spacetimedb")
    assert done < spacetime_stop


# -- a stop must end: cancellation of PID 1's loopback HTTP calls ------------------------------------------------


def test_a_stop_that_lands_as_a_loopback_connection_opens_still_cancels_the_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen as a hang of the real program: SIGTERM ~2 ms after ``entrypoint.ready``, both children stopped,
    then ``module_logs.following`` logged *after* the signal and the follower kept reconnecting, so the task
    group never ended and PID 1 never exited (tests/test_break_render_cache.py, intermittently).

    The stop cancels every job; a job inside ``localhttp`` whose connection
    completes in the same loop turn as the cancellation must still end
    cancelled.  CPython 3.11's ``asyncio.wait_for`` returns the inner result
    and drops the cancellation in exactly that case (fixed in 3.12 by
    reimplementing it on ``asyncio.timeout``); ``localhttp`` uses it for the
    connect.  Reproduced deterministically: the connect completes and the
    caller is cancelled at the same moment.
    """
    from entrypoint import localhttp

    async def main() -> tuple[bool, bool]:
        answered = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            answered.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        real_open = asyncio.open_connection
        caller: list[asyncio.Task[Any]] = []

        async def open_and_be_stopped(*args: Any, **kwargs: Any) -> Any:
            streams = await real_open(*args, **kwargs)
            caller[0].cancel()  # the stop arrives as the connection is made
            return streams

        monkeypatch.setattr(asyncio, "open_connection", open_and_be_stopped)

        async def one_request() -> None:
            async with localhttp.AsyncClient(f"http://127.0.0.1:{port}", timeout=5.0) as client:
                await client.get("/v1/ping")

        task = asyncio.ensure_future(one_request())
        caller.append(task)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        server.close()
        return task.cancelled(), answered.is_set()

    cancelled, answered = asyncio.run(main())
    assert cancelled, f"the stop's cancellation was swallowed: the request went on (server answered: {answered})"


def test_spacetimedbs_stop_signal_leaves_inside_the_step_that_reads_caddys_last_line(tmp_path: Path) -> None:
    # No task hop between Caddy's "shutdown complete" and SpacetimeDB's SIGINT (issue 15): by the time the
    # callback that relays the line returns, the signal has been sent.  Under load every hop was a wake-up
    # the scheduler could delay by milliseconds.
    seen: list[list[str]] = []

    async def main() -> World:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
        relay = world.caddy.on_line

        def spy(stream: str, fields: dict[str, Any]) -> None:
            relay(stream, fields)
            if fields.get("message") == "shutdown complete":
                seen.append([name for name, _ in stop_signals(world)])

        world.caddy.on_line = spy  # type: ignore[method-assign]
        supervisor = world.supervisor()
        stop_at(1.0, supervisor, signal.SIGTERM)
        assert await supervisor.run() == 0
        return world

    world = run_virtual(main)
    assert seen == [["caddy", "spacetimedb"]]
    assert stop_signals(world) == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.1))]


def test_caddys_stop_signal_leaves_before_the_cancelled_jobs_clean_up(tmp_path: Path) -> None:
    # The signal's step cancels every job; their clean-up (closing servers and connections) runs in the
    # steps after.  Caddy's SIGTERM must not queue behind all of that: it leaves in the first step after.
    seen: list[list[str]] = []
    world_box: list[World] = []

    async def job() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append([name for name, _ in stop_signals(world_box[0])])
            raise

    async def main() -> World:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
        world_box.append(world)
        supervisor = world.supervisor()
        stop_at(1.0, supervisor, signal.SIGTERM)
        assert await supervisor.run(jobs={"a": job, "b": job}) == 0
        return world

    run_virtual(main)
    assert seen == [["caddy"], ["caddy"]]


def test_a_stop_that_raises_inside_the_chain_is_not_lost(tmp_path: Path) -> None:
    # SpacetimeDB's stop begins inside Caddy's line callback; an exception there would be swallowed by the
    # loop's callback handler and the stop would wait forever.  It must surface from run() instead.
    async def main() -> None:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])

        def broken(grace: float, force: asyncio.Event) -> asyncio.Future[None]:
            raise RuntimeError("stop broke")

        world.spacetime.begin_stop = broken  # type: ignore[method-assign]
        supervisor = world.supervisor()
        stop_at(1.0, supervisor, signal.SIGTERM)
        with pytest.raises(RuntimeError, match="stop broke"):
            await supervisor.run()

    run_virtual(main)


def test_caddys_stop_signal_leaves_inside_the_signal_handlers_own_step(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    async def main() -> None:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
        supervisor = world.supervisor()

        def handler() -> None:  # what loop.add_signal_handler calls
            supervisor.request_stop(signal.SIGTERM)
            seen.append([name for name, _ in stop_signals(world)])

        asyncio.get_running_loop().call_later(1.0, handler)
        assert await supervisor.run() == 0

    run_virtual(main)
    assert seen == [["caddy"]]
