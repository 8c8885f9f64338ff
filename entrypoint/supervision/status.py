"""The supervisor's live status: what ``/readyz``, ``/status`` and ``status`` report.

One mutable object owned by the supervisor loop and only read by the health
server (same thread, same loop), so it needs no locking.  Readiness is derived
from it rather than stored, so it can never disagree with the parts it sums up.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Child states, in the order a healthy child goes through them.
STARTING = "starting"
READY = "ready"
BACKOFF = "backoff"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"
# Stopped on purpose (e.g. for a consistent backup) and held: not restarted, not a crash.
PAUSED = "paused"
#: Every state above, in that order (``/metrics`` reports each one, 0 or 1).
STATES = (STARTING, READY, BACKOFF, STOPPING, STOPPED, FAILED, PAUSED)

#: ``ModuleStatus.publish_result`` values; a failure reads ``"failed: <message>"``.
PUBLISH_RESULTS = ("pending", "created", "updated", "unchanged", "failed")
#: ``Status.oidc`` values.
#: "rechecking": verified at an earlier boot with the same settings, being checked again (ready did not wait).
OIDC_VERDICTS = ("pending", "rechecking", "verified", "unverified", "failed", "disabled")


@dataclass
class ChildStatus:
    name: str
    state: str = STARTING
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None  # wall clock, for humans
    last_exit: str | None = None
    paused_for: str | None = None  # why, while PAUSED ("backup"): /readyz says so
    # The same as a number, as a shell reports it (128+N for signal N); None when the last run
    # did not end with an exit status (a held lock, a spawn that failed before the exit was read).
    last_exit_code: int | None = None
    ready_seconds: float | None = None  # the latest run: launch to ready
    stop_seconds: float | None = None  # the last stop: stop signal to exit
    # The same moment on CLOCK_BOOTTIME (``process_start``): uptime survives a wall-clock jump (NTP, a VM resume).
    started_boottime: float | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The state as ``/readyz`` words it: ``paused for backup`` rather than a bare ``paused``."""
        return f"{self.state} for {self.paused_for}" if self.state == PAUSED and self.paused_for else self.state

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        since = data.pop("started_boottime")
        data["uptime_s"] = (round(time.clock_gettime(time.CLOCK_BOOTTIME) - since, 1)
                            if since is not None and self.pid else None)
        return data


def process_start(pid: int) -> float:
    """When ``pid`` started, on CLOCK_BOOTTIME (the kernel's own record, ``/proc/<pid>/stat`` field 22).

    The kernel's record is right for a child spawned before the event loop
    too, and no wall-clock jump moves it; now, when it cannot be read.
    """
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return now
    return min(ticks / os.sysconf("SC_CLK_TCK"), now)


@dataclass
class ModuleStatus:
    name: str
    database_identity: str | None = None
    published_hash: str | None = None
    # "pending", "created", "updated", "unchanged", "failed: <message>"
    publish_result: str = "pending"
    serving: bool = False
    ownership: str = "unknown"  # "unclaimed", "claimed", "not-pogly", "disabled", "unknown"
    owner_identity: str | None = None
    claimed_by: str | None = None  # how: "auto-claim sub=…", "existing", …

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def result(self) -> str:
        """``publish_result`` without its message: one of ``PUBLISH_RESULTS``."""
        return self.publish_result.split(":", 1)[0]

    def update_failure(self) -> str | None:
        """The server's message when the last update of this module was refused, else None."""
        head, sep, message = self.publish_result.partition(":")
        return message.strip() if sep and head == "failed" else None


@dataclass
class Status:
    children: dict[str, ChildStatus] = field(default_factory=dict)
    modules: dict[str, ModuleStatus] = field(default_factory=dict)
    # "pending", "verified", "unverified" (unreachable; re-checking), "failed", "disabled" (OIDC off)
    oidc: str = "pending"
    # Which web build is served (webapp.py): verdict, reason, index_loads_config, index_patched.
    webapp: dict[str, Any] = field(default_factory=lambda: {"verdict": "pending"})
    publisher_identity: str | None = None
    shutting_down: bool = False
    # A child that is up but no longer answers (name -> why), e.g. a frozen SpacetimeDB: its process
    # and port are still there, so only asking it tells.  Filled when /readyz or /status is asked.
    unanswered: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    # The supervisor's PID: `pogly-entrypoint owner set` writes its event into this process's stdout
    # (the container log), and an operator can tell which process answers.
    pid: int = field(default_factory=os.getpid)
    ready_seconds: float | None = None  # the supervisor's start to the first time everything was ready
    stop_seconds: float | None = None  # the last shutdown: stop request to every child stopped

    def child(self, name: str) -> ChildStatus:
        return self.children.setdefault(name, ChildStatus(name))

    def module(self, name: str) -> ModuleStatus:
        return self.modules.setdefault(name, ModuleStatus(name))

    def not_ready(self) -> list[str]:
        """Why the container is not ready; empty when it is."""
        reasons: list[str] = []
        if self.shutting_down:
            reasons.append("shutting down")
        if self.oidc == "pending":  # a provider that answers wrongly must fail us before we serve
            reasons.append("oidc: checking the provider")
        for name in ("spacetimedb", "caddy"):
            child = self.children.get(name)
            if child is None or child.state != READY:
                reasons.append(f"{name}: {child.describe() if child else 'not started'}")
            elif name in self.unanswered:
                reasons.append(f"{name}: {self.unanswered[name]}")
        for module in self.modules.values():
            # A refused update is not ready even though the previous module still runs inside
            # SpacetimeDB: the web app of the image being rolled out talks to the old schema, and
            # a not-Ready pod is the one signal `kubectl rollout status` / `flux --wait` read.
            failure = module.update_failure()
            if failure is not None:
                reasons.append(f"module {module.name}: update failed: {failure}")
            elif not module.serving:
                reasons.append(f"module {module.name}: {module.publish_result}")
        return reasons

    def to_json(self) -> dict[str, Any]:
        reasons = self.not_ready()
        return {
            "ready": not reasons,
            "not_ready": reasons,
            "shutting_down": self.shutting_down,
            "oidc": self.oidc,
            "webapp": self.webapp,
            "publisher_identity": self.publisher_identity,
            "started_at": self.started_at,
            "pid": self.pid,
            "ready_seconds": self.ready_seconds,
            "stop_seconds": self.stop_seconds,
            "children": {k: v.to_json() for k, v in self.children.items()},
            "modules": {k: v.to_json() for k, v in self.modules.items()},
        }
