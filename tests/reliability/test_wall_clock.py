"""Deadlines and restart decisions ignore the wall clock (supervisor-anchors.md §3 #21; supervisord's
``clock_rollback`` tests).

Why not a real clock jump: moving ``CLOCK_REALTIME`` changes it for the whole host (and every other test
running on it), and time namespaces (``unshare --time``) offset only ``CLOCK_MONOTONIC`` and
``CLOCK_BOOTTIME``, never the wall clock.  So the real program runs with its own ``time.time()`` and
``time.time_ns()`` replaced before anything is imported: every call jumps hours, alternately forwards
and backwards (+1 h, -2 h, +3 h, ...).  Any deadline, backoff or crash-loop window computed from the wall
clock would then never be reached, be reached at once, or never see two deaths within 120 s.  The
children and the ``oidc-check`` helper are separate processes and keep the real clock.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Running, base_env, wait_for
from tests.test_pid1 import script

JUMPING_WALL_CLOCK = """
import itertools, runpy, sys, time
_real, _real_ns, _calls = time.time, time.time_ns, itertools.count(1)
def _offset():
    n = next(_calls)
    return (1 if n % 2 else -1) * 3600 * n
time.time = lambda: _real() + _offset()
time.time_ns = lambda: _real_ns() + _offset() * 1_000_000_000
sys.argv = ["pogly-entrypoint", *sys.argv[1:]]
runpy.run_module("entrypoint", run_name="__main__", alter_sys=True)
"""
COMMAND = [sys.executable, "-c", JUMPING_WALL_CLOCK]


def test_crash_loop_verdict_and_backoff_with_the_wall_clock_jumping_hours(tmp_path: Path) -> None:
    """Five deaths within 120 s of monotonic time are a crash loop (exit with the child's 3), and the
    gaps between restarts still grow: the window and the healthy-run reset use the monotonic clock."""
    crasher = script(tmp_path, "spacetime", "echo 'about to fail'; exit 3\n")
    env = base_env(tmp_path, SPACETIME_BIN=crasher, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, command=COMMAND) as run:
        assert run.wait(60) == 3
    gaps = [e["restart_in_s"] for e in run.find(lambda e: e.get("event") == "child.exited")]
    assert len(gaps) == 4 and gaps[0] <= 0.2
    assert all(b > a for a, b in itertools.pairwise(gaps))
    verdict = run.find(lambda e: e.get("event") == "child.crash_loop")[0]
    assert verdict["exit_code"] == 3


def test_start_timeout_fires_on_time_with_the_wall_clock_jumping_hours(tmp_path: Path) -> None:
    """SpacetimeDB accepts connections but never answers ``/v1/ping``: after POGLY_START_TIMEOUT of
    monotonic time it is exit 69 ``child.ready_timeout``, neither at once nor never."""
    env = base_env(tmp_path, STANDIN_PING_HANG="1", POGLY_START_TIMEOUT="3", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, command=COMMAND) as run:
        run.wait_event("child.started", child="spacetimedb")
        status = wait_for(lambda: _status(env), 20, "/status")
        # The wrapper is in force: the wall-clock time PID 1 recorded at start is hours away from ours.
        assert abs(status["started_at"] - time.time()) >= 3600
        # …while the child's uptime is measured on the monotonic clock: seconds, not hours.
        assert 0 <= status["children"]["spacetimedb"]["uptime_s"] < 60
        assert run.wait(60) == 69
    started = run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "spacetimedb")
    timeout = run.find(lambda e: e.get("event") == "child.ready_timeout")
    assert len(started) == 1 and len(timeout) == 1
    assert timeout[0]["child"] == "spacetimedb" and "POGLY_START_TIMEOUT" in timeout[0]["message"]
    uptime = run.find(lambda e: e.get("event") == "entrypoint.exit")[0]["uptime_s"]
    assert 3.0 <= uptime < 30  # measured on the monotonic clock: the timeout, plus the stop


def _status(env: dict[str, str]) -> dict[str, Any] | None:
    try:
        return httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=2).json()
    except httpx.HTTPError:
        return None
