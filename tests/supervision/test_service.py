"""One service's loop on scripted children and virtual time: deaths, pauses, verdicts, timeouts.

Each test scripts what every launch of the child does and reads back the
history (launch times, log events) on the virtual clock: the times asserted
are exact, and no test waits in real time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from entrypoint.supervision.process import Reaper
from entrypoint.supervision.status import READY, Status
from entrypoint.supervision.supervisor import Supervisor
from tests.supervision.fakes import Journal, Run, Scripted, Toy, exact_policy, history, run_virtual, settings_for

READY_LINE = (0.01, "toy is ready")


def toy(tmp: Path, runs: list[Run], journal: Journal, **settings: Any) -> tuple[Toy, Scripted]:
    launcher = Scripted(runs, journal)
    service = Toy(settings_for(tmp, **settings), Status(), Reaper(), clock=asyncio.get_running_loop().time,
                  launch=launcher, policy=exact_policy())
    return service, launcher


async def until_ready_then_cancel(service: Toy) -> None:
    """Supervise until the first ready run, then cancel the loop: what a stop does to it."""
    task = asyncio.create_task(service.supervise())
    await service.first_ready.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_a_death_before_ready_is_restarted_after_the_first_pause(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> tuple[Toy, list[dict[str, Any]]]:
        service, _ = toy(tmp_path, [Run(exit_at=0.05, code=3), Run(lines=[READY_LINE])], journal)
        with capture_logs() as logs:
            await until_ready_then_cancel(service)
        return service, logs

    service, logs = run_virtual(main)
    assert [t for t, _ in history(journal, "launched")] == pytest.approx([0.0, 0.15])  # died at 0.05, paused 0.1
    [exited] = events(logs, "child.exited")
    assert (exited["exit"], exited["was_ready"], exited["restart_in_s"], exited["restarts"]) == \
        ("exit code 3", False, 0.1, 1)
    [ready] = events(logs, "child.ready")
    assert ready["startup_ms"] == pytest.approx(10.0)  # measured on the injected clock, from the second launch
    assert (service.info.state, service.info.restarts, service.generation) == (READY, 1, 1)


def test_a_program_that_cannot_be_executed_counts_as_exit_127(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> list[dict[str, Any]]:
        service, _ = toy(tmp_path, [Run(spawn_error=True), Run(lines=[READY_LINE])], journal)
        with capture_logs() as logs:
            await until_ready_then_cancel(service)
        return logs

    logs = run_virtual(main)
    assert events(logs, "child.spawn_failed")[0]["argv0"] == "/usr/bin/toy"
    assert events(logs, "child.exited")[0]["exit"] == "exit code 127"
    assert [t for t, _ in history(journal, "launched")] == pytest.approx([0.1])


def test_a_run_healthy_for_a_minute_starts_the_backoff_over(tmp_path: Path) -> None:
    """The policy compares the death time with the launch time, both from the injected clock."""
    journal: Journal = []
    runs = [Run(lines=[READY_LINE], exit_at=0.5, code=1), Run(lines=[READY_LINE], exit_at=61.0, code=1),
            Run(lines=[READY_LINE], exit_at=0.5, code=1), Run(lines=[READY_LINE])]

    async def main() -> list[dict[str, Any]]:
        service, launcher = toy(tmp_path, runs, journal)
        with capture_logs() as logs:
            task = asyncio.create_task(service.supervise())
            while len(launcher.children) < 4:
                await service.ready_after(service.generation)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return logs

    logs = run_virtual(main)
    # 0.1 after a short run, 0.1 again after a run of 61 s (reset), then 0.2 after the next short one.
    assert [e["restart_in_s"] for e in events(logs, "child.exited")] == [0.1, 0.1, 0.2]
    assert all(e["was_ready"] for e in events(logs, "child.exited"))


@pytest.mark.parametrize(("code", "exit_code", "described"), [(3, 3, "exit code 3"), (-11, 139, "killed by SIGSEGV")])
def test_five_deaths_within_two_minutes_end_everything_with_the_childs_code(
        tmp_path: Path, code: int, exit_code: int, described: str) -> None:
    journal: Journal = []

    async def main() -> tuple[int, list[dict[str, Any]], Scripted]:
        crasher, launcher = toy(tmp_path, [Run(lines=[(0.0, "about to fail")], exit_at=0.01, code=code)], journal)
        with capture_logs() as logs:
            result = await Supervisor(Status(), [crasher], Reaper(), stop_timeout=25.0,
                                      clock=asyncio.get_running_loop().time).run()
        return result, logs, launcher

    result, logs, launcher = run_virtual(main)
    assert result == exit_code
    assert len(launcher.children) == 5
    assert [e["restart_in_s"] for e in events(logs, "child.exited")] == [0.1, 0.2, 0.4, 0.8]
    [verdict] = events(logs, "child.crash_loop")
    assert verdict["exit_code"] == exit_code
    assert described in verdict["message"] and "about to fail" in verdict["message"]


def test_no_readiness_within_the_start_timeout_is_fatal_69_and_the_child_is_stopped(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> tuple[int, list[dict[str, Any]]]:
        stuck, _ = toy(tmp_path, [Run(lines=[(0.0, "warming up")])], journal, start_timeout=5.0)
        with capture_logs() as logs:
            result = await Supervisor(Status(), [stuck], Reaper(), stop_timeout=25.0,
                                      clock=asyncio.get_running_loop().time).run()
        return result, logs

    result, logs = run_virtual(main)
    assert result == 69
    assert "warming up" in events(logs, "child.ready_timeout")[0]["message"]
    assert [t for t, _ in history(journal, "stop_signal")] == pytest.approx([5.0])
