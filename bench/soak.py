"""``make soak DURATION=10m``: pogly-entrypoint as PID 1 under chaos for a while, then the books are checked.

The real program in ``unshare --pid --fork --mount-proc`` (root), the SpacetimeDB stand-in, the real
Caddy and the real ``oidc-provider`` (tests/js; skipped with a note when node is missing).  For the
whole duration, at once:

* chaos: every 5-15 s (seeded) a SIGKILL to SpacetimeDB or to Caddy, at most 3 of one child within 130 s
  (a 5th death within 120 s is the documented crash-loop verdict, which would end the soak);
* the OIDC provider flaps: down at start, then up and down in turns of 5-15 s;
* readers: threads polling ``/readyz`` (public port and health port), ``/livez`` and ``/status``;
* a writer: ``insert_item`` reducer calls straight to SpacetimeDB, each acknowledged value remembered
  with the time of its acknowledgement;
* a sampler: every 2 s, PID 1's descriptor count and RSS, and how many processes the namespace holds.

At the end: SIGTERM → exit 0 within ``POGLY_STOP_TIMEOUT``; nothing of the run left on the host; PID 1's
descriptors flat (last sample against the first after warm-up) and its RSS slope (least squares, KiB per
minute); then a second start reads every ``Items`` row back: each acknowledged write must be there,
except those acknowledged before a SIGKILL of SpacetimeDB (its commit log is synced every 500 ms, so
those can be lost by SpacetimeDB's own design, as with the real server; they are counted apart, with how
long before the kill the oldest was acknowledged, and noted when older than ``KILL_WINDOW_S``).  A write
lost with no SIGKILL after it was lost by a clean stop: that fails the soak.  Prints a JSON summary,
writes ``bench/results/soak-<UTC time>.json``; exit 0 when every check held, 1 otherwise.  Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procfs
from bench.harness import BenchError, Boot, find_standin_server, kill_all, namespace_pids, request, token
from tests.harness import ENTRYPOINT, base_env, free_port

RESULTS = Path(__file__).resolve().parent / "results"
KILL_WINDOW_S = 1.0  # two sync periods of SpacetimeDB's commit log (500 ms): writes this recent may be lost
SAMPLE_S = 2.0
ACK_SLACK_S = 0.1  # below the restart policy's first pause (0.1-0.2 s) plus a start: no new run answers sooner
CRASH_LOOP_WINDOW_S = 130.0  # the restart policy's window (120 s), with a margin
KILLS_PER_WINDOW = 3  # of one child: its 5th death in the window would be the crash-loop verdict
WARMUP_SAMPLES = 3


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 120s, 5m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


class Books:
    """What every thread records, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, float] = {}  # value → monotonic time of its acknowledgement
        self.write_errors = 0
        self.reads: dict[str, Counter[str]] = {}
        self.kills: list[tuple[float, str]] = []  # (monotonic, child)
        self.samples: list[dict[str, float]] = []
        self.flaps: list[tuple[float, str]] = []

    def read(self, what: str, outcome: str) -> None:
        with self.lock:
            self.reads.setdefault(what, Counter())[outcome] += 1


def writer(books: Books, port: int, bearer: str, stop: threading.Event, n: int) -> None:
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
    i = 0
    while not stop.is_set():
        value = f"soak-{n}-{i}"
        try:
            status, _ = request(port, "/v1/database/pogly/call/insert_item", method="POST",
                                body=json.dumps([value]).encode(), headers=headers, timeout=2)
        except OSError:
            status = 0
        with books.lock:
            if status == 200:
                books.acked[value] = time.monotonic()
            else:
                books.write_errors += 1
        i += 1
        if status != 200:
            stop.wait(0.05)  # SpacetimeDB is restarting: do not spin


