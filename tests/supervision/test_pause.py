"""Pausing a child on purpose (for a consistent backup), on scripted children and virtual time.

A pause stops the ready run the way a shutdown does and holds the slot: no
restart, no crash counted, ``/readyz`` says why; ``resume()`` starts the next
run as an ordinary launch.  The control channel (``entrypoint/control.py``)
grants a pause as a lease on its connection: a closed connection or the
maximum pause time starts the child again.  The channel runs here on a real
unix socket, on the same virtual clock (a five-minute expiry costs nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from entrypoint import control
from entrypoint.supervision.process import Reaper
from entrypoint.supervision.service import PauseRefused
from entrypoint.supervision.status import PAUSED, READY, STOPPED, Status
from entrypoint.supervision.supervisor import Supervisor
from tests.supervision.fakes import (
    Journal,
    Run,
    Scripted,
    Toy,
    World,
    exact_policy,
    history,
    ready_caddy,
    run_virtual,
    serving_spacetime,
    settings_for,
)

READY_LINE = (0.01, "toy is ready")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


class Pausable(Toy):
    """``Toy``, ready on its line whether the log carries a child's text as ``message`` or as ``event``."""

    def on_line(self, stream: str, fields: dict[str, Any]) -> None:
        if "toy is ready" in (fields.get("message"), fields.get("event")):
            self._ready.set()


def toy(tmp: Path, journal: Journal, runs: list[Run] | None = None) -> Toy:
    launcher = Scripted(runs or [Run(lines=[READY_LINE], stop_takes=0.3)], journal)
    return Pausable(settings_for(tmp), Status(), Reaper(), clock=asyncio.get_running_loop().time, launch=launcher,
               policy=exact_policy())


