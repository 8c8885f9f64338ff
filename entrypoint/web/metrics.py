"""``/metrics``: the supervisor's ``Status`` as Prometheus text exposition (format 0.0.4).

Why hand-written rather than ``prometheus_client``: PID 1 should carry as
little as possible (issue #15 counts its RSS), and what is exported here is a
snapshot of one object the supervisor already keeps, not counters updated on
hot paths.  Rendering is a pure function of that object, computed per scrape
(a few hundred bytes), so the numbers can never disagree with ``/status`` and
``/readyz``.  ``tests/test_metrics.py`` parses the output with the reference
parser (``prometheus_client.parser``) to prove it is valid exposition.

States are one-hot gauges (one sample per possible value, exactly one of them
1) so that a query such as ``pogly_child_state{state="backoff"} == 1`` works
and a value never seen before still appears (added as its own label value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from entrypoint.supervision.status import OIDC_VERDICTS, PUBLISH_RESULTS, READY, STATES, Status
from entrypoint.version import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Sequence[tuple[str, str]]
Sample = tuple[Labels, float]


def escape_label(value: str) -> str:
    """A label value as the exposition format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """HELP and TYPE lines, then one line per sample (a family without samples still says what it is)."""
    lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels)
        lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return lines


def _one_hot(label: str, known: Sequence[str], current: str, extra: Labels = ()) -> list[Sample]:
    values = list(known) if current in known else [*known, current]
    return [((*extra, (label, value)), 1 if value == current else 0) for value in values]


def render(status: Status) -> str:
    """The whole exposition text for ``status``, ending with a newline."""
    children = sorted(status.children.values(), key=lambda c: c.name)
    modules = sorted(status.modules.values(), key=lambda m: m.name)
    out: list[str] = []
    out += _family("pogly_build_info", "gauge", "The running pogly-entrypoint; the version is in the label.",
                   [((("version", __version__),), 1)])
    out += _family("pogly_process_start_time_seconds", "gauge",
                   "When the supervisor started, in seconds since the Unix epoch.", [((), status.started_at)])
    out += _family("pogly_ready", "gauge",
                   "1 when /readyz answers 200 (children ready, modules published, OIDC checked), else 0.",
                   [((), 0 if status.not_ready() else 1)])
    out += _family("pogly_start_seconds", "gauge",
                   "Seconds from the supervisor's start until everything was first ready (absent until then).",
                   [((), status.ready_seconds)] if status.ready_seconds is not None else [])
    out += _family("pogly_last_stop_seconds", "gauge",
                   "Seconds the last shutdown took, from the stop request until every child had exited.",
                   [((), status.stop_seconds)] if status.stop_seconds is not None else [])
    out += _family("pogly_oidc_verdict", "gauge",
                   "The OIDC provider check: 1 for the current verdict (pending, rechecking, verified, unverified, "
                   "failed, disabled), 0 for the others.",
                   _one_hot("verdict", OIDC_VERDICTS, status.oidc))
    out += _family("pogly_child_up", "gauge", "1 while the child is running and ready, else 0.",
                   [((("child", c.name),), 1 if c.state == READY and c.pid is not None else 0) for c in children])
    out += _family("pogly_child_state", "gauge",
                   "The child's state: 1 for the current one (starting, ready, backoff, stopping, stopped, "
                   "failed), 0 for the others.",
                   [s for c in children for s in _one_hot("state", STATES, c.state, (("child", c.name),))])
    out += _family("pogly_child_restarts_total", "counter", "Times the supervisor restarted the child.",
                   [((("child", c.name),), c.restarts) for c in children])
    out += _family("pogly_child_last_exit_code", "gauge",
                   "Exit status of the child's last run (128+N when killed by signal N); absent before the "
                   "first exit.",
                   [((("child", c.name),), c.last_exit_code) for c in children if c.last_exit_code is not None])
    out += _family("pogly_child_start_seconds", "gauge",
                   "Seconds the child's latest run took from launch to ready.",
                   [((("child", c.name),), c.ready_seconds) for c in children if c.ready_seconds is not None])
    out += _family("pogly_child_last_stop_seconds", "gauge",
                   "Seconds the child's last stop took, from its stop signal to its exit.",
                   [((("child", c.name),), c.stop_seconds) for c in children if c.stop_seconds is not None])
    out += _family("pogly_module_publish", "gauge",
                   "The module's last publish: 1 for the current result (pending, created, updated, unchanged, "
                   "failed), 0 for the others. failed: an update was refused, the previous module still runs "
                   "and the container is not ready.",
                   [s for m in modules for s in _one_hot("result", PUBLISH_RESULTS, m.result(), (("module", m.name),))])
    out += _family("pogly_module_serving", "gauge",
                   "1 while a version of the module (the new one, or the previous one after a failed update) "
                   "runs in SpacetimeDB.",
                   [((("module", m.name),), 1 if m.serving else 0) for m in modules])
    out += _family("pogly_module_owner_claimed", "gauge",
                   "1 once the module's database has an owner (auto-claimed, set, or found owned), else 0.",
                   [((("module", m.name),), 1 if m.ownership == "claimed" else 0) for m in modules])
    return "\n".join(out) + "\n"
