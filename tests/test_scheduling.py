"""PID 1's short time slice (``supervision/scheduling.py``): ours only, never the children's.

Real processes and the real kernel: what is checked is ``/proc/<pid>/sched``'s
``se.slice``, the value the scheduler uses.  The slice field exists for
``SCHED_OTHER`` since Linux 6.12; on an older kernel the call must change
nothing and say so (None), which the same assertions cover.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.supervision.scheduling import SLICE_NS
from tests.harness import Running, base_env, wait_for


def kernel_has_custom_slices() -> bool:
    major, minor, *_ = (int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    return (major, minor) >= (6, 12)


def sched_slice(pid: int | str) -> int | None:
    for line in Path(f"/proc/{pid}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


PROBE = """
import json, subprocess, sys
from entrypoint.supervision.scheduling import prefer_prompt_wakeups
def slice_of(pid):
    for line in open(f"/proc/{pid}/sched"):
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
before = slice_of("self")
got = prefer_prompt_wakeups()
child = subprocess.run([sys.executable, "-c", "print(open('/proc/self/sched').read())"],
                       capture_output=True, text=True).stdout
child_slice = next((int(l.split(":")[1]) for l in child.splitlines() if l.startswith("se.slice")), None)
print(json.dumps({"got": got, "before": before, "after": slice_of("self"), "child": child_slice}))
"""


def probe(prefix: list[str]) -> dict[str, int | None]:
    out = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    return json.loads(out.stdout)


def test_plain_process_gets_the_short_slice_and_its_children_the_default() -> None:
    result = probe([])
    if kernel_has_custom_slices():
        assert result["got"] == SLICE_NS and result["after"] == SLICE_NS
        assert result["before"] != SLICE_NS
        assert result["child"] == result["before"]  # reset on fork: the kernel's default again
    else:
        assert result["got"] is None
        assert result["after"] == result["before"]


@pytest.mark.parametrize("prefix", [
    ["chrt", "--batch", "0"],  # an operator's choice of policy is left alone
    ["chrt", "--idle", "0"],
    ["nice", "-n", "-2"],  # reset-on-fork would take a negative nice value away from the children
], ids=["batch", "idle", "negative-nice"])
def test_an_operators_policy_or_negative_nice_is_left_alone(prefix: list[str]) -> None:
    if prefix[0] == "nice":
        assert os.geteuid() == 0, "negative nice needs root; the suite runs as root (see README)"
    result = probe(prefix)
    assert result["got"] is None
    assert result["after"] == result["before"] and result["child"] == result["before"]


@pytest.mark.pid1
def test_as_pid1_only_the_entrypoint_has_the_short_slice(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    with Running(env, pid1=True) as run:
        start = run.wait_event("entrypoint.start", timeout=60)
        run.wait_event("entrypoint.ready", timeout=60)
        caddy = run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "caddy")[-1]
        caddy_pid = wait_for(lambda: _host_pid_of(run.inner_pid, caddy["pid"]), what="caddy's host pid")
        if kernel_has_custom_slices():
            assert start["sched_slice_ms"] == SLICE_NS / 1e6
            assert sched_slice(run.inner_pid) == SLICE_NS
            assert sched_slice(caddy_pid) != SLICE_NS
        else:
            assert start["sched_slice_ms"] is None
        run.stop()


def _host_pid_of(inner_pid: int, ns_pid: int) -> int | None:
    """The host PID of the process that is ``ns_pid`` inside ``inner_pid``'s namespace (NSpid in status)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            if os.readlink(f"/proc/{entry.name}/ns/pid") != os.readlink(f"/proc/{inner_pid}/ns/pid"):
                continue
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == str(ns_pid):
                return int(entry.name)
    return None
