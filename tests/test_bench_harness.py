"""The bench's pure parts: /proc parsing, medians and ratios, targets, tables.  No timing is asserted."""

from __future__ import annotations

import os

from bench import imports, procfs, report

STATUS = """Name:\tpython3
State:\tS (sleeping)
Pid:\t1
PPid:\t0
VmHWM:\t   38912 kB
VmRSS:\t   36520 kB
RssAnon:\t   20000 kB
Threads:\t2
voluntary_ctxt_switches:\t120
nonvoluntary_ctxt_switches:\t7
"""


def test_parse_status_reads_memory_and_context_switches() -> None:
    st = procfs.parse_status(STATUS)
    assert st["VmRSS"] == 36520 and st["VmHWM"] == 38912 and st["Threads"] == 2
    assert procfs.ctxt_total([st, {"voluntary_ctxt_switches": 3, "nonvoluntary_ctxt_switches": 0}]) == 130
    assert procfs.wakeups_per_s(100, 125, 10.0) == 2.5
    assert procfs.wakeups_per_s(100, 90, 10.0) == 0  # a counter never goes back; a reused PID would


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    fields = " ".join(str(n) for n in range(4, 30))  # fields 4.. (ppid is field 4, starttime field 22)
    info = procfs.parse_stat(f"42 (a (weird) name) S {fields}")
    assert info["comm"] == "a (weird) name" and info["state"] == "S"
    assert info["ppid"] == 4 and info["starttime"] == 22


def test_reading_this_process() -> None:
    me = procfs.status(os.getpid())
    assert me is not None and me["VmRSS"] > 0
    assert procfs.task_ctxt(os.getpid()) is not None
    assert procfs.started_at(os.getpid()) is not None
    assert procfs.status(2**22 + 1) is None  # gone (or never was): None, not an error
    assert procfs.parse_pss("Rss: 10 kB\nPss:  7 kB\n") == 7


def test_medians_ratios_and_the_summary_table() -> None:
    runs = {
        "floor": [{"ready_first_ms": 100.0, "wakeups_unclaimed": 0.0, "exit_code": 0, "writes_lost": 0},
                  {"ready_first_ms": 120.0, "wakeups_unclaimed": 0.0, "exit_code": 0, "writes_lost": 0},
                  {"ready_first_ms": 110.0, "wakeups_unclaimed": 0.0, "exit_code": 0, "writes_lost": 0}],
        "pogly": [{"ready_first_ms": 200.0, "wakeups_unclaimed": 2.0, "exit_code": 0, "writes_lost": 0},
                  {"ready_first_ms": 240.0, "wakeups_unclaimed": 3.0, "exit_code": 0, "writes_lost": 0},
                  {"ready_first_ms": None, "wakeups_unclaimed": 2.5, "exit_code": 0, "writes_lost": 0}],
    }
    meds = report.medians(runs)
    assert meds["floor"]["ready_first_ms"] == 110.0
    assert meds["pogly"]["ready_first_ms"] == 220.0  # the run that never got ready is left out
    assert report.ratio(220.0, 110.0) == 2.0
    assert report.ratio(2.5, 0.0) is None and report.ratio(None, 1.0) is None
    table = report.summary_table(runs, {"floor": "bash floor", "pogly": "pogly-entrypoint"})
    lines = table.splitlines()
    assert lines[0] == "| metric | bash floor | pogly-entrypoint |"
    ready = next(line for line in lines if line.startswith("| ready, first boot |"))
    assert ready == "| ready, first boot | 110 ms | 220 ms (2.00×) |"
    wake = next(line for line in lines if line.startswith("| PID 1 wake-ups, idle (unclaimed)"))
    assert wake.endswith("| 0.0/s | 2.5/s |")  # no ratio to a floor of 0
    assert "| exit code on SIGTERM | 0, 0, 0 | 0, 0, 0 |" in lines


def test_targets_say_met_or_missed_and_by_how_much() -> None:
    runs = {"floor": [{"ready_first_ms": 100.0, "ready_restart_ms": 100.0, "stop_ms": 80.0}],
            "pogly": [{"ready_first_ms": 330.0, "ready_restart_ms": 140.0, "stop_ms": 86.0, "writes_lost": 0,
                       "idle_rss_mb": 38.5, "wakeups_claimed": 0.0, "wakeups_unclaimed": 3.0,
                       "kill_over_child_ms": 320.0, "relay_lines_per_s": 80_000.0, "relay_peak_rss_mb": 40.0,
                       "boot_peak_rss_mb": 39.0}]}
    targets = {t.name: t for t in report.evaluate_targets(report.medians(runs), runs)}
    assert targets["ready, first boot"].met is False and "1.30× over" in targets["ready, first boot"].by
    assert targets["ready, restart"].met is True
    assert targets["idle RSS of PID 1"].met is False and targets["idle RSS of PID 1"].by == "8.50 MB over"
    assert targets["wake-ups once claimed"].met is True
    assert targets["wake-ups while unclaimed"].met is False
    assert targets["stop"].met is True
    assert targets["acknowledged writes lost on stop"].met is True
    assert targets["log relay (no line lost)"].met is True
    table = report.targets_table(list(targets.values()))
    assert "| idle RSS of PID 1 | 38.5 MB | ≤ 30 MB | **missed** (8.50 MB over) |" in table.splitlines()


def test_targets_not_measured_are_said_so() -> None:
    targets = report.evaluate_targets({"floor": {}, "pogly": {}}, {"floor": [], "pogly": []})
    assert all(t.met is None for t in targets)


def test_importtime_lines_and_groups() -> None:
    lines = ["import time: self [us] | cumulative | imported package",
             "import time:       120 |        120 |     _asyncio",
             "import time:      2000 |       2120 |   asyncio.events",
             "import time:       300 |       2420 | asyncio",
             "import time:        50 |         50 | asyncio",  # a second import of the same name: ignored
             "some other stderr line"]
    assert imports.parse_importtime(lines) == [("_asyncio", 120, 120), ("asyncio.events", 2000, 2120),
                                               ("asyncio", 300, 2420)]
    assert imports.group_of("asyncio.events") == "asyncio"
    assert imports.group_of("_asyncio") == "asyncio"
    assert imports.group_of("entrypoint.web.caddy") == "entrypoint (ours)"
    assert imports.group_of("json.decoder") == "json"
    walk = [["<start>", 1000, True, False], ["asyncio", 1500, True, False], ["json", 1600, True, False],
            ["asyncio.events", 1600, True, False]]
    assert imports.per_group(walk) == {"asyncio": 500, "json": 100}
    rows = imports.collapse({"asyncio": {"modules": 2, "self_ms": 1.0, "rss_kb": 500, "third_party": False},
                             "json": {"modules": 1, "self_ms": 0.1, "rss_kb": 100, "third_party": False},
                             "re": {"modules": 3, "self_ms": 0.2, "rss_kb": 50, "third_party": False},
                             "ipaddress": {"modules": 1, "self_ms": 0.3, "rss_kb": 400, "third_party": False}})
    assert [name for name, _ in rows] == ["asyncio", "ipaddress", "other stdlib (2 packages, each < 0.25 MB)"]
    assert rows[-1][1]["rss_kb"] == 150 and rows[-1][1]["modules"] == 4
