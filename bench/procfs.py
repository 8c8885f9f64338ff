"""Reading /proc: memory, context switches, start times, the processes of one PID namespace.

The parsers take text and return numbers (tested in tests/test_bench_harness.py);
the readers around them tolerate a process that is gone (``None``), because the
processes measured here come and go while they are read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
STATUS_KB = ("VmRSS", "VmHWM", "VmSize", "RssAnon", "RssFile", "RssShmem")
STATUS_COUNTS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "Threads")


def parse_status(text: str) -> dict[str, int]:
    """``/proc/PID/status`` → the memory fields in kB and the counters we use, as ints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key in STATUS_KB or key in STATUS_COUNTS:
            fields = value.split()
            if fields:
                out[key] = int(fields[0])
    return out


def parse_stat(text: str) -> dict[str, int | str]:
    """``/proc/PID/stat`` → ``comm``, ``state``, ``ppid``, ``starttime`` (clock ticks after boot).

    ``comm`` may contain spaces and parentheses, so the fields are counted from the last ``)``.
    """
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22 → rest[19].
    return {"comm": comm, "state": rest[0], "ppid": int(rest[1]), "starttime": int(rest[19])}


def parse_pss(smaps_rollup: str) -> int | None:
    """``Pss:`` of ``/proc/PID/smaps_rollup`` in kB."""
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def ctxt_total(statuses: Iterable[dict[str, int]]) -> int:
    """Voluntary + involuntary context switches summed over the given tasks (threads)."""
    return sum(s.get("voluntary_ctxt_switches", 0) + s.get("nonvoluntary_ctxt_switches", 0) for s in statuses)


def wakeups_per_s(before: int, after: int, seconds: float) -> float:
    """Context switches per second between two ``ctxt_total`` readings (a process that woke up, then slept)."""
    if seconds <= 0:
        raise ValueError("window must be positive")
    return max(after - before, 0) / seconds


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def status(pid: int) -> dict[str, int] | None:
    text = _read(Path(f"/proc/{pid}/status"))
    return parse_status(text) if text is not None else None


def stat(pid: int) -> dict[str, int | str] | None:
    text = _read(Path(f"/proc/{pid}/stat"))
    return parse_stat(text) if text is not None else None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def task_ctxt(pid: int) -> int | None:
    """Context switches of every thread of ``pid`` (``/proc/PID/status`` alone counts the main thread)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    statuses = []
    for tid in tasks:
        text = _read(Path(f"/proc/{pid}/task/{tid}/status"))
        if text is not None:
            statuses.append(parse_status(text))
    return ctxt_total(statuses)


def pss(pid: int) -> int | None:
    text = _read(Path(f"/proc/{pid}/smaps_rollup"))
    return parse_pss(text) if text is not None else None


def children_of(pid: int) -> list[int]:
    text = _read(Path(f"/proc/{pid}/task/{pid}/children"))
    return [int(p) for p in text.split()] if text else []


def descendants(root: int) -> list[int]:
    """Every process below ``root``, breadth first (bounded: a process tree here has a few dozen)."""
    found: list[int] = []
    frontier = [root]
    while frontier and len(found) < 10_000:
        parent = frontier.pop(0)
        kids = []
        for tid in _tasks(parent):
            kids.extend(int(p) for p in (_read(Path(f"/proc/{parent}/task/{tid}/children")) or "").split())
        found.extend(kids)
        frontier.extend(kids)
    return found


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def boottime() -> float:
    """Seconds since boot on the clock ``starttime`` counts in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def started_at(pid: int) -> float | None:
    """When ``pid`` was forked, in ``boottime()`` seconds (resolution 1/CLK_TCK, 10 ms)."""
    info = stat(pid)
    return int(info["starttime"]) / CLK_TCK if info else None
