"""From raw runs to medians, ratios to the floor, issue 15's targets, and Markdown tables.

Pure functions over plain data (tested in tests/test_bench_harness.py): no processes, no clocks.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FLOOR = "floor"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "ms", "MB", "/s", "lines/s", "" (a count or a code)
    digits: int = 0
    ratio: bool = True  # shown as a ratio to the floor


METRICS: tuple[Metric, ...] = (
    Metric("ready_first_ms", "ready, first boot", "ms"),
    Metric("ready_restart_ms", "ready, restart (publish skipped)", "ms"),
    Metric("stop_ms", "SIGTERM → exit (with a writer)", "ms"),
    Metric("exit_code", "exit code on SIGTERM", "", ratio=False),
    Metric("writes_lost", "acknowledged writes lost", "", ratio=False),
    Metric("writes_acked", "… of acknowledged writes", "", ratio=False),
    Metric("kill_ready_again_ms", "SIGKILL SpacetimeDB → ready again", "ms"),
    Metric("kill_child_start_ms", "… the new child's own start (spawn → ping)", "ms"),
    Metric("kill_over_child_ms", "… ready again minus the child's own start", "ms"),
    Metric("idle_rss_mb", "idle RSS of PID 1", "MB", 1),
    Metric("idle_tree_pss_mb", "idle PSS of the whole namespace", "MB", 1),
    Metric("wakeups_unclaimed", "PID 1 wake-ups, idle (unclaimed)", "/s", 1),
    Metric("wakeups_claimed", "PID 1 wake-ups, idle (claimed)", "/s", 1),
    Metric("relay_lines_per_s", "log relay, 200k-line burst", "lines/s"),
    Metric("relay_lines_lost", "… burst lines lost or garbled (interleaved with another writer)", "", ratio=False),
    Metric("relay_lines_dropped_reported", "… of them dropped by PID 1 and reported (`logs.dropped`)", "",
           ratio=False),
    Metric("relay_peak_rss_mb", "PID 1 peak RSS (VmHWM) with the burst", "MB", 1),
    Metric("boot_peak_rss_mb", "PID 1 peak RSS (VmHWM), normal boot", "MB", 1),
)


def median(values: Iterable[float | int | None]) -> float | None:
    """Median of the measured values; ``None`` (not measured, or never happened) is left out."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, floor: float | None) -> float | None:
    """``value / floor``, or None when either is missing or the floor is 0 (no meaningful ratio)."""
    if value is None or floor is None or floor == 0:
        return None
    return value / floor


def medians(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """``{subject: {metric: median over that subject's runs}}`` for every metric in METRICS."""
    out: dict[str, dict[str, float | None]] = {}
    for subject, results in runs.items():
        out[subject] = {m.key: median(r.get(m.key) for r in results) for m in METRICS}
    return out


def fmt(value: float | None, metric: Metric) -> str:
    if value is None:
        return "—"
    if metric.unit == "lines/s":
        return f"{value / 1000:,.0f}k lines/s"
    if metric.unit == "":
        return f"{value:g}"
    number = f"{value:,.{metric.digits}f}"
    return f"{number} {metric.unit}" if metric.unit != "/s" else f"{number}/s"


def fmt_ratio(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}×)"


