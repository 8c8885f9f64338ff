"""The child-line relay on its own: a real child's burst through the real path, lines/s and peak RSS.

Why beside ``make bench``: the log-burst scenario there needs root, the whole stack and minutes;
this runs in seconds without root and exercises the same code a SpacetimeDB line goes through in
PID 1 — ``Child`` reads the pipe, ``LineFramer`` frames, ``SpacetimeService._sink`` decodes,
redacts and turns the line into an event (calling the service's real ``on_line``), and the
``LogSink`` writes it into a pipe whose reader (``wc -l``) is another process, so the lines
counted are the lines that left us (``lines_out``: the child's and our own ``child.started``).

    .venv/bin/python bench/log_relay.py                    # 200k plain lines, JSON
    .venv/bin/python bench/log_relay.py --format console   # the same, console lines
    .venv/bin/python bench/log_relay.py --kind secrets     # every 10th line carries a token

Numbers are printed (one JSON object), never asserted: ``lines_per_s`` is wall-clock (the child's own
writing and ``wc`` share the machine with us), ``cpu_lines_per_s`` counts only this process's CPU
time, the relay's own cost, steadier on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from entrypoint import logs
from entrypoint.config import Settings
from entrypoint.spacetimedb.service import SpacetimeService
from entrypoint.supervision.process import Child, ChildSpec, Reaper
from entrypoint.supervision.status import Status

PLAIN = "flood line %06.0f: the quick brown fox jumps over the lazy dog, 0123456789"  # as bench/inits
# Every 10th line a SpacetimeDB-like debug line with a bearer token: the slow (regex) path.
SECRETS = ("awk 'BEGIN { for (i = 1; i <= N; i++) { if (i % 10 == 0) "
           "printf \"2026-01-01T00:00:00Z DEBUG request %06d Authorization: Bearer abcdefghijklmnop\\n\", i; "
           "else printf \"flood line %06d: the quick brown fox jumps over the lazy dog, 0123456789\\n\", i } }'")


def _which(name: str) -> str:
    """An absolute path: the spawner (``posix_spawn``) does not search PATH."""
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"log_relay: {name} not found on PATH")
    return found


def child_argv(kind: str, lines: int) -> list[str]:
    if kind == "plain":
        return [_which("seq"), "-f", PLAIN, "1", str(lines)]
    return [_which("sh"), "-c", SECRETS.replace("N;", f"{lines};")]


async def relay(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` as the SpacetimeDB child: seconds from its spawn until its last line was relayed, and
    the CPU seconds this process spent meanwhile (what the relay costs, whatever else loads the machine)."""
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    service = SpacetimeService(Settings(oidc_issuer="", oidc_client_id=""), Status(), reaper)
    spec = ChildSpec(service.name, argv, dict(os.environ))
    child = Child(spec, reaper, service._sink)
    started, cpu = time.perf_counter(), time.process_time()
    service._begin(child, spec)  # what a supervised start does: fresh redactors, child.started, spawn
    await child.wait()
    took, cpu = time.perf_counter() - started, time.process_time() - cpu
    reaper.uninstall()
    return took, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--format", choices=("json", "console"), default="json")
    parser.add_argument("--kind", choices=("plain", "secrets"), default="plain")
    args = parser.parse_args(argv)

    counter = subprocess.Popen(["wc", "-l"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert counter.stdin is not None and counter.stdout is not None
    out = os.fdopen(counter.stdin.fileno(), "w", closefd=False)
    logs.configure(args.format, stream=out)
    took, cpu = asyncio.run(relay(child_argv(args.kind, args.lines)))
    logs.flush(30.0)
    counter.stdin.close()
    received = int(counter.stdout.read().split()[0])
    counter.wait()
    result: dict[str, Any] = {
        "format": args.format, "kind": args.kind, "lines": args.lines, "lines_out": received,
        "dropped": logs._sinks[0].dropped if logs._sinks else None, "seconds": round(took, 3),
        "lines_per_s": round(args.lines / took), "us_per_line": round(took / args.lines * 1e6, 2),
        "cpu_lines_per_s": round(args.lines / cpu), "cpu_us_per_line": round(cpu / args.lines * 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
