"""Each import's share of PID 1's RSS.

1. pogly-entrypoint runs as PID 1 under ``python -X importtime`` (same settings as the bench) until
   it is ready and idle: that gives every module PID 1 imports, in completion order, with its
   own import time.
2. A fresh interpreter imports exactly those modules in that order, reading its ``VmRSS`` after each
   one: completion order means a module's dependencies are already in, so each delta is the
   module's own.  Deltas are summed per package (asyncio, structlog, httpx, h11, jinja2, ours…).
3. For the packages named in issue 15, a fresh interpreter imports each one alone (its full cost
   when nothing else has paid for its dependencies).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procfs, report
from bench.harness import Boot, ready_checks, wait_ready

HELPER_RUNS = 3
NAMED = ("asyncio", "structlog", "h11", "jinja2", "markupsafe", "blake3", "entrypoint")
_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")

# Runs in a fresh interpreter: import each module named on stdin in order, report VmRSS (kB) after each.
HELPER = r"""
import importlib, json, sys
sys.modules["ssl"] = None  # as in PID 1 (startup.run): a refused import still prints an importtime line
sys.modules["_hashlib"] = None  # likewise (startup.run): hashlib's built-in sha256, no libcrypto
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
names = json.loads(sys.stdin.read())
out = [["<start>", rss(), True, False]]
for name in names:
    try:
        mod = importlib.import_module(name)
        ok = True
    except BaseException:
        mod, ok = None, False
    third = "site-packages" in str(getattr(mod, "__file__", "") or "")
    out.append([name, rss(), ok, third])