def test_a_paused_child_is_stopped_with_its_signal_held_and_started_again_on_resume(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> tuple[Toy, list[dict[str, Any]], list[str]]:
        service = toy(tmp_path, journal)
        states = []
        with capture_logs() as logs:
            task = asyncio.create_task(service.supervise())
            await service.first_ready.wait()
            stopped = await service.pause("backup")
            assert stopped == "exit code 0"
            states.append(service.info.state)
            await asyncio.sleep(1000.0)  # held: nothing is launched however long the pause lasts
            states.append(service.info.describe())  # what /readyz says about it
            generation = service.generation
            assert service.resume("resume")
            await service.ready_after(generation)
            states.append(service.info.state)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return service, logs, states

    service, logs, states = run_virtual(main)
    assert states == [PAUSED, "paused for backup", READY]
    launched = [t for t, _ in history(journal, "launched")]
    assert launched == pytest.approx([0.0, 1000.31])  # once at start, once right after the resume
    [stop] = history(journal, "stop_signal")
    assert stop[1]["signal"] == signal.SIGTERM and stop[1]["grace"] == service.grace()
    assert service.info.restarts == 0 and service.generation == 2
    assert events(logs, "child.exited") == []  # a pause is not a death
    [paused] = events(logs, "child.paused")
    assert (paused["reason"], paused["exit"], paused["killed"]) == ("backup", "exit code 0", False)


def test_a_resume_before_the_loop_saw_the_exit_is_still_no_death(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> tuple[Toy, list[dict[str, Any]]]:
        service = toy(tmp_path, journal, [Run(lines=[READY_LINE], stop_takes=0.0)])
        with capture_logs() as logs:
            task = asyncio.create_task(service.supervise())
            await service.first_ready.wait()
            generation = service.generation
            await service.pause("backup")
            service.resume()  # no await in between: the loop has not run since the exit
            await service.ready_after(generation)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return service, logs

    service, logs = run_virtual(main)
    assert events(logs, "child.exited") == [] and service.info.restarts == 0
    assert len(history(journal, "launched")) == 2


def test_only_a_ready_child_is_paused_and_only_once(tmp_path: Path) -> None:
    journal: Journal = []

    async def main() -> list[str]:
        service = toy(tmp_path, journal, [Run(lines=[(5.0, "toy is ready")])])
        refusals = []
        task = asyncio.create_task(service.supervise())
        await asyncio.sleep(1.0)  # starting, not ready
        with pytest.raises(PauseRefused) as starting:
            await service.pause("backup")
        refusals.append(str(starting.value))
        await service.first_ready.wait()
        await service.pause("backup")
        with pytest.raises(PauseRefused) as twice:
            await service.pause("other")
        refusals.append(str(twice.value))
        service.resume()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return refusals

    refusals = run_virtual(main)
    assert "starting" in refusals[0]
    assert "already paused for backup" in refusals[1]


def test_a_stop_during_a_pause_stops_everything_normally(tmp_path: Path) -> None:
    async def main() -> tuple[int, World, list[dict[str, Any]]]:
        world = World.build(settings_for(tmp_path), [serving_spacetime()], [ready_caddy()])
        world.status.oidc = "disabled"
        supervisor = world.supervisor()
        readyz: list[list[str]] = []

        async def pause_then_stop() -> None:
            await world.spacetime.first_ready.wait()
            await world.caddy.first_ready.wait()
            await world.spacetime.pause("backup")
            readyz.append(world.status.not_ready())
            await asyncio.sleep(10.0)
            supervisor.request_stop(signal.SIGTERM)

        with capture_logs() as logs:
            helper = asyncio.create_task(pause_then_stop())
            code = await supervisor.run()
            await helper
        assert readyz == [["spacetimedb: paused for backup"]]
        return code, world, logs

    code, world, logs = run_virtual(main)
    assert code == 0
    assert len(world.spacetime_runs.children) == 1  # never started again
    assert world.status.children["spacetimedb"].state == STOPPED
    assert [d["signal"] for _, d in history(world.journal, "stop_signal", "spacetimedb")] == [signal.SIGINT]
    assert events(logs, "child.exited") == []


# --------------------------------------------------------------------------- the control channel


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pogly-ctl-") as tmp:
        yield Path(tmp)


class Session:
    """One client connection to the control socket, on the test's loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Session:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def ask(self, **request: Any) -> dict[str, Any]:
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        return json.loads(await self.reader.readline())

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def serving_world(tmp: Path, run_dir: Path) -> tuple[World, asyncio.Task[int], Supervisor, Path]:
    world = World.build(settings_for(tmp), [serving_spacetime()], [ready_caddy()])
    world.status.oidc = "disabled"
    supervisor = world.supervisor()
    path = control.socket_path(run_dir)
    server = control.ControlServer(path, world.status, {"spacetimedb": world.spacetime})
    task = asyncio.create_task(supervisor.run(jobs={"control": server.serve}))
    await world.spacetime.first_ready.wait()
    await world.caddy.first_ready.wait()
    while not path.exists():
        await asyncio.sleep(0.01)
    return world, task, supervisor, path


async def stop(supervisor: Supervisor, task: asyncio.Task[int]) -> int:
    supervisor.request_stop(signal.SIGTERM)
    return await task


def test_the_lease_ends_when_its_connection_closes(tmp_path: Path, run_dir: Path) -> None:
    async def main() -> tuple[World, list[Any], list[dict[str, Any]]]:
        seen: list[Any] = []
        with capture_logs() as logs:
            world, task, supervisor, path = await serving_world(tmp_path, run_dir)
            seen.append(stat.S_IMODE(os.stat(path).st_mode))
            client = await Session.open(path)
            seen.append((await client.ask(op="hello"))["services"])
            answer = await client.ask(op="pause", service="spacetimedb", reason="backup")
            seen.append((answer["ok"], answer["paused"], answer["stopped"]))
            other = await Session.open(path)
            seen.append((await other.ask(op="pause", service="spacetimedb", reason="backup"))["reason"])
            await other.close()
            generation = world.spacetime.generation
            await client.close()  # the backup was killed: its lease ends with the connection
            await world.spacetime.ready_after(generation)
            seen.append(world.status.not_ready())
            seen.append(await stop(supervisor, task))
            seen.append(path.exists())  # removed on exit
        return world, seen, logs

    world, seen, logs = run_virtual(main)
    assert seen == [0o600, ["spacetimedb"], (True, True, "exit code 0"), "busy", [], 0, False]
    assert [e["why"] for e in events(logs, "control.lease_released")] == ["connection closed"]
    assert len(world.spacetime_runs.children) == 2 and world.spacetime.info.restarts == 0


def test_a_pause_past_its_maximum_expires_and_the_resume_says_so(tmp_path: Path, run_dir: Path) -> None:
    async def main() -> tuple[list[Any], list[dict[str, Any]]]:
        seen: list[Any] = []
        with capture_logs() as logs:
            world, task, supervisor, path = await serving_world(tmp_path, run_dir)
            client = await Session.open(path)
            await client.ask(op="pause", service="spacetimedb", reason="backup", max_s=300)
            generation = world.spacetime.generation
            await world.spacetime.ready_after(generation)  # at +300 s, without the client
            seen.append(world.status.not_ready())
            answer = await client.ask(op="resume")
            seen.append((answer["ok"], answer["expired"]))
            await client.close()
            seen.append(await stop(supervisor, task))
        return seen, logs

    seen, logs = run_virtual(main)
    assert seen == [[], (True, True), 0]
    [expired] = events(logs, "control.pause_expired")
    assert expired["max_pause_s"] == 300


def test_bad_requests_get_an_answer_that_says_what_is_accepted(tmp_path: Path, run_dir: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        world, task, supervisor, path = await serving_world(tmp_path, run_dir)
        client = await Session.open(path)
        answers = [await client.ask(op="dance"),
                   await client.ask(op="pause", service="caddy", reason="backup"),
                   await client.ask(op="pause", service="spacetimedb", reason="backup", max_s=99999),
                   await client.ask(op="resume")]
        client.writer.write(b"not json\n")
        answers.append(json.loads(await client.reader.readline()))
        await client.close()
        await stop(supervisor, task)
        assert world.status.children["spacetimedb"].state == STOPPED
        return answers

    answers = run_virtual(main)
    assert [a["reason"] for a in answers] == ["bad_request", "bad_request", "bad_request", "not_paused", "bad_request"]
    assert "hello, status, pause, resume" in answers[0]["error"]
    assert "['spacetimedb']" in answers[1]["error"]


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(tmp_path: Path, run_dir: Path) -> None:
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control.socket_path(run_dir)))
    stale.close()  # the file stays, nobody listens: what a killed supervisor leaves

    async def main() -> list[Any]:
        seen: list[Any] = []
        with capture_logs() as logs:
            _world, task, supervisor, path = await serving_world(tmp_path, run_dir)
            client = await Session.open(path)
            seen.append((await client.ask(op="hello"))["ok"])
            second = control.ControlServer(path, Status(), {})
            await second.serve()  # returns at once: the live one keeps the socket
            seen.append((await client.ask(op="hello"))["ok"])
            await client.close()
            await stop(supervisor, task)
        seen.append([e["event"] for e in logs if e["event"].startswith("control.")])
        return seen

    assert run_virtual(main) == [True, True, ["control.listening", "control.in_use"]]


def test_the_client_says_when_no_supervisor_answers(run_dir: Path) -> None:
    with pytest.raises(control.ControlError) as missing:
        control.ControlClient.connect(run_dir)
    assert missing.value.reason == "unavailable"
    assert str(control.socket_path(run_dir)) in missing.value.message and "does not exist" in missing.value.message
