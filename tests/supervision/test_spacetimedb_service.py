"""SpacetimeDB's and Caddy's own rules on scripted children: a held lock is waited out; Caddy's exit 1 is final."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from entrypoint.supervision.status import READY
from tests.supervision.fakes import (
    CADDY_READY,
    Run,
    World,
    history,
    ready_caddy,
    run_virtual,
    serving_spacetime,
    settings_for,
    stop_at,
)

HOLDER = 4_194_305  # above Linux's PID_MAX_LIMIT: never a live process, so never taken for our own leftover
LOCK_ERROR = f"Error: spacetime.pid already exists (owned by pid Some({HOLDER}))"
HELD = Run(lines=[(0.02, LOCK_ERROR)], exit_at=0.03, code=1)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_a_held_lock_is_waited_out_with_growing_pauses_and_is_no_death(tmp_path: Path) -> None:
    async def main() -> tuple[World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [HELD, HELD, HELD, serving_spacetime()], [ready_caddy()])
        with capture_logs() as logs:
            task = asyncio.create_task(world.spacetime.supervise())
            await world.spacetime.first_ready.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return world, logs

    world, logs = run_virtual(main)
    launches = [t for t, _ in history(world.journal, "launched")]
    pauses = [b - a - 0.03 for a, b in itertools.pairwise(launches)]  # each held run lives 0.03 s
    assert len(launches) == 4
    for pause, (low, high) in zip(pauses, [(0.2, 0.25), (0.4, 0.5), (0.8, 1.0)], strict=True):
        assert low - 1e-9 <= pause <= high + 1e-9, pauses
    held = events(logs, "spacetime.lock_held")
    assert [e["holder_pid"] for e in held] == [HOLDER] * 3
    assert events(logs, "child.exited") == []  # not deaths: the crash-loop count is untouched
    assert (world.spacetime.info.state, world.spacetime.info.restarts) == (READY, 0)


def test_a_lock_held_past_the_wait_is_fatal_69_naming_the_holder(tmp_path: Path) -> None:
    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path, lock_wait=2.0), [HELD], [ready_caddy()])
        with capture_logs() as logs:
            code = await world.supervisor().run()
        return code, world, logs

    code, world, logs = run_virtual(main)
    assert code == 69
    [timeout] = events(logs, "spacetime.lock_timeout")
    assert timeout["holder_pid"] == HOLDER and "Do NOT delete" in timeout["message"]
    assert len(events(logs, "spacetime.lock_held")) >= 3
    assert max(t for t, _ in history(world.journal, "launched", "spacetimedb")) < 2.0
    assert history(world.journal, "stop_signal", "caddy")  # the fatal error stopped the other child


def test_caddy_exit_1_before_ready_is_final(tmp_path: Path) -> None:
    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()],
                            [Run(lines=[(0.0, '{"level":"error","msg":"loading config: bad"}')], exit_at=0.05, code=1)])
        with capture_logs() as logs:
            code = await world.supervisor().run()
        return code, world, logs

    code, world, logs = run_virtual(main)
    assert code == 1
    assert len(world.caddy_runs.children) == 1  # never restarted
    [failed] = events(logs, "caddy.startup_failed")
    assert "loading config: bad" in failed["message"]
    assert not [e for e in events(logs, "child.exited") if e["child"] == "caddy"]
    assert history(world.journal, "stop_signal", "spacetimedb")


def test_caddy_exit_1_after_ready_is_an_ordinary_death(tmp_path: Path) -> None:
    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()],
                            [Run(lines=[(0.01, CADDY_READY)], exit_at=5.0, code=1), ready_caddy()])
        supervisor = world.supervisor()
        stop_at(10.0, supervisor)
        with capture_logs() as logs:
            code = await supervisor.run()
        return code, world, logs

    code, world, logs = run_virtual(main)
    assert code == 0
    assert len(world.caddy_runs.children) == 2
    [exited] = [e for e in events(logs, "child.exited") if e["child"] == "caddy"]
    assert exited["was_ready"] and exited["exit"] == "exit code 1"
