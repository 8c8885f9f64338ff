"""The supervisor on scripted children and virtual time: readiness, the stop, its order, graces and escalation.

The services are the real ``SpacetimeService`` and ``CaddyService`` (minus
Caddy's file work); only their children are fakes.  Signals are delivered the
way the loop's signal handler delivers them: ``request_stop`` at a chosen
virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from entrypoint.supervision.status import STOPPED
from entrypoint.supervision.supervisor import STOP_MARGIN
from entrypoint.web import caddy
from tests.supervision.fakes import (
    CADDY_DONE,
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


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_ready_is_announced_once_every_service_and_every_condition_is(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()], [ready_caddy()])
        supervisor = world.supervisor()
        published = asyncio.Event()
        asyncio.get_running_loop().call_at(2.0, published.set)
        stop_at(3.0, supervisor)
        with capture_logs() as logs:
            await supervisor.run(ready_when=[published], ready_fields=lambda: {"modules": ["pogly"]})
        return logs

    [ready] = events(run_virtual(main), "entrypoint.ready")
    assert ready["ready_ms"] == pytest.approx(2000.0) and ready["modules"] == ["pogly"]


def test_started_but_not_ready_is_never_logged_as_ready(tmp_path: Path) -> None:
    # E.g. a refused module update: every child runs and every step finished, yet /readyz answers 503.
    async def main() -> tuple[World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()], [ready_caddy()])
        world.status.module("pogly").publish_result = "failed: update rejected"
        supervisor = world.supervisor()
        stop_at(3.0, supervisor)
        with capture_logs() as logs:
            await supervisor.run(ready_fields=lambda: {"modules": ["pogly"]})
        return world, logs

    world, logs = run_virtual(main)
    assert not events(logs, "entrypoint.ready")
    [up] = events(logs, "entrypoint.up_not_ready")
    assert up["log_level"] == "warning" and up["not_ready"] == ["module pogly: update failed: update rejected"]
    assert world.status.ready_seconds is not None  # start-up did finish (pogly_start_seconds)


def test_stop_is_caddy_then_spacetimedb_each_within_its_grace_and_all_within_the_budget(tmp_path: Path) -> None:
    # Caddy ignores SIGTERM: killed at its grace; SpacetimeDB gets what is left of POGLY_STOP_TIMEOUT.
    code, world, logs = play(tmp_path, [serving_spacetime(stop_takes=0.5)], [ready_caddy(stop_takes=None)],
                             stops=((1.0, signal.SIGTERM),), stop_timeout=6.0)
    assert code == 0
    caddy_grace = caddy.stop_grace(world.settings)  # 40 % of 6 s
    stops = [(name, t, d["signal"], d["grace"], d["observed"]["shutting_down"])
             for t, name, what, d in world.journal if what == "stop_signal"]
    budget_left = 6.0 - STOP_MARGIN - caddy_grace
    assert stops == [
        ("caddy", 1.0, signal.SIGTERM, caddy_grace, True),  # /readyz already answers 503
        ("spacetimedb", pytest.approx(1.0 + caddy_grace), signal.SIGINT, pytest.approx(budget_left), True),
    ]
    assert [t for t, _ in history(world.journal, "sigkill", "caddy")] == [pytest.approx(1.0 + caddy_grace)]
    assert [t for t, _ in history(world.journal, "exited", "spacetimedb")] == [pytest.approx(1.5 + caddy_grace)]
    stopped = {e["child"]: e for e in events(logs, "child.stopped")}
    assert stopped["caddy"]["killed"] and stopped["caddy"]["exit"] == "killed by SIGKILL"
    assert not stopped["spacetimedb"]["killed"] and stopped["spacetimedb"]["stop_ms"] == pytest.approx(500.0)
    assert world.spacetime.info.state == world.caddy.info.state == STOPPED


def test_spacetimedb_stop_begins_when_caddy_says_it_serves_nothing_not_when_its_process_is_gone(
        tmp_path: Path) -> None:
    # Caddy logs "shutdown complete" once its servers have drained, then takes a while longer to exit: SpacetimeDB's
    # SIGINT goes out at that line, so the two exits overlap and nothing Caddy proxies is cut.
    caddy_run = ready_caddy(stop_takes=0.3, stop_lines=[(0.1, CADDY_DONE)])
    code, world, logs = play(tmp_path, [serving_spacetime(stop_takes=0.5)], [caddy_run],
                             stops=((1.0, signal.SIGTERM),), stop_timeout=6.0)
    assert code == 0
    stops = stop_signals(world)
    assert stops == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.1))]
    exits = [(name, t) for t, name, what, _ in world.journal if what == "exited"]
    assert exits == [("caddy", pytest.approx(1.3)), ("spacetimedb", pytest.approx(1.6))]
    assert {e["child"]: e["stop_ms"] for e in events(logs, "child.stopped")} == {
        "caddy": pytest.approx(300.0), "spacetimedb": pytest.approx(500.0)}
    assert world.status.stop_seconds == pytest.approx(0.6)


def test_a_caddy_that_never_says_it_is_done_is_waited_for_until_it_exits(tmp_path: Path) -> None:
    # Without the line (another log format, an older Caddy), the order is the plain sequence: exit, then SIGINT.
    code, world, _ = play(tmp_path, [serving_spacetime()], [ready_caddy(stop_takes=0.3)],
                          stops=((1.0, signal.SIGTERM),))
    assert code == 0
    stops = stop_signals(world)
    assert stops == [("caddy", 1.0), ("spacetimedb", pytest.approx(1.3))]


def test_a_second_signal_kills_at_once_instead_of_waiting_out_the_grace(tmp_path: Path) -> None:
    code, world, logs = play(tmp_path, [serving_spacetime(stop_takes=None)], [ready_caddy()],
                             stops=((1.0, signal.SIGTERM), (3.0, signal.SIGINT)), stop_timeout=120.0)
    assert code == 0
    [(_, first)] = history(world.journal, "stop_signal", "spacetimedb")
    assert first["grace"] == pytest.approx(119.0)
    assert [t for t, _ in history(world.journal, "sigkill", "spacetimedb")] == [pytest.approx(3.0)]
    assert "second signal" in events(logs, "signal.received")[1]["action"]


def test_nothing_restarts_once_the_stop_began(tmp_path: Path) -> None:
    # SpacetimeDB dies by itself while Caddy is still draining: it must stay dead.
    code, world, logs = play(tmp_path, [serving_spacetime(exit_at=1.5)], [ready_caddy(stop_takes=1.0)],
                             stops=((1.0, signal.SIGTERM),))
    assert code == 0
    assert (len(world.spacetime_runs.children), len(world.caddy_runs.children)) == (1, 1)
    assert events(logs, "child.exited") == []
    assert history(world.journal, "stop_signal", "spacetimedb") == []  # nothing left to stop


def test_a_stop_during_startup_stops_the_children_that_exist(tmp_path: Path) -> None:
    code, world, _ = play(tmp_path, [Run()], [ready_caddy()], stops=((0.5, signal.SIGTERM),))
    assert code == 0
    assert [name for name, _ in stop_signals(world)] == ["caddy", "spacetimedb"]
    assert (len(world.spacetime_runs.children), len(world.caddy_runs.children)) == (1, 1)


def test_a_signal_caught_before_the_loop_starts_nothing(tmp_path: Path) -> None:
    async def main() -> tuple[int, World]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()], [ready_caddy()])
        supervisor = world.supervisor()
        supervisor.request_stop(signal.SIGTERM)  # replayed from __main__'s early handler
        return await supervisor.run(), world

    code, world = run_virtual(main)
    assert code == 0 and world.journal == []


def test_a_bug_in_a_job_exits_70_and_stops_the_children(tmp_path: Path) -> None:
    async def broken() -> None:
        await asyncio.sleep(1.0)
        raise RuntimeError("a bug")

    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()], [ready_caddy()])
        with capture_logs() as logs:
            code = await world.supervisor().run(jobs={"broken": broken})
        return code, world, logs

    code, world, logs = run_virtual(main)
    assert code == 70
    assert "a bug" in events(logs, "entrypoint.internal_error")[0]["error"]
    assert [(t, name) for t, name, what, _ in world.journal if what == "stop_signal"] == \
        [(1.0, "caddy"), (1.0, "spacetimedb")]


def test_the_stop_budget_counts_from_the_signal_not_from_the_shutdown(tmp_path: Path) -> None:
    # Issue 13, fault 7: a SIGTERM caught at t=0 (e.g. by __main__ while the interpreter was still
    # importing) but handed over at t=1 must still end within POGLY_STOP_TIMEOUT of t=0.
    async def main() -> tuple[int, World]:
        world = World.build(settings_for(tmp_path, stop_timeout=6.0), [serving_spacetime(stop_takes=None)],
                            [ready_caddy(stop_takes=None)])
        supervisor = world.supervisor()
        asyncio.get_running_loop().call_at(1.0, lambda: supervisor.request_stop(signal.SIGTERM, at=0.0))
        return await supervisor.run(), world

    code, world = run_virtual(main)
    assert code == 0
    caddy_grace = caddy.stop_grace(world.settings)
    assert [t for t, _ in history(world.journal, "sigkill", "caddy")] == [pytest.approx(1.0 + caddy_grace)]
    # SpacetimeDB ignores SIGINT here: killed when the budget counted from t=0 (not t=1) runs out.
    assert [t for t, _ in history(world.journal, "sigkill", "spacetimedb")] == [pytest.approx(6.0 - STOP_MARGIN)]


def test_a_job_that_swallows_its_cancellation_cannot_keep_pid1_alive_past_the_budget(tmp_path: Path) -> None:
    async def stubborn() -> None:  # the bug this guards against: a cancellation dropped (3.11 wait_for did)
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path, stop_timeout=6.0), [serving_spacetime()], [ready_caddy()])
        supervisor = world.supervisor()
        stop_at(1.0, supervisor)
        with capture_logs() as logs:
            code = await supervisor.run(jobs={"stubborn": stubborn})
        return code, world, logs

    code, world, logs = run_virtual(main)
    [stuck] = events(logs, "entrypoint.stop_stuck")
    assert "stubborn" in stuck["tasks"] and code == 70  # a bug: never "stopped on request"
    assert world.spacetime.info.state == world.caddy.info.state == STOPPED
    assert stuck["waited_s"] <= 6.0
