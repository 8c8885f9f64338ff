"""The restart policy as a pure state machine, driven by a fake clock."""

from __future__ import annotations

import itertools

from entrypoint.supervision.restart import RestartPolicy


def policy(**kw: object) -> RestartPolicy:
    return RestartPolicy(rng=lambda: 1.0, **kw)  # type: ignore[arg-type]


def test_first_restart_is_within_200ms_and_gaps_grow_to_the_cap() -> None:
    p = RestartPolicy(rng=lambda: 0.999, loop_deaths=100)
    now, delays = 0.0, []
    for _ in range(12):
        verdict = p.on_death(now, now - 1)
        assert not verdict.crash_loop
        delays.append(verdict.delay)
        now += verdict.delay + 1 + 200  # deaths far apart: never a crash loop
    assert delays[0] <= 0.2
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert max(delays) == 30.0


def test_five_deaths_within_120s_is_a_crash_loop() -> None:
    p = policy()
    now = 1000.0
    verdicts = []
    for _ in range(5):
        verdicts.append(p.on_death(now, now - 0.5))
        now += 10
    assert [v.crash_loop for v in verdicts] == [False, False, False, False, True]
    assert verdicts[-1].deaths_in_window == 5


def test_deaths_spread_over_more_than_the_window_are_not_a_loop() -> None:
    p = policy()
    now = 0.0
    for _ in range(20):
        verdict = p.on_death(now, now - 1)
        assert not verdict.crash_loop
        now += 31  # 4 deaths per 120 s at most


def test_backoff_resets_after_60s_healthy() -> None:
    p = policy(loop_deaths=100)
    d1 = p.on_death(10, 9).delay
    d2 = p.on_death(20, 19).delay
    assert d2 > d1
    d3 = p.on_death(200, 100).delay  # ran 100 s: healthy, start over
    assert d3 == d1


def test_jitter_stays_within_bounds() -> None:
    low = RestartPolicy(rng=lambda: 0.0).on_death(0, 0).delay
    high = RestartPolicy(rng=lambda: 1.0).on_death(0, 0).delay
    assert low == 0.1 and high == 0.2