def observed(runs: Sequence[Mapping[str, Any]], key: str) -> str:
    """Every run's value of a non-numeric-median metric (exit codes, losses): ``143, 143, 143``."""
    values = [r.get(key) for r in runs]
    return ", ".join("—" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def summary_table(runs: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str]) -> str:
    """Markdown: one row per metric, one column per subject, ``median (ratio to the floor)``.

    Counts and codes (no ratio) show every run's value instead of a median.
    """
    meds = medians(runs)
    subjects = list(runs)
    lines = ["| metric | " + " | ".join(labels.get(s, s) for s in subjects) + " |",
             "|---|" + "---|" * len(subjects)]
    for metric in METRICS:
        cells = []
        for subject in subjects:
            if not metric.ratio:
                cells.append(observed(runs[subject], metric.key))
                continue
            value = meds[subject][metric.key]
            r = None if subject == FLOOR else ratio(value, meds.get(FLOOR, {}).get(metric.key))
            cells.append(fmt(value, metric) + fmt_ratio(r))
        lines.append(f"| {metric.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    limit: str
    met: bool | None  # None: could not be evaluated (not measured)
    by: str  # how far from the limit, e.g. "+0.62× over" / "0.41× under"


def evaluate_targets(meds: Mapping[str, Mapping[str, float | None]], runs: Mapping[str, Sequence[Mapping[str, Any]]],
                     us: str = "pogly", relay_rss_bound_mb: float = 5.0) -> list[Target]:
    """Issue 15, item 2: each target against its ratio or value in the same run."""
    ours = meds.get(us, {})
    floor = meds.get(FLOOR, {})
    out: list[Target] = []

    def ratio_target(name: str, key: str, limit: float) -> None:
        r = ratio(ours.get(key), floor.get(key))
        if r is None:
            out.append(Target(name, "not measured", f"≤ {limit:.1f}×", None, ""))
            return
        out.append(Target(name, f"{r:.2f}× ({ours[key]:.0f} vs {floor[key]:.0f} ms)", f"≤ {limit:.1f}×",
                          r <= limit, _by(r, limit, "×")))

    def value_target(name: str, value: float | None, limit: float, unit: str, *, at_least: bool = False,
                     shown: str | None = None) -> None:
        if value is None:
            out.append(Target(name, "not measured", f"{'≥' if at_least else '≤'} {limit:g} {unit}", None, ""))
            return
        met = value >= limit if at_least else value <= limit
        out.append(Target(name, shown or f"{value:,.1f} {unit}", f"{'≥' if at_least else '≤'} {limit:g} {unit}",
                          met, _by(value, limit, f" {unit}", at_least=at_least)))

    ratio_target("ready, first boot", "ready_first_ms", 2.0)
    ratio_target("ready, first boot (stretch)", "ready_first_ms", 1.5)
    ratio_target("ready, restart", "ready_restart_ms", 1.5)
    value_target("idle RSS of PID 1", ours.get("idle_rss_mb"), 30.0, "MB")
    value_target("wake-ups once claimed", ours.get("wakeups_claimed"), 0.0, "/s")
    value_target("wake-ups while unclaimed", ours.get("wakeups_unclaimed"), 1.0, "/s")
    ratio_target("stop", "stop_ms", 1.5)
    lost = [r.get("writes_lost") for r in runs.get(us, ())]
    measured_lost = [v for v in lost if v is not None]
    out.append(Target("acknowledged writes lost on stop", ", ".join(str(v) for v in lost) or "not measured", "0",
                      (max(measured_lost) == 0) if measured_lost else None,
                      "" if not measured_lost or max(measured_lost) == 0 else f"+{max(measured_lost)}"))
    value_target("SIGKILL SpacetimeDB → ready again, beyond the child's own start", ours.get("kill_over_child_ms"),
                 500.0, "ms")
    rate, lost_lines = ours.get("relay_lines_per_s"), ours.get("relay_lines_lost")
    value_target("log relay (no line lost)", rate, 50_000.0, "lines/s", at_least=True,
                 shown=None if rate is None else f"{rate:,.0f} lines/s, {lost_lines or 0:,.0f} lost")
    if rate is not None and lost_lines:  # fast because it dropped lines is not a relay
        out[-1] = Target(out[-1].name, out[-1].measured, out[-1].limit, False, f"{lost_lines:,.0f} lines lost")
    peak, base = ours.get("relay_peak_rss_mb"), ours.get("boot_peak_rss_mb")
    growth = None if peak is None or base is None else peak - base
    value_target(f"log relay: peak RSS growth over a normal boot (bounded: ≤ {relay_rss_bound_mb:g} MB)", growth,
                 relay_rss_bound_mb, "MB")
    return out


def _by(value: float, limit: float, unit: str, *, at_least: bool = False) -> str:
    diff = value - limit
    if at_least:
        return f"{-diff:,.2f}{unit} short" if diff < 0 else f"{diff:,.2f}{unit} to spare"
    return f"{diff:,.2f}{unit} over" if diff > 0 else f"{-diff:,.2f}{unit} to spare"


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| target (issue 15, item 2) | measured | limit | verdict |", "|---|---|---|---|"]
    for t in targets:
        verdict = "not measured" if t.met is None else ("**met**" if t.met else "**missed**")
        if t.by and t.met is not None:
            verdict += f" ({t.by})"
        lines.append(f"| {t.name} | {t.measured} | {t.limit} | {verdict} |")
    return "\n".join(lines)


def timeline_table(timelines: Sequence[Mapping[str, float]], since: str = "launch") -> str:
    """Median time after ``since`` of each event, in the order of those medians."""
    order: dict[str, float] = {}
    for tl in timelines:
        for event, at in tl.items():
            order.setdefault(event, at)
    rows = sorted(order, key=lambda e: median(tl.get(e) for tl in timelines) or 0.0)
    lines = [f"| event | ms after {since} (median) |", "|---|---|"]
    for event in rows:
        value = median(tl.get(event) for tl in timelines)
        lines.append(f"| `{event}` | {'—' if value is None else f'{value:,.0f}'} |")
    return "\n".join(lines)
