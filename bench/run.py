"""Measure pogly-entrypoint's own costs, the way bench/README.md describes.

Numbers, never assertions: start-up windows, readiness detection latency,
stop latency beyond the children's own stop time, idle RSS and wake-ups.
Run with ``make bench``; prints a Markdown table and writes bench/results.json.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Running, base_env

RUNS = int(os.environ.get("BENCH_RUNS", "10"))
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "pogly-entrypoint")


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def handler_window() -> float:
    """exec → SIGTERM handler installed (SigCgt bit), for the console script Docker runs."""
    env = base_env(Path(tempfile.mkdtemp()), OIDC_ISSUER="")  # config error: we only watch the start
    start = time.perf_counter()
    proc = subprocess.Popen([CONSOLE_SCRIPT, "run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    status = Path(f"/proc/{proc.pid}/status")
    took = None
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                    took = time.perf_counter() - start
        except OSError:
            break
        if took is not None:
            break
    proc.wait()
    assert took is not None, "handler never observed"
    return took * 1000


def one_run(issuer: str) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp())
    env = base_env(tmp, OIDC_ISSUER=issuer)
    launched = time.time()
    with Running(env, pid1=os.geteuid() == 0, command=[CONSOLE_SCRIPT]) as run:
        ready = run.wait_event("entrypoint.ready", timeout=60)
        started = {e["child"]: e.get("prespawned_at") or ts(e)
                   for e in run.find(lambda e: e.get("event") == "child.started")}
        caddy_line = run.find(lambda e: e.get("service") == "caddy"
                              and e.get("event") == "serving initial configuration")[0]
        caddy_ready = run.find(lambda e: e.get("event") == "child.ready" and e.get("child") == "caddy")[0]
        time.sleep(2.0)  # measurement window for idle cost, not synchronisation
        pid = run.inner_pid
        before = _proc_status(pid)
        time.sleep(5.0)
        after = _proc_status(pid)
        t0 = time.perf_counter()
        run.signal(signal.SIGTERM)
        run.wait()
        stop_total = (time.perf_counter() - t0) * 1000
    children_stop = sum(e["stop_ms"] for e in run.find(lambda e: e.get("event") == "child.stopped"))
    received = ts(run.find(lambda e: e.get("event") == "signal.received")[0])
    exited = ts(run.find(lambda e: e.get("event") == "entrypoint.exit")[0])
    return {
        "spawn_spacetimedb_ms": (started["spacetimedb"] - launched) * 1000,
        "spawn_caddy_ms": (started["caddy"] - launched) * 1000,
        "ready_ms": (ts(ready) - launched) * 1000,
        # Caddy's own timestamp of its ready line → our child.ready event.
        "caddy_ready_noticed_ms": (ts(caddy_ready) - float(caddy_line["child_ts"])) * 1000,
        # SIGTERM sent → process gone, as the test observes it (includes unshare's own exit).
        "stop_total_ms": stop_total,
        # Our share, from our own log: signal handled → last line, minus the children's stop times.
        "stop_overhead_ms": (exited - received) * 1000 - children_stop,
        "idle_rss_mb": after["VmRSS"] / 1024,
        "idle_wakeups_per_s": (after["voluntary_ctxt_switches"] - before["voluntary_ctxt_switches"]
                               + after["nonvoluntary_ctxt_switches"] - before["nonvoluntary_ctxt_switches"]) / 5,
    }


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            out[key] = int(value.split()[0])
    return out


def summary(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"{statistics.median(values):.1f} (p95 {p95:.1f})"


def main() -> int:
    from tests.oidc.fixtures import node_provider

    windows = [handler_window() for _ in range(RUNS)]
    with node_provider("--shape", "authentik") as provider:
        runs = [one_run(provider.issuer) for _ in range(max(3, RUNS // 2))]
    results = {"handler_window_ms": windows, **{k: [r[k] for r in runs] for k in runs[0]}}
    Path(__file__).with_name("results.json").write_text(json.dumps(results, indent=2))
    print("| metric | pogly-entrypoint: median (p95) |")
    print("|---|---|")
    for key, values in results.items():
        print(f"| {key} | {summary(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