def reader(books: Books, port: int, path: str, what: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status, _ = request(port, path, timeout=2)
            books.read(what, str(status))
        except OSError as exc:
            books.read(what, type(exc).__name__)
        stop.wait(0.02)


def sampler(books: Books, boot: Boot, stop: threading.Event) -> None:
    started = time.monotonic()
    while not stop.wait(SAMPLE_S):
        pid1 = boot.inner_pid
        status = procfs.status(pid1)
        try:
            fds = len(list(Path(f"/proc/{pid1}/fd").iterdir()))
        except OSError:
            continue
        if status is None:
            continue
        with books.lock:
            books.samples.append({"t_s": round(time.monotonic() - started, 1), "fds": fds,
                                  "rss_kib": status.get("VmRSS", 0), "procs": len(namespace_pids(boot))})


def chaos(books: Books, boot: Boot, rng: random.Random, stop: threading.Event) -> None:
    """A SIGKILL every 5-15 s, but never a child's 5th death within 120 s: that is the documented crash-loop
    verdict (the container exits with the child's code), a policy to keep, not a fault to provoke."""
    while not stop.wait(rng.uniform(5, 15)):
        now = time.monotonic()
        with books.lock:
            recent = Counter(child for at, child in books.kills if now - at < CRASH_LOOP_WINDOW_S)
        allowed = [child for child in ("spacetimedb", "caddy") if recent[child] < KILLS_PER_WINDOW]
        if not allowed:
            continue
        target = rng.choice(allowed)
        pid = find_standin_server(boot) if target == "spacetimedb" else next(
            (p for p in namespace_pids(boot) if procfs.cmdline(p)[:1] and procfs.cmdline(p)[0].endswith("caddy")
             and "run" in procfs.cmdline(p)), None)
        if pid is None:
            continue  # between two runs of it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            with books.lock:  # stamped once sent: a write acknowledged before this may be lost to it
                books.kills.append((time.monotonic(), target))


def flapper(books: Books, port: int, rng: random.Random, stop: threading.Event) -> None:
    from tests.oidc.fixtures import node_provider

    while not stop.wait(rng.uniform(5, 15)):
        with node_provider("--shape", "keycloak", "--port", str(port)):
            with books.lock:
                books.flaps.append((time.monotonic(), "up"))
            stop.wait(rng.uniform(5, 15))
        with books.lock:
            books.flaps.append((time.monotonic(), "down"))


def slope_per_min(samples: list[dict[str, float]], key: str) -> float | None:
    points = [(s["t_s"], s[key]) for s in samples]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return round(sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 60, 2)


def leftovers(tmp: Path) -> list[str]:
    """Processes on the host still running anything of this soak (its stand-in, its Caddy)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = procfs.cmdline(int(entry.name))
            if any(str(tmp) in a for a in argv):
                found.append(f"{entry.name}: {' '.join(argv)[:200]}")
    return found


def boot_entrypoint(env: dict[str, str], log: Path) -> Boot:
    return Boot([*ENTRYPOINT, "run"], env, log, markers=(b'"entrypoint.ready"', b'"entrypoint.exit"'))


def soak(duration: float, seed: int, keep: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="pogly-soak-"))
    oidc_port = free_port()
    with_oidc = shutil.which("node") is not None
    env = base_env(tmp, POGLY_STOP_TIMEOUT="25",
                   **({"OIDC_ISSUER": f"http://127.0.0.1:{oidc_port}/realms/pogly"} if with_oidc
                      else {"OIDC_ISSUER": "", "OIDC_CLIENT_ID": ""}))
    stdb_port = int(env["POGLY_SPACETIME_ADDR"].rsplit(":", 1)[1])
    health_port = int(env["POGLY_HEALTH_ADDR"].rsplit(":", 1)[1])
    http_port = int(env["POGLY_HTTP_PORT"])
    books = Books()
    summary: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "duration_s": duration,
                               "seed": seed, "oidc_provider": with_oidc, "workdir": str(tmp)}
    problems: list[str] = []
    notes: list[str] = []
    boot = boot_entrypoint(env, tmp / "soak-run.log")
    try:
        boot.wait_marker(b'"entrypoint.ready"', 60)
        bearer = token(Path(env["POGLY_CONFIG_DIR"]))
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(books, stdb_port, bearer, stop, n), daemon=True)
                   for n in range(2)]
        threads += [threading.Thread(target=reader, args=(books, port, path, what, stop), daemon=True)
                    for port, path, what in ((http_port, "/readyz", "public /readyz"),
                                             (health_port, "/readyz", "health /readyz"),
                                             (health_port, "/livez", "health /livez"),
                                             (health_port, "/status", "health /status"))]
        threads += [threading.Thread(target=sampler, args=(books, boot, stop), daemon=True),
                    threading.Thread(target=chaos, args=(books, boot, rng, stop), daemon=True)]
        if with_oidc:
            threads.append(threading.Thread(target=flapper, args=(books, oidc_port, rng, stop), daemon=True))
        for thread in threads:
            thread.start()
        stop.wait(duration)
        stop.set()
        for thread in threads:
            thread.join(30)
        if not boot.alive():
            summary["exit_code"] = boot.exit_code()
            problems.append(f"the entrypoint exited during the soak with code {boot.exit_code()} "
                            f"(log: {boot.log_path})")
        else:
            t0 = time.monotonic()
            boot.signal(signal.SIGTERM)
            gone = boot.wait_exit(40)
            summary["stop_s"] = round(gone - t0, 2) if gone else None
            summary["exit_code"] = boot.exit_code()
            if boot.exit_code() != 0:
                problems.append(f"SIGTERM at the end: exit {boot.exit_code()}, not 0")
            if gone is None or gone - t0 > 25:
                problems.append(f"the stop took {summary['stop_s']} s (POGLY_STOP_TIMEOUT=25)")
    finally:
        boot.kill()
    summary["leftover_processes"] = leftovers(tmp)
    if summary["leftover_processes"]:
        problems.append(f"{len(summary['leftover_processes'])} processes left running")

    samples = books.samples[WARMUP_SAMPLES:] or books.samples
    if samples:
        summary["pid1_fds"] = {"first": samples[0]["fds"], "last": samples[-1]["fds"],
                               "max": max(s["fds"] for s in samples), "slope_per_min": slope_per_min(samples, "fds")}
        summary["pid1_rss_kib"] = {"first": samples[0]["rss_kib"], "last": samples[-1]["rss_kib"],
                                   "max": max(s["rss_kib"] for s in samples),
                                   "slope_kib_per_min": slope_per_min(samples, "rss_kib"),
                                   # warm-up (allocator arenas, caches) shows in the first half; a leak in both
                                   "second_half_slope_kib_per_min": slope_per_min(samples[len(samples) // 2:],
                                                                                  "rss_kib")}
        summary["namespace_procs_max"] = max(s["procs"] for s in samples)
        if samples[-1]["fds"] > samples[0]["fds"] + 2:
            problems.append(f"PID 1's descriptors grew from {samples[0]['fds']} to {samples[-1]['fds']}")
    summary["samples"] = len(books.samples)
    summary["kills"] = dict(Counter(child for _, child in books.kills))
    summary["oidc_flaps"] = len(books.flaps)
    summary["reads"] = {what: dict(counter) for what, counter in books.reads.items()}
    livez_failures = sum(n for outcome, n in books.reads.get("health /livez", {}).items() if outcome != "200")
    if livez_failures:
        problems.append(f"/livez failed {livez_failures} times: the supervisor loop itself must always answer")

    # Every acknowledged write, read back after a fresh start.
    boot = boot_entrypoint(env, tmp / "soak-verify.log")
    try:
        boot.wait_marker(b'"entrypoint.ready"', 60)
        status, body = request(stdb_port, "/v1/database/pogly/sql", method="POST",
                               body=b"SELECT * FROM Items", headers={"Authorization": f"Bearer {bearer}"}, timeout=60)
        if status != 200:
            raise BenchError(f"SELECT answered {status}: {body[:300]!r}")
        present = {row[1] for row in json.loads(body)[0]["rows"]}
        boot.signal(signal.SIGTERM)
        boot.wait_exit(40)
    finally:
        boot.kill()
    stdb_kills = sorted(at for at, child in books.kills if child == "spacetimedb")
    missing = [v for v in books.acked if v not in present]
    # How long before the next SIGKILL of SpacetimeDB each lost write was acknowledged (None: no kill came
    # after it, so it was lost by a clean stop, which is ours to get right).
    # A response read a moment after the kill was sent may still be the killed run's (the new run needs
    # its restart pause, at least 0.1 s, and a start): ACK_SLACK_S attributes those to that kill.
    ages = {v: next((kill - books.acked[v] for kill in stdb_kills if kill >= books.acked[v] - ACK_SLACK_S), None)
            for v in missing}
    at_clean_stop = [v for v, age in ages.items() if age is None]
    old_losses = [v for v, age in ages.items() if age is not None and age > KILL_WINDOW_S]
    summary["writes"] = {"acknowledged": len(books.acked), "present_after_restart": len(books.acked) - len(missing),
                         "lost_to_a_spacetimedb_sigkill": len(missing) - len(at_clean_stop),
                         "of_which_older_than_kill_window": len(old_losses),
                         "oldest_lost_before_its_kill_s": round(max((a for a in ages.values() if a is not None),
                                                                    default=0.0), 3),
                         "lost_at_a_clean_stop": len(at_clean_stop),
                         "errors_while_restarting": books.write_errors}
    if at_clean_stop:
        problems.append(f"{len(at_clean_stop)} acknowledged writes lost with no SIGKILL of SpacetimeDB after them "
                        "(a clean stop must flush everything)")
    if old_losses:
        notes.append(f"{len(old_losses)} writes acknowledged more than {KILL_WINDOW_S:g} s before a SIGKILL of "
                     "SpacetimeDB were lost: the stand-in's flusher fell behind under load (its commit log, not "
                     "the supervisor)")
    summary["problems"] = problems
    summary["notes"] = notes
    summary["ok"] = not problems
    if not keep and not problems:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("5m"),
                        help="how long the chaos lasts: 120s, 5m, 1h (default 5m)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory and its logs (kept anyway when a check failed)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = soak(args.duration, seed, args.keep)
    except KeyboardInterrupt:
        kill_all()
        return 130
    finally:
        kill_all()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}", file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