print(json.dumps(out))
"""


def parse_importtime(lines: list[str]) -> list[tuple[str, int, int]]:
    """``-X importtime`` lines → ``[(module, self_us, cumulative_us)]`` in completion order (first import only)."""
    out = []
    seen = set()
    for line in lines:
        match = _LINE.match(line.rstrip("\n"))
        if match and match.group(4) not in seen:
            seen.add(match.group(4))
            out.append((match.group(4), int(match.group(1)), int(match.group(2))))
    return out


def group_of(module: str) -> str:
    """The package a module is counted under: its top-level name (``_asyncio`` counts as asyncio)."""
    top = module.split(".", 1)[0]
    if top.lstrip("_") in NAMED:
        top = top.lstrip("_")
    return "entrypoint (ours)" if top == "entrypoint" else top


def data_groups(named: tuple[str, ...]) -> set[str]:
    return {"entrypoint (ours)" if n == "entrypoint" else n for n in named}


def rss_walk(modules: list[str], env: dict[str, str]) -> list[list[Any]]:
    from bench.scenarios import source_dir

    done = subprocess.run([sys.executable, "-c", HELPER], input=json.dumps(modules), capture_output=True, text=True,
                          env=env, cwd=source_dir(), timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"import helper exited {done.returncode}: {done.stderr[-1000:]}")
    return json.loads(done.stdout)


def per_group(walk: list[list[Any]]) -> dict[str, float]:
    """kB added per group along one walk (a module's delta = RSS after it − RSS before it)."""
    out: dict[str, float] = {}
    for (_, before, _, _), (name, after, _ok, _third) in itertools.pairwise(walk):
        group = group_of(name)
        out[group] = out.get(group, 0) + (after - before)
    return out


def measure(logs: Path, issuer: str | None = None) -> dict[str, Any]:
    """Boot PID 1 under importtime, then the RSS walks; everything the table needs, as plain data."""
    from bench.scenarios import IDLE_SETTLE, Subject, prepare, source_dir

    subject = Subject("pogly-importtime", "pogly-entrypoint -X importtime",
                      lambda _t: [sys.executable, "-X", "importtime", "-m", "entrypoint", "run"], pogly=True)
    if not issuer:
        subject.env.update(OIDC_ISSUER="", OIDC_CLIENT_ID="")
    tmp, env = prepare(subject, issuer or "")
    try:
        with Boot(subject.argv(tmp), env, logs / "importtime.log", split_stderr=True, cwd=source_dir()) as boot:
            ready = wait_ready(boot, ready_checks(int(env["POGLY_HTTP_PORT"]), readyz=True), 60)
            time.sleep(IDLE_SETTLE + 3)  # idle: the lazily imported modules are in
            cut = time.monotonic()
            idle = procfs.status(boot.inner_pid) or {}
            boot.signal(signal.SIGTERM)
            boot.wait_exit(30)
        lines = [raw.decode("utf-8", "replace") for at, raw in boot.stderr_lines if at <= cut]
        # When each import finished, as the reader saw it: which imports sit on the way to ready.
        with (logs / "importtime.stderr.txt").open("w") as fh:
            for at, raw in boot.stderr_lines:
                fh.write(f"{(at - boot.launched) * 1000:8.1f}\t{raw.decode('utf-8', 'replace')}")
        ready_ms = (ready - boot.launched) * 1000
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    modules = parse_importtime(lines)
    names = [m for m, _, _ in modules if m != "__main__"]
    arrivals = [((at - boot.launched) * 1000, raw.decode("utf-8", "replace")) for at, raw in boot.stderr_lines]
    first_seen = {}
    for ms, line in arrivals:
        match = _LINE.match(line.rstrip("\n"))
        if match:
            first_seen.setdefault(group_of(match.group(4)), ms)
    walks = [rss_walk(names, env) for _ in range(HELPER_RUNS)]
    third = {name: t for name, _, _, t in walks[0][1:]}
    failed = sorted({name for walk in walks for name, _, ok, _ in walk[1:] if not ok})
    self_us: dict[str, int] = {}
    counts: dict[str, int] = {}
    third_party: dict[str, bool] = {}
    for name, us, _ in modules:
        group = group_of(name)
        self_us[group] = self_us.get(group, 0) + us
        counts[group] = counts.get(group, 0) + 1
        third_party[group] = third_party.get(group, False) or third.get(name, False)
    groups = [per_group(w) for w in walks]
    added = {g: report.median(gr.get(g, 0) for gr in groups) or 0 for g in {g for gr in groups for g in gr}}
    alone = {}
    for name in ("asyncio", "structlog", "httpx", "h11", "jinja2", "tenacity"):
        alone[name] = report.median((w := rss_walk([name], env))[-1][1] - w[0][1] for _ in range(HELPER_RUNS))
    ours = [n for n in names if n.split(".")[0] == "entrypoint"]
    alone["entrypoint (ours)"] = report.median(
        (w := rss_walk(ours, env))[-1][1] - w[0][1] for _ in range(HELPER_RUNS))
    return {
        "idle_rss_kb": idle.get("VmRSS"),
        "start_rss_kb": report.median(w[0][1] for w in walks),
        "after_imports_rss_kb": report.median(w[-1][1] for w in walks),
        "modules": len(names),
        "failed_imports": failed,
        "groups": {g: {"modules": counts.get(g, 0), "self_ms": self_us.get(g, 0) / 1000, "rss_kb": added.get(g, 0),
                       "alone_kb": alone.get(g), "third_party": third_party.get(g, False)}
                   for g in set(counts) | set(added)},
        "importtime_total_ms": sum(us for _, us, _ in modules) / 1000,
        "ready_ms": ready_ms,
        # ms after launch at which each package's first module had finished importing (stderr arrival)
        "first_import_ms": {g: round(ms, 1) for g, ms in first_seen.items() if g in data_groups(NAMED)},
    }


def collapse(groups: dict[str, dict[str, Any]], min_kb: float = 256) -> list[tuple[str, dict[str, Any]]]:
    """Largest first; packages under ``min_kb`` that issue 15 does not name are summed into two "other" rows."""
    keep: list[tuple[str, dict[str, Any]]] = []
    other: dict[str, dict[str, Any]] = {}
    for name, g in groups.items():
        if name in NAMED or name == "entrypoint (ours)" or g["rss_kb"] >= min_kb:
            keep.append((name, g))
            continue
        label = "other third-party" if g.get("third_party") else "other stdlib"
        o = other.setdefault(label, {"modules": 0, "self_ms": 0.0, "rss_kb": 0.0, "alone_kb": None, "packages": 0})
        o["modules"] += g["modules"]
        o["self_ms"] += g["self_ms"]
        o["rss_kb"] += g["rss_kb"]
        o["packages"] += 1
    for label, o in other.items():
        keep.append((f"{label} ({o['packages']} packages, each < {min_kb / 1024:.2f} MB)", o))
    return sorted(keep, key=lambda kv: -kv[1]["rss_kb"])


def table(data: dict[str, Any]) -> str:
    """Markdown: per package, RSS added in PID 1's order, its share of idle RSS, import time, RSS alone."""
    idle = data.get("idle_rss_kb") or 0
    rows = collapse(data["groups"])
    first = data.get("first_import_ms", {})
    lines = ["| package | modules | RSS added, in PID 1's import order | share of PID 1's idle RSS "
             "| import time (self) | RSS when imported alone (with its dependencies) | imported by (ms after launch) |",
             "|---|---|---|---|---|---|---|"]

    def mb(kb: float | None) -> str:
        return "—" if kb is None else f"{kb / 1024:.1f} MB"

    def share(kb: float) -> str:
        return f"{100 * kb / idle:.0f} %" if idle else "—"

    start = data["start_rss_kb"] or 0
    lines.append(f"| interpreter at start (before any of these) | — | {mb(start)} | {share(start)} | — | — | — |")
    for group, g in rows:
        when = f"{first[group]:,.0f}" if group in first else "—"
        lines.append(f"| {group} | {g['modules']} | {mb(g['rss_kb'])} | {share(g['rss_kb'])} | {g['self_ms']:.1f} ms "
                     f"| {mb(g['alone_kb'])} | {when} |")
    rest = idle - (data["after_imports_rss_kb"] or 0)
    lines.append(f"| not imports (heap, buffers, threads, the running program) | — | {mb(rest)} | {share(rest)} | — "
                 "| — | — |")
    ready = f"ready at {data['ready_ms']:,.0f}" if data.get("ready_ms") else "—"
    lines.append(f"| **PID 1 idle, total** | {data['modules']} | **{mb(idle)}** | 100 % | "
                 f"{data['importtime_total_ms']:.0f} ms | — | {ready} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.imports: the table alone (same OIDC provider as the bench)
    from tests.oidc.fixtures import node_provider

    out = Path(tempfile.mkdtemp(prefix="pogly-bench-imports-"))
    with node_provider("--shape", "authentik") as provider:
        result = measure(out, provider.issuer)
    print(json.dumps(result, indent=1))
    print(table(result))
    print(f"importtime with arrival times: {out / 'importtime.stderr.txt'}")
