"""Trying to break the synchronous stop chain (Caddy's SIGTERM in the signal's own step, SpacetimeDB's SIGINT
inside the step that reads Caddy's last line).

The stop is decided in the signal's step.  A service loop whose wake-up was already queued when the signal's
callback ran (a child that just exited or became ready, a restart pause that just ended) would take one more
step before the task group's cancellation reaches it, a step later: launch a child nobody stops, or write
"backoff"/"ready" over "stopping".  The supervisor therefore cancels the service loops in the signal's step
(found by these tests; each failed before that).  Most tests here put the signal in the same loop iteration
as such a wake-up (a timer ``EPS`` after another one: virtual time only moves when the loop is idle, and
timers within the clock's resolution fire together, in order) and look at what is left.  Also: the chain
only moves on from a stop that began, so a failure stopping Caddy must not skip SpacetimeDB's stop; and a
stop signal is sent once per run, so a pause's stop half-way must still yield to the second signal.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from pathlib import Path
from typing import Any

from entrypoint.supervision.process import ChildHandle
from entrypoint.supervision.service import Outcome
from entrypoint.supervision.status import STOPPED, STOPPING
from tests.supervision.fakes import (
    CADDY_DONE,
    Run,
    World,
    ready_caddy,
    run_virtual,
    serving_spacetime,
    settings_for,
    stop_signals,
)

EPS = 1e-10  # below the loop's clock resolution (1e-9): due in the same iteration, and after the other timer


def _stop_right_after_caddys_backoff(world: World, supervisor_box: list) -> None:
    """Deliver SIGTERM in the iteration in which Caddy's restart pause ends (the signal's callback after it)."""
    loop = asyncio.get_running_loop()
    policy_pause = world.caddy.pause_after

    async def pause_after(outcome: Outcome) -> float:
        delay = await policy_pause(outcome)
        # asyncio.sleep(delay) follows at this very time: its timer is due at now + delay.
        loop.call_at(loop.time() + delay + EPS, supervisor_box[0].request_stop, signal.SIGTERM)
        return delay

    world.caddy.pause_after = pause_after  # type: ignore[method-assign]


def test_a_caddy_restarted_in_the_signals_iteration_is_stopped_too(tmp_path: Path) -> None:
    # Caddy died and waits out its restart pause; SIGTERM is handled in the loop iteration in which that pause
    # ends.  Caddy's stop is decided in the signal's step (no child: nothing to stop), but its supervise task,
    # woken by the pause's timer before the signal's callback ran, takes one more step before the
    # cancellation reaches it, and launches a new Caddy.  Nobody stops that one: run() returns with it still
    # running (as PID 1 it would be SIGKILLed as a straggler; otherwise it outlives us).  Before the change the
    # shutdown began a step later and stopped whatever child existed by then.
    async def main() -> World:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(exit_at=1.0, code=1),
                             ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
        supervisor = world.supervisor()
        _stop_right_after_caddys_backoff(world, [supervisor])
        assert await supervisor.run() == 0
        return world

    world = run_virtual(main)
    left = [(c.spec.name, c.pid) for c in world.caddy_runs.children + world.spacetime_runs.children if c.running]
    assert left == [], f"children still running after run() returned (never sent a stop signal): {left}"


def test_a_caddy_that_died_as_the_stop_came_reads_stopped_not_backoff(tmp_path: Path) -> None:
    # Caddy exits by itself, and SIGTERM is handled in the same iteration, after the exit woke Caddy's supervise
    # task.  The stop (decided in the signal's step) marks Caddy "stopped"; the supervise task's step that
    # follows reads the exit as a death and writes "backoff" over it (a restart counted, "restart_in_s" logged),
    # and nothing sets it back: /status says caddy is backing off for the whole rest of the shutdown and after.
    # Before the change the shutdown's stop came after that step and left "stopped".
    async def main() -> World:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(exit_at=1.0, code=1)])
        supervisor = world.supervisor()
        # Caddy's exit timer is due at 1.0 (launched at 0.0); the signal's callback runs just after it.
        asyncio.get_running_loop().call_at(1.0 + EPS, supervisor.request_stop, signal.SIGTERM)
        assert await supervisor.run() == 0
        return world

    world = run_virtual(main)
    assert [c.code for c in world.caddy_runs.children] == [1]
    assert world.status.children["caddy"].state == STOPPED
    assert world.status.children["spacetimedb"].state == STOPPED


def test_a_failure_stopping_caddy_still_stops_spacetimedb(tmp_path: Path) -> None:
    # The chain begins the next child's stop only from the previous one's callbacks.  When Caddy's stop signal
    # cannot be sent (killpg raises anything but ProcessLookupError, e.g. EPERM), begin_next keeps the error
    # for run() to raise, but SpacetimeDB's stop never begins: no SIGINT, so no commit-log flush; it is left to
    # die with PID 1.  Before the change a failing Caddy stop was one task among the stops and SpacetimeDB's
    # stop followed all the same.
    async def main() -> tuple[World, BaseException | None]:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])

        def refused() -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        def break_caddys_signal() -> None:
            assert world.caddy.child is not None
            world.caddy.child.send_stop_signal = refused  # type: ignore[method-assign]

        supervisor = world.supervisor()
        loop = asyncio.get_running_loop()
        loop.call_at(0.5, break_caddys_signal)
        loop.call_at(1.0, supervisor.request_stop, signal.SIGTERM)
        error: BaseException | None = None
        try:
            await supervisor.run()
        except PermissionError as exc:
            error = exc
        return world, error

    world, error = run_virtual(main)
    assert isinstance(error, PermissionError)  # surfaced, as the existing chain test wants
    stopped = [name for name, _ in stop_signals(world)]
    assert "spacetimedb" in stopped, "SpacetimeDB never got its SIGINT because Caddy's stop signal failed"
    assert not any(c.running for c in world.spacetime_runs.children)


def test_caddy_never_reads_ready_while_it_is_being_stopped(tmp_path: Path) -> None:
    # The signal lands in each of the first few loop iterations after Caddy's readiness is known (its
    # wait_ready returned; the news still travels through asyncio.wait to the supervise task).  In one of them
    # the supervise task's wake-up is already queued ahead of the main task's cancellation: the stop has set
    # "stopping" and sent SIGTERM, then the supervise step sets "ready" (and logs child.ready, bumps the
    # generation) over it; /status says caddy is ready for the whole of its stop.  Before the change the stop
    # began a step later, after that step.
    def states_seen_while_stopping(hops: int) -> list[str]:
        seen: list[str] = []

        async def main() -> None:
            world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                                [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
            supervisor = world.supervisor()
            loop = asyncio.get_running_loop()
            known = world.caddy.wait_ready

            def signal_after(left: int) -> None:
                if left == 0:
                    supervisor.request_stop(signal.SIGTERM)
                else:
                    loop.call_soon(signal_after, left - 1)

            async def wait_ready(child: ChildHandle) -> None:
                await known(child)
                loop.call_soon(signal_after, hops)

            world.caddy.wait_ready = wait_ready  # type: ignore[method-assign]
            relay = world.caddy.on_line

            def spy(stream: str, fields: dict[str, Any]) -> None:
                if fields.get("message") == "shutdown complete":  # Caddy is half-way through its stop
                    seen.append(world.status.children["caddy"].state)
                relay(stream, fields)

            world.caddy.on_line = spy  # type: ignore[method-assign]
            assert await supervisor.run() == 0

        run_virtual(main)
        return seen

    seen = {hops: states_seen_while_stopping(hops) for hops in range(6)}
    assert all(states == [STOPPING] for states in seen.values()), f"caddy's state during its stop: {seen}"


def test_a_run_that_was_never_launched_is_stopped_at_once_and_the_chain_moves_on(tmp_path: Path) -> None:
    # Caddy cannot be executed (spawn fails, backing off) when the stop comes: its stop is an already-done
    # future; SpacetimeDB's SIGINT must still follow and the stop end.
    async def main() -> World:
        world = World.build(settings_for(tmp_path), [serving_spacetime(stop_takes=0.2)],
                            [Run(spawn_error=True)])
        supervisor = world.supervisor()
        asyncio.get_running_loop().call_at(0.05, supervisor.request_stop, signal.SIGTERM)
        assert await supervisor.run() == 0
        return world

    world = run_virtual(main)
    assert [name for name, _ in stop_signals(world)] == ["spacetimedb"]
    assert world.status.children["caddy"].state == STOPPED
    assert world.status.children["spacetimedb"].state == STOPPED


def test_a_pause_half_way_when_the_stop_comes_still_yields_to_the_second_signal(tmp_path: Path) -> None:
    # A backup's pause has sent SpacetimeDB its SIGINT (once per run: the shutdown's stop sends nothing more)
    # and SpacetimeDB hangs in its flush.  The shutdown's stop of that same run must still honour the second
    # signal (SIGKILL at once), not wait out the pause's own, unforceable, grace.
    async def main() -> tuple[World, list[str]]:
        world = World.build(settings_for(tmp_path, stop_timeout=120.0), [serving_spacetime(stop_takes=None)],
                            [ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])])
        supervisor = world.supervisor()
        loop = asyncio.get_running_loop()
        pauses: list[asyncio.Future[str]] = []
        loop.call_at(0.5, lambda: pauses.append(asyncio.ensure_future(world.spacetime.pause("backup"))))
        loop.call_at(1.0, supervisor.request_stop, signal.SIGTERM)
        loop.call_at(2.0, supervisor.request_stop, signal.SIGINT)
        assert await supervisor.run() == 0
        return world, [await pause for pause in pauses]

    world, paused = run_virtual(main)
    assert paused == ["killed by SIGKILL"]
    assert [(name, t) for t, name, what, _ in world.journal if what in ("stop_signal", "sigkill")] == [
        ("spacetimedb", 0.5), ("caddy", 1.0), ("spacetimedb", 2.0)]
    assert world.status.children["spacetimedb"].state == STOPPED
