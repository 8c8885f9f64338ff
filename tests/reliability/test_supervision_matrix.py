"""The supervision anchors' matrix, as PID 1 (issue 13, item 2; supervisor-anchors.md §3 #1, #4, #5, #12, #15, #22).

Each test runs the real program under ``unshare --pid --fork --mount-proc``
with the real Caddy and the SpacetimeDB stand-in (or a small script in its
place), does something hostile to it from outside, and reads ``/proc`` and
the JSON log.  Waits are on log events and ``/proc`` state, each with a
deadline.  Already covered elsewhere and not repeated here: SIGTERM's order
and SIGINT to SpacetimeDB (tests/test_pid1.py
``test_full_stack_ready_then_sigterm_stops_caddy_first_and_spacetime_with_sigint``), the crash-loop exit
code and its growing gaps (``test_crash_loop_gaps_grow_then_exit_with_the_childs_code``), 128+signal
(``test_child_killed_by_signal_exits_128_plus_signal``), the TERM-ignoring child and the second signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import STANDIN, Running, base_env, processes, wait_for
from tests.test_pid1 import namespace_procs, script, stopped_cleanly

pytestmark = pytest.mark.pid1

ORPHANS = 1000


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            targets.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return targets


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_thousand_orphans_are_reaped_without_spin_or_fd_leak(tmp_path: Path) -> None:
    """A child double-forks 1,000 short-lived grandchildren once the test says so: every one is reaped
    by PID 1, which ends with the descriptors it had and spends a bounded amount of CPU on it."""
    fifo, done = tmp_path / "go", tmp_path / "burst-done"
    os.mkfifo(fifo)
    # The burst runs in a process orphaned at once (double fork), so its own exit is PID 1's to reap
    # too; each `(true &)` leaves one more orphan.  It waits on the FIFO, not on a timer.
    fake = script(tmp_path, "spacetime", f"""
( ( read go < {fifo}
    i=0; while [ $i -lt {ORPHANS} ]; do (true &); i=$((i+1)); done
    touch {done} ) & )
