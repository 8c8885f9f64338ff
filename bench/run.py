"""``make bench``: pogly-entrypoint beside the anchors, in one run, each as PID 1 of its own PID namespace.

Subjects (bench/scenarios.py): a bare bash floor, the classic shell entrypoint, tini and dumb-init
running it, supervisord, pogly-entrypoint; the same SpacetimeDB stand-in, real Caddy, module and
OIDC provider (the real oidc-provider from tests/js) for all.  Runs are interleaved (run 1 of every
subject, then run 2, …) so a change of machine load hits all alike.  Every metric is a median over
the runs and a ratio to the floor measured in the same run.

Writes ``bench/results/bench-<UTC time>.json`` (+ ``latest.json``) and ``summary-<UTC time>.md``
(ignored by git) and prints the summary.  Exit status: 0 when the floor and pogly-entrypoint were
measured (whatever the numbers: a missed target is a result, not a failure); 1 when the harness
failed or could not measure them; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import anchors, imports, report
from bench.harness import REPO, kill_all
from bench.scenarios import SKIPPABLE, handler_window, loadavg, run_subject, subjects

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "entrypoint"], cwd=REPO, capture_output=True,
                           text=True)
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "git": rev.stdout.strip(),
            "entrypoint_dirty": bool(dirty.stdout.strip()), "caddy": _caddy_version()}


def _caddy_version() -> str:
    caddy = Path(sys.executable).parent / "caddy"
    done = subprocess.run([str(caddy), "version"], capture_output=True, text=True, timeout=30)
    return done.stdout.split()[0] if done.stdout else "?"


def wait_quiet(limit_s: float, below: float = 1.0, every_s: float = 30.0) -> dict[str, Any]:
    """Wait (at most ``limit_s``) for the 1-minute load average to drop below ``below``; say how it went."""
    start = time.monotonic()
    seen = [loadavg()]
    while seen[-1] >= below and time.monotonic() - start < limit_s:
        print(f"bench: load {seen[-1]:.2f} ≥ {below}: waiting ({time.monotonic() - start:.0f}/{limit_s:.0f} s)",
              flush=True)
        time.sleep(min(every_s, max(limit_s - (time.monotonic() - start), 0.1)))
        seen.append(loadavg())
    return {"waited_s": round(time.monotonic() - start), "load_at_start": seen[-1], "quiet": seen[-1] < below}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")))
    parser.add_argument("--only", help="comma-separated subjects (floor is always included)")
    parser.add_argument("--quiet-wait", type=float, default=float(os.environ.get("BENCH_QUIET_WAIT", "1800")),
                        help="seconds to wait for the 1-minute load to drop below 1.0 (0: start at once)")
    parser.add_argument("--no-imports", action="store_true", help="skip the import/RSS table")
    parser.add_argument("--skip", default="", metavar="PARTS",
                        help=f"comma-separated parts of each run to leave out: {', '.join(SKIPPABLE)} (the idle "
                             "windows, the SIGKILL of SpacetimeDB, the log burst); a quick look at start and stop")
    args = parser.parse_args(argv)
    args.skip = frozenset(p for p in args.skip.split(",") if p)
    if args.skip - set(SKIPPABLE):
        parser.error(f"--skip {','.join(sorted(args.skip - set(SKIPPABLE)))}: not one of {', '.join(SKIPPABLE)}")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = RESULTS / "logs" / stamp
    try:
        return _bench(args, stamp, logs)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        kill_all()


def _bench(args: argparse.Namespace, stamp: str, logs: Path) -> int:
    from tests.oidc.fixtures import node_provider

    if os.geteuid() != 0:
        print("bench: needs root (unshare --pid)", file=sys.stderr)
        return 1
    debs = anchors.debian_binaries()
    sup = anchors.supervisord()
    every = subjects(debs["tini"], debs["dumb-init"], sup)
    if args.only:
        wanted = {"floor", *args.only.split(",")}
        every = [s for s in every if s.name in wanted]
    labels = {s.name: s.label for s in every}
    budget_end = time.monotonic() + args.quiet_wait  # one budget for every wait below
    quiet = wait_quiet(args.quiet_wait)
    started = datetime.now(UTC)
    results: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "machine": machine(),
                               "versions": anchors.versions(debs["tini"], debs["dumb-init"], sup),
                               "load": quiet, "runs": {s.name: [] for s in every}}
    with node_provider("--shape", "authentik") as provider:
        for run_no in range(1, args.runs + 1):
            for n, subject in enumerate(every):
                if run_no > 1 or n > 0:  # each subject's run starts on a quiet machine too, within the budget
                    quiet.setdefault("later", []).append(wait_quiet(max(budget_end - time.monotonic(), 0)))
                print(f"bench: run {run_no}/{args.runs}: {subject.label} (load {loadavg():.2f})", flush=True)
                res = run_subject(subject, run_no, provider.issuer, logs, args.skip)
                for error in res["errors"]:
                    print(f"bench:   {subject.label}: {error}", flush=True)
                results["runs"][subject.name].append(res)
        quiet.setdefault("later", []).append(wait_quiet(max(budget_end - time.monotonic(), 0)))
        results["handler_window_ms"] = handler_window(args.runs)
        if not args.no_imports:
            print("bench: imports of PID 1", flush=True)
            results["imports"] = imports.measure(logs, provider.issuer)
    results["load"]["at_end"] = loadavg()
    results["duration_s"] = round((datetime.now(UTC) - started).total_seconds())

    meds = report.medians(results["runs"])
    targets = report.evaluate_targets(meds, results["runs"])
    results["medians"] = meds
    results["targets"] = [t.__dict__ for t in targets]
    md = render(results, labels, targets)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    shutil.copyfile(path, RESULTS / "latest.json")
    (RESULTS / f"summary-{stamp}.md").write_text(md)
    print(md)
    print(f"bench: results in {path.relative_to(REPO)}, logs in {logs.relative_to(REPO)}")
    measured = [name for name in ("floor", "pogly") if name in results["runs"]
                and any(r.get("ready_first_ms") is not None for r in results["runs"][name])]
    if len(measured) < len({"floor", "pogly"} & set(results["runs"])):
        print("bench: the floor or pogly-entrypoint could not be measured (see the errors above)", file=sys.stderr)
        return 1
    return 0


def render(results: dict[str, Any], labels: dict[str, str], targets: list[report.Target]) -> str:
    m = results["machine"]
    load = results["load"]
    loads = [r["load_before"] for rs in results["runs"].values() for r in rs] or [0.0]
    waits = [load, *load.get("later", [])]
    waited = sum(w["waited_s"] for w in waits)
    out = [f"## Results {results['date']}",
           "",
           f"Machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, Caddy {m['caddy']}; "
           f"pogly-entrypoint at {m['git']}{' + uncommitted changes' if m['entrypoint_dirty'] else ''}. "
           f"Before each subject's run the harness waited for a 1-minute load below 1.0 ({waited} s in all, "
           f"{'always reached' if all(w['quiet'] for w in waits) else 'NOT always reached'}): "
           f"{min(loads):.2f}–{max(loads):.2f} at the start of the runs, {load.get('at_end', 0):.2f} at the end; "
           f"{len(next(iter(results['runs'].values())))} runs, medians; anchors: "
           + ", ".join(results["versions"].values()) + ".",
           "",
           report.summary_table(results["runs"], labels),
           "",
           report.targets_table(targets),
           ""]
    pogly = results["runs"].get("pogly", [])
    for key, title, since in (("timeline_first", "first boot", "launch"), ("timeline_restart", "restart", "launch"),
                              ("timeline_stop", "stop, with a writer", "`signal.received`")):
        tls = [r[key] for r in pogly if r.get(key)]
        if tls:
            out += [f"### Timeline of pogly-entrypoint: {title}", "", report.timeline_table(tls, since), ""]
    errors = [(s, r["run"], e) for s, rs in results["runs"].items() for r in rs for e in r["errors"]]
    if errors:
        out += ["### What did not happen", ""] + [f"- {labels.get(s, s)}, run {n}: {e}" for s, n, e in errors] + [""]
    if results.get("handler_window_ms"):
        hw = report.median(results["handler_window_ms"])
        out += [f"pogly-entrypoint's SIGTERM handler is installed {hw:.1f} ms after exec (median).", ""]
    if results.get("imports"):
        out += ["### PID 1's imports", "", imports.table(results["imports"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
