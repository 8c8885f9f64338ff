"""When to restart a child that died, and when to give up.

A pure state machine over an injected clock: the supervisor feeds it deaths,
it answers "restart after N seconds" or "crash loop".  No sleeping here, so the
policy is tested exhaustively without waiting (honcho's FakeClock idea).

Why give up at all: a child that dies five times in two minutes will not be
fixed by a sixth try.  Exiting with its code hands the problem to the
orchestrator (Kubernetes' CrashLoopBackOff, Docker's restart policy), whose
backoff and events operators already watch, and the last log lines say why.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verdict:
    crash_loop: bool
    delay: float = 0.0
    deaths_in_window: int = 0


@dataclass
class RestartPolicy:
    """Restart pauses from ``delays()``, the count reset by a healthy run, and the crash-loop verdict."""

    first_delay: float = 0.1
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 1.0  # up to +100 %: the first restart lands within 0.1-0.2 s
    healthy_after: float = 60.0
    loop_deaths: int = 5
    loop_window: float = 120.0
    rng: Callable[[], float] = random.random
    _deaths: deque[float] = field(default_factory=deque)
    _pauses: Iterator[float] | None = None

    def on_death(self, now: float, started_at: float) -> Verdict:
        """Record a death at ``now`` of a run that began at ``started_at`` (both from the same clock)."""
        if self._pauses is None or now - started_at >= self.healthy_after:
            self._pauses = delays(self.first_delay, self.cap, factor=self.factor, jitter=self.jitter, rng=self.rng)
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.loop_window:
            self._deaths.popleft()
        if len(self._deaths) >= self.loop_deaths:
            return Verdict(True, 0.0, len(self._deaths))
        return Verdict(False, next(self._pauses), len(self._deaths))


def delays(first: float, cap: float, *, factor: float = 2.0, jitter: float = 0.0,
           rng: Callable[[], float] = random.random) -> Iterator[float]:
    """The one backoff: ``first``, ``first·factor``, … capped at ``cap``, forever.

    Every retry loop in the program (restarts, the lock wait, HTTP and OIDC
    retries, ownership polling, module-log reconnects) draws its pauses from
    here, so they all grow, cap and spread the same way.  ``jitter`` stretches
    each delay by up to that fraction (``rng`` injected so tests are exact):
    many pods restarted together should not retry in step.
    """
    base = first
    while True:
        yield min(cap, base * (1.0 + jitter * rng()))
        base = min(cap, base * factor)