exec {STANDIN} "$@"
""")
    env = base_env(tmp_path, SPACETIME_BIN=fake, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        pid1 = run.inner_pid
        fds_before, cpu_before, targets_before = _fds(pid1), _cpu_s(pid1), _fd_targets(pid1)
        with open(fifo, "w") as go:
            go.write("go\n")
        wait_for(done.exists, 60, "the burst of 1,000 double forks finished")

        def all_reaped() -> bool:
            return not [p for p in namespace_procs(pid1) if p.state == "Z" or p.comm in ("true", "sh")]

        wait_for(all_reaped, 10, "no zombie and no orphan left in the namespace")
        cpu = _cpu_s(pid1) - cpu_before
        try:
            wait_for(lambda: _fds(pid1) <= fds_before, 5, f"PID 1 back to {fds_before} descriptors")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {targets_before} → {_fd_targets(pid1)}") from None
        assert httpx.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}/readyz").status_code == 200
        run.stop()
    exit_event = run.find(lambda e: e.get("event") == "entrypoint.exit")[0]
    assert exit_event["orphans_reaped"] >= ORPHANS + 1  # every `true` and the burst shell itself
    # A correctness bound (a reap loop that spins would burn seconds), not a speed benchmark.
    assert cpu < 2.0, f"PID 1 used {cpu:.2f} s of CPU reaping {ORPHANS} orphans"
    stopped_cleanly(run)


def test_sigint_stops_caddy_then_spacetimedb_and_exits_0(tmp_path: Path) -> None:
    """Ctrl-C (`docker run -it`, `make run`) is a stop request like SIGTERM: same order, exit 0, not 130.

    The order: Caddy first; SpacetimeDB's SIGINT once the real Caddy has logged "shutdown complete" (every
    server drained; caddyserver/caddy caddy.go exitProcess at 0cf03d3), which may be before its process is gone.
    """
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.signal(signal.SIGINT)
        assert run.wait(30) == 0
    received = run.find(lambda e: e.get("event") == "signal.received")
    assert [(e["signal"], e["action"]) for e in received] == [("SIGINT", "stopping")]
    order = [(e["event"], e.get("child", "caddy")) for e in run.find(
        lambda e: e.get("event") in ("child.stopping", "child.stopped")
        or (e.get("service") == "caddy" and e.get("message") == "shutdown complete"))]
    assert order[0] == ("child.stopping", "caddy")
    assert order.index(("child.output", "caddy")) < order.index(("child.stopping", "spacetimedb"))
    assert sorted(order[1:]) == sorted([("child.output", "caddy"), ("child.stopped", "caddy"),
                                        ("child.stopping", "spacetimedb"), ("child.stopped", "spacetimedb")])
    stopping = {e["child"]: e["signal"] for e in run.find(lambda e: e.get("event") == "child.stopping")}
    assert stopping == {"caddy": "SIGTERM", "spacetimedb": "SIGINT"}
    stopped_cleanly(run)


def test_exec_failure_is_127_after_the_crash_loop_and_a_non_executable_bin_is_78(tmp_path: Path) -> None:
    """``SPACETIME_BIN`` that cannot be executed: a plain file is refused before anything starts (78,
    naming the variable); a script whose interpreter is missing passes that check and fails at exec: each
    spawn fails, is counted as a death with the shell's 127, and the crash-loop verdict exits 127."""
    plain = tmp_path / "spacetime-not-executable"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    env = base_env(tmp_path, SPACETIME_BIN=str(plain), OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        assert run.wait(30) == 78
    problem = run.find(lambda e: e.get("event") == "config.invalid")[0]
    assert any(p.startswith("SPACETIME_BIN=") and "executable" in p for p in problem["problems"])
    assert not run.find(lambda e: e.get("event") == "child.started")

    broken = script(tmp_path, "spacetime-bad-interpreter", "")
    Path(broken).write_text("#!/nonexistent/interpreter\n")
    env = base_env(tmp_path, SPACETIME_BIN=broken, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 127
    failed = run.find(lambda e: e.get("event") == "child.spawn_failed")
    assert len(failed) == 5 and all(e["argv0"] == broken and e["fix"] for e in failed)
    verdict = run.find(lambda e: e.get("event") == "child.crash_loop")[0]
    assert verdict["exit_code"] == 127 and verdict["child"] == "spacetimedb"
    assert run.find(lambda e: e.get("event") == "child.stopped" and e["child"] == "caddy")
    assert not run.find(lambda e: e.get("event") == "entrypoint.internal_error")


def _grandchildren(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_grandchild_in_its_own_session_does_not_survive_sigterm(tmp_path: Path) -> None:
    """SpacetimeDB leaves a helper in a session of its own (out of reach of a signal to its group):
    after SIGTERM to PID 1 it is gone, killed by name in the log, not just by the namespace's end."""
    marker = tmp_path / "grandchildren"
    env = base_env(tmp_path, STANDIN_GRANDCHILD=str(marker), OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        wait_for(lambda: _grandchildren(marker), 10, "the grandchild's PID")
        inner = _grandchildren(marker)[0]
        helpers = [p for p in namespace_procs(run.inner_pid) if p.comm == "sleep"]
        assert len(helpers) == 1
        outer = helpers[0].pid
        sid = int(Path(f"/proc/{outer}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert sid == outer  # a session of its own: a signal to SpacetimeDB's group misses it
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0
    assert not Path(f"/proc/{outer}").exists() or Path(f"/proc/{outer}/stat").read_text().split()[2] == "Z"
    swept = run.find(lambda e: e.get("event") == "entrypoint.straggler_killed")
    assert [(e["pid"], e["comm"]) for e in swept] == [(inner, "sleep")]
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    assert stopped["spacetimedb"]["exit"] == "exit code 0" and not stopped["spacetimedb"]["killed"]


def test_grandchild_in_its_own_session_does_not_outlive_the_subreaper(tmp_path: Path) -> None:
    """Not PID 1 but a subreaper: the same helper is re-parented to us when SpacetimeDB exits; after our
    exit it must not be left running (re-parented to the host's init)."""
    marker = tmp_path / "grandchildren"
    env = base_env(tmp_path, STANDIN_GRANDCHILD=str(marker), OIDC_ISSUER="", OIDC_CLIENT_ID="")
    helper = 0
    try:
        with Running(env) as run:
            run.wait_event("entrypoint.ready", timeout=60)
            wait_for(lambda: _grandchildren(marker), 10, "the grandchild's PID")
            helper = _grandchildren(marker)[0]
            run.stop()

        def gone() -> bool:
            try:
                return Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        assert gone(), f"grandchild {helper} outlived the entrypoint"
    finally:
        if helper and any(p.pid == helper and p.comm == "sleep" for p in processes()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)


def _child_pid(run: Running, name: str) -> int:
    return run.find(lambda e: e.get("event") == "child.started" and e.get("child") == name)[-1]["pid"]


def _outer(run: Running, name: str) -> int:
    """The PID in our namespace of child ``name`` (the log gives the one inside PID 1's namespace)."""
    inner = _child_pid(run, name)
    for proc in namespace_procs(run.inner_pid):
        status = Path(f"/proc/{proc.pid}/status").read_text()
        ns_pids = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
        if int(ns_pids[-1]) == inner:
            return proc.pid
    raise AssertionError(f"{name} (pid {inner} inside) not found")


def test_sigstopped_spacetimedb_still_stops_cleanly_within_the_stop_timeout(tmp_path: Path) -> None:
    """SpacetimeDB frozen by SIGSTOP (a debugger, a cgroup freeze, an operator's mistake): SIGTERM to PID 1
    still stops everything within POGLY_STOP_TIMEOUT.  The stop signal is followed by SIGCONT (as
    s6-supervise does), so the frozen server wakes to its SIGINT and flushes instead of being SIGKILLed."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="", POGLY_STOP_TIMEOUT="8")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        stdb = _outer(run, "spacetimedb")
        os.kill(stdb, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{stdb}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 5,
                 "SpacetimeDB stopped")
        # Frozen, it accepts TCP (the kernel's backlog) but answers nothing: what readiness says is recorded.
        ready = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/readyz", timeout=5).status_code
        t0 = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0
        took = time.monotonic() - t0
    assert ready in (200, 503)
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    assert stopped["spacetimedb"]["exit"] == "exit code 0" and not stopped["spacetimedb"]["killed"]
    assert run.find(lambda e: e.get("service") == "spacetimedb" and "Shutting down server" in e.get("message", ""))
    assert took < 8
    stopped_cleanly(run)


def test_sigstopped_caddy_still_stops_within_its_grace(tmp_path: Path) -> None:
    """Caddy frozen by SIGSTOP: SIGTERM (then SIGCONT) wakes it to its own graceful stop; SpacetimeDB is
    not delayed beyond Caddy's grace, and the whole stop is within POGLY_STOP_TIMEOUT."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="", POGLY_STOP_TIMEOUT="8")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        caddy = _outer(run, "caddy")
        os.kill(caddy, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{caddy}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 5,
                 "Caddy stopped")
        t0 = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0
        took = time.monotonic() - t0
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    grace = run.find(lambda e: e.get("event") == "child.stopping" and e["child"] == "caddy")[0]["grace_s"]
    assert stopped["caddy"]["stop_ms"] / 1000 <= grace + 1.0
    assert stopped["caddy"]["exit"] == "exit code 0" and not stopped["caddy"]["killed"]
    assert stopped["spacetimedb"]["exit"] == "exit code 0" and not stopped["spacetimedb"]["killed"]
    assert took < 8
    stopped_cleanly(run)


def test_stop_wakes_a_frozen_child_so_it_handles_its_stop_signal() -> None:
    """In process, a real child: SIGSTOPped, then ``Child.stop`` → its own SIGINT handler runs (exit 7)
    at once; before SIGCONT followed the stop signal it was SIGKILLed at the end of its grace."""
    import asyncio

    from entrypoint.supervision.process import Child, ChildSpec, Reaper

    async def main() -> tuple[int, bool, float]:
        reaper = Reaper()
        loop = asyncio.get_running_loop()
        reaper.install(loop)
        armed = asyncio.Event()
        child = Child(ChildSpec("t", ["/bin/sh", "-c", "trap 'exit 7' INT; echo armed; while :; do sleep 0.05; done"],
                                dict(os.environ), signal.SIGINT, 30), reaper, lambda s, raw, t: armed.set())
        child.start()
        await asyncio.wait_for(armed.wait(), 10)
        assert child.pid is not None
        os.killpg(child.pid, signal.SIGSTOP)
        t0 = loop.time()
        code, killed = await child.stop(30)
        reaper.uninstall()
        return code, killed, loop.time() - t0

    code, killed, took = asyncio.run(main())
    assert (code, killed) == (7, False)
    assert took < 25  # not the 30 s grace


def test_crash_loop_of_a_child_exiting_0_is_not_exit_0(tmp_path: Path) -> None:
    """SpacetimeDB exits 0 at once, every time (a wrapper script that returns early): five deaths in 120 s
    are a crash loop, and the container must not then report success (0 = stopped on request), or Docker's
    ``restart: on-failure`` and a Job's ``restartPolicy: OnFailure`` never restart it (s6-overlay#183)."""
    quitter = script(tmp_path, "spacetime", "exit 0\n")
    env = base_env(tmp_path, SPACETIME_BIN=quitter, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        code = run.wait(60)
    assert run.find(lambda e: e.get("event") == "child.crash_loop")
    assert code == 1


def test_frozen_spacetimedb_turns_readyz_503(tmp_path: Path) -> None:
    """SpacetimeDB SIGSTOPped in steady state: it accepts connections (the kernel's backlog) and answers
    nothing, so Kubernetes must stop routing to the pod: ``/readyz`` has to turn 503 within 10 s."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        stdb = _outer(run, "spacetimedb")
        os.kill(stdb, signal.SIGSTOP)
        readyz = f"http://{env['POGLY_HEALTH_ADDR']}/readyz"
        wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 503, 10, "/readyz 503 for a frozen SpacetimeDB")
        assert "spacetimedb: not answering /v1/ping" in " ".join(httpx.get(readyz, timeout=5).json()["not_ready"])
        os.kill(stdb, signal.SIGCONT)
        wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 200, 10, "/readyz 200 once it answers again")
        assert run.find(lambda e: e.get("event") == "spacetime.not_answering")
        wait_for(lambda: run.find(lambda e: e.get("event") == "spacetime.answering_again"), 5, "answering_again")
