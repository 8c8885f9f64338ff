"""``/metrics``: the renderer, the health server, real Caddy, and the whole program.

Every exposition text is read back with the reference parser
(``prometheus_client.parser``, test extra only: PID 1 does not carry it), so
"valid Prometheus text" is proven, not assumed.  The values are compared with
``/status``, which reads the same ``Status`` object.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from entrypoint.supervision.status import (
    BACKOFF,
    OIDC_VERDICTS,
    PUBLISH_RESULTS,
    READY,
    STATES,
    STOPPED,
    Status,
)
from entrypoint.version import __version__
from entrypoint.web import caddy, metrics
from entrypoint.web.health import HealthServer, answer
from tests import caddyhelp as ch
from tests.harness import Running, base_env

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAIL_MARKER = b"standin:fail-publish"  # tests/standin: a module with these bytes is refused

# Every family the renderer promises, with its type (docs/operations.md, "Metrics", lists the same: tested).
FAMILIES = {
    "pogly_build_info": "gauge",
    "pogly_process_start_time_seconds": "gauge",
    "pogly_ready": "gauge",
    "pogly_start_seconds": "gauge",
    "pogly_last_stop_seconds": "gauge",
    "pogly_oidc_verdict": "gauge",
    "pogly_child_up": "gauge",
    "pogly_child_state": "gauge",
    "pogly_child_restarts": "counter",  # the parser names a counter family without its _total
    "pogly_child_last_exit_code": "gauge",
    "pogly_child_start_seconds": "gauge",
    "pogly_child_last_stop_seconds": "gauge",
    "pogly_module_publish": "gauge",
    "pogly_module_serving": "gauge",
    "pogly_module_owner_claimed": "gauge",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """``({family: type}, {(sample name, labels): value})`` via the reference parser; duplicates fail."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} appears twice"
        assert family.documentation, f"{family.name} has no HELP text"
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str, label: str, **fixed: str) -> dict[str, float]:
    """``{label value: sample value}`` of ``name``'s samples that carry ``fixed``."""
    out = {}
    for (sample, labels), v in samples.items():
        found = dict(labels)
        if sample == name and all(found.get(k) == w for k, w in fixed.items()):
            out[found[label]] = v
    return out


def busy_status() -> Status:
    """A status with something in every field: a restarted child, a failed update, a claimed module."""
    status = ch.ready_status()
    spacetime = status.child("spacetimedb")
    spacetime.pid, spacetime.restarts, spacetime.last_exit, spacetime.last_exit_code = 41, 2, "killed by SIGKILL", 137
    spacetime.ready_seconds = 0.25
    caddy = status.child("caddy")
    caddy.pid, caddy.ready_seconds = 42, 0.125
    pogly = status.module("pogly")
    pogly.publish_result, pogly.ownership = "unchanged", "claimed"
    second = status.module("second")
    second.publish_result, second.serving = "failed: 500: Database update rejected", True
    status.ready_seconds = 1.5
    return status


# -- the renderer ------------------------------------------------------------------------


def test_every_family_is_valid_exposition_with_help_and_type() -> None:
    text = metrics.render(busy_status())
    assert text.endswith("\n")
    types, samples = parse(text)
    assert types == FAMILIES
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert line.split()[2].startswith("pogly_")
        assert line.startswith(("# HELP pogly_", "# TYPE pogly_", "pogly_")), line
    assert value(samples, "pogly_build_info", version=__version__) == 1
    assert value(samples, "pogly_child_restarts_total", child="spacetimedb") == 2


def test_children_up_state_restarts_exit_code_and_durations() -> None:
    status = busy_status()
    status.child("caddy").state, status.child("caddy").pid = BACKOFF, None
    status.child("caddy").last_exit_code = 1
    _, samples = parse(metrics.render(status))
    assert value(samples, "pogly_child_up", child="spacetimedb") == 1
    assert value(samples, "pogly_child_up", child="caddy") == 0
    for child, current in (("spacetimedb", READY), ("caddy", BACKOFF)):
        states = labelled(samples, "pogly_child_state", "state", child=child)
        assert set(states) == set(STATES) and states[current] == 1 and sum(states.values()) == 1
    assert value(samples, "pogly_child_last_exit_code", child="spacetimedb") == 137
    assert value(samples, "pogly_child_last_exit_code", child="caddy") == 1
    assert value(samples, "pogly_child_start_seconds", child="spacetimedb") == 0.25
    assert value(samples, "pogly_start_seconds") == 1.5
    # No stop yet: the families are declared, without samples.
    assert not labelled(samples, "pogly_child_last_stop_seconds", "child")
    assert ("pogly_last_stop_seconds", frozenset()) not in samples
    status.child("caddy").state, status.child("caddy").stop_seconds, status.stop_seconds = STOPPED, 0.5, 2.0
    _, samples = parse(metrics.render(status))
    assert value(samples, "pogly_child_last_stop_seconds", child="caddy") == 0.5
    assert value(samples, "pogly_last_stop_seconds") == 2.0


def test_a_state_never_seen_before_still_gets_its_sample() -> None:
    status = busy_status()
    status.child("caddy").state = "reloading"
    _, samples = parse(metrics.render(status))
    states = labelled(samples, "pogly_child_state", "state", child="caddy")
    assert states["reloading"] == 1 and sum(states.values()) == 1


@pytest.mark.parametrize("verdict", OIDC_VERDICTS)
def test_oidc_verdict_is_one_hot(verdict: str) -> None:
    status = busy_status()
    status.oidc = verdict
    _, samples = parse(metrics.render(status))
    verdicts = labelled(samples, "pogly_oidc_verdict", "verdict")
    assert set(verdicts) == set(OIDC_VERDICTS)
    assert verdicts[verdict] == 1 and sum(verdicts.values()) == 1


def test_module_publish_state_ownership_and_a_failed_update() -> None:
    status = busy_status()
    _, samples = parse(metrics.render(status))
    pogly = labelled(samples, "pogly_module_publish", "result", module="pogly")
    second = labelled(samples, "pogly_module_publish", "result", module="second")
    assert set(pogly) == set(second) == set(PUBLISH_RESULTS)
    assert pogly["unchanged"] == 1 and sum(pogly.values()) == 1
    assert second["failed"] == 1 and sum(second.values()) == 1
    assert value(samples, "pogly_module_serving", module="second") == 1, "the previous module still runs"
    assert value(samples, "pogly_module_owner_claimed", module="pogly") == 1
    assert value(samples, "pogly_module_owner_claimed", module="second") == 0
    # A failed update is not ready, with a reason that names it.
    assert value(samples, "pogly_ready") == 0
    assert status.not_ready() == ["module second: update failed: 500: Database update rejected"]
    status.module("second").publish_result = "updated"
    _, samples = parse(metrics.render(status))
    assert value(samples, "pogly_ready") == 1 and status.not_ready() == []


def test_label_values_are_escaped() -> None:
    status = Status()
    nasty = 'a"b\\c\nd'
    status.child(nasty).state = READY
    text = metrics.render(status)
    assert 'child="a\\"b\\\\c\\nd"' in text
    assert "\nd" not in text.replace("\\nd", "")  # the newline never reaches the text unescaped
    _, samples = parse(text)
    assert value(samples, "pogly_child_state", child=nasty, state=READY) == 1
    assert metrics.escape_label('\\"\n') == '\\\\\\"\\n'


def test_process_start_time_is_the_status_start() -> None:
    status = Status()
    _, samples = parse(metrics.render(status))
    assert value(samples, "pogly_process_start_time_seconds") == pytest.approx(status.started_at)
    assert value(samples, "pogly_ready") == 0  # nothing has started


def test_the_operations_guide_lists_every_metric_with_its_type_and_labels() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = doc.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `pogly_") and len(cells) == 4:
            labels = {c.strip(" `") for c in cells[2].split(",") if c.strip()}
            rows[cells[0].strip("`")] = (cells[1], labels)
    types, samples = parse(metrics.render(busy_status()))
    documented = {name.removesuffix("_total") if kind == "counter" else name: kind
                  for name, (kind, _) in rows.items()}
    assert documented == types
    for (sample, labels), _ in samples.items():
        assert {k for k, _ in labels} == rows[sample][1], sample


def test_answer_serves_metrics_with_the_exposition_content_type() -> None:
    from entrypoint.web.health import content_type

    code, body = answer(busy_status(), "/metrics")
    assert code == 200
    parse(body.decode())
    assert content_type("/metrics", 200).decode() == CONTENT_TYPE
    assert content_type("/readyz", 200) == b"application/json"


# -- the health server --------------------------------------------------------------------


def test_metrics_over_http_from_the_health_server() -> None:
    async def main() -> None:
        status = busy_status()
        async with HealthServer(status, "127.0.0.1", 0) as server, \
                httpx.AsyncClient(trust_env=False, timeout=5) as client:
            url = f"http://127.0.0.1:{server.port}/metrics"
            response = await client.get(url)
            assert response.status_code == 200
            assert response.headers["content-type"] == CONTENT_TYPE
            assert response.headers["cache-control"] == "no-store"
            _, samples = parse(response.text)
            assert value(samples, "pogly_child_restarts_total", child="spacetimedb") == 2
            head = await client.head(url)
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-type"] == CONTENT_TYPE
            post = await client.post(url)
            assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
            # Each scrape renders the live status.
            status.child("spacetimedb").restarts = 3
            _, samples = parse((await client.get(url)).text)
            assert value(samples, "pogly_child_restarts_total", child="spacetimedb") == 3

    asyncio.run(main())


# -- the public port, through a real Caddy ------------------------------------------------


@pytest.fixture(scope="module")
def bg() -> Iterator[ch.BackgroundLoop]:
    loop = ch.BackgroundLoop()
    yield loop
    loop.close()


@pytest.mark.parametrize("public_metrics", [False, True], ids=["private", "public"])
def test_the_caddyfile_stays_caddy_fmt_clean(tmp_path: Path, public_metrics: bool) -> None:
    settings = ch.base_settings(tmp_path, public_metrics=public_metrics)
    path = caddy.write(settings, text := caddy.render(settings))
    fmt = subprocess.run([ch.CADDY_BIN, "fmt", str(path)], capture_output=True, text=True, timeout=30, check=True)
    assert fmt.stdout == text
    probes = [line.strip() for line in text.splitlines() if line.strip().startswith("@probes ")]
    assert probes == (["@probes path /livez /readyz /metrics"] if public_metrics else ["@probes path /livez /readyz"])


@pytest.mark.parametrize("public_metrics", [False, True], ids=["private", "public"])
def test_public_metrics_only_when_asked(bg: ch.BackgroundLoop, tmp_path: Path, public_metrics: bool) -> None:
    stack = bg.run(ch.start_stack(tmp_path, public_metrics=public_metrics))
    try:
        with httpx.Client(trust_env=False, timeout=10) as client:
            loopback = client.get(f"http://127.0.0.1:{stack.health.port}/metrics")
            assert loopback.status_code == 200 and loopback.headers["content-type"] == CONTENT_TYPE
            parse(loopback.text)
            public = client.get(f"{stack.url}/metrics")
            if not public_metrics:
                assert public.status_code == 403
                assert public.text.startswith("403 Forbidden: ")
                assert "pogly_" not in public.text
            else:
                assert public.status_code == 200 and public.headers["content-type"] == CONTENT_TYPE
                _, samples = parse(public.text)
                assert value(samples, "pogly_ready") == 1
            # Only /metrics itself: what is below it stays SpacetimeDB's, and forbidden.
            assert client.get(f"{stack.url}/metrics/extra").status_code == 403
            assert client.get(f"{stack.url}/status").status_code == 403
            assert not stack.upstream.saw("GET", "/metrics")
    finally:
        assert bg.run(ch.stop_stack(stack)) == 0


# -- the whole program ------------------------------------------------------------------------


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5, trust_env=False)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse(response.text)[1]


def assert_consistent(samples: Samples, status: dict[str, object]) -> None:
    """The metrics say what ``/status`` says."""
    assert value(samples, "pogly_ready") == (1 if status["ready"] else 0)
    assert labelled(samples, "pogly_oidc_verdict", "verdict")[str(status["oidc"])] == 1
    assert value(samples, "pogly_process_start_time_seconds") == status["started_at"]
    children = status["children"]
    assert isinstance(children, dict)
    for name, child in children.items():
        assert value(samples, "pogly_child_restarts_total", child=name) == child["restarts"]
        assert labelled(samples, "pogly_child_state", "state", child=name)[child["state"]] == 1
        assert value(samples, "pogly_child_up", child=name) == (1 if child["state"] == READY else 0)
    modules = status["modules"]
    assert isinstance(modules, dict)
    for name, module in modules.items():
        result = module["publish_result"].split(":", 1)[0]
        assert labelled(samples, "pogly_module_publish", "result", module=name)[result] == 1
        assert value(samples, "pogly_module_serving", module=name) == (1 if module["serving"] else 0)
        assert value(samples, "pogly_module_owner_claimed", module=name) == (
            1 if module["ownership"] == "claimed" else 0)


def urls(env: dict[str, str]) -> tuple[str, str]:
    """The health address and the public port."""
    return f"http://{env['POGLY_HEALTH_ADDR']}", f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"


def test_end_to_end_metrics_on_both_addresses_match_status(tmp_path: Path) -> None:
    """The program with the stand-in and real Caddy, POGLY_PUBLIC_METRICS=true: the same numbers everywhere."""
    env = base_env(tmp_path, POGLY_PUBLIC_METRICS="true")
    health, public = urls(env)
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.wait_event("publish.created", timeout=10)
        status = httpx.get(f"{health}/status", timeout=5).json()
        for url in (health, public):
            samples = scrape(f"{url}/metrics")
            assert_consistent(samples, status)
            assert value(samples, "pogly_build_info", version=__version__) == 1
            assert value(samples, "pogly_start_seconds") == status["ready_seconds"] > 0
            assert labelled(samples, "pogly_module_publish", "result", module="pogly")["created"] == 1
            for child in ("spacetimedb", "caddy"):
                assert value(samples, "pogly_child_up", child=child) == 1
                assert value(samples, "pogly_child_start_seconds", child=child) > 0
        run.stop()


@pytest.mark.timeout(300)
def test_a_refused_update_is_not_ready_until_rolled_back(tmp_path: Path) -> None:
    """Release 2's module is refused (after SpacetimeDB's 500s are retried for 60 s): 503 and failed=1; rollback."""
    env = base_env(tmp_path)
    health, public = urls(env)
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert httpx.get(f"{public}/readyz", timeout=5).status_code == 200
        run.stop()
    # A release whose module the server refuses: the previous module keeps running, the pod is not ready.
    wasm = Path(env["POGLY_MODULE_DIR"]) / "pogly.wasm"
    released = wasm.read_bytes()
    wasm.write_bytes(released + FAIL_MARKER)
    with Running(env) as run:
        failed = run.wait_event("publish.failed", timeout=150)
        assert "update rejected" in failed["server_message"]
        up = run.wait_event("entrypoint.up_not_ready", timeout=30)  # never "entrypoint.ready" while /readyz is 503
        assert up["level"] == "warning" and up["not_ready"][0].startswith("module pogly: update failed: ")
        assert not run.find(lambda e: e.get("event") == "entrypoint.ready")
        readyz = httpx.get(f"{public}/readyz", timeout=5)
        assert readyz.status_code == 503
        reasons = readyz.json()["not_ready"]
        assert [r for r in reasons if r.startswith("module pogly: update failed: ")] == reasons, reasons
        status = httpx.get(f"{health}/status", timeout=5).json()
        samples = scrape(f"{health}/metrics")
        assert_consistent(samples, status)
        assert labelled(samples, "pogly_module_publish", "result", module="pogly")["failed"] == 1
        assert value(samples, "pogly_module_serving", module="pogly") == 1
        assert value(samples, "pogly_ready") == 0
        # The old module still answers inside the pod.
        ping = httpx.get(f"http://{env['POGLY_SPACETIME_ADDR']}/v1/database/pogly/identity", timeout=5)
        assert ping.status_code == 200
        run.stop()

    # Rollback: the previous image's module is unchanged, and the pod is ready again.
    wasm.write_bytes(released)
    with Running(env) as run:
        run.wait_event("publish.unchanged", timeout=60)
        run.wait_event("entrypoint.ready", timeout=30)
        assert httpx.get(f"{public}/readyz", timeout=5).status_code == 200
        samples = scrape(f"{health}/metrics")
        assert labelled(samples, "pogly_module_publish", "result", module="pogly")["unchanged"] == 1
        assert value(samples, "pogly_ready") == 1
        run.stop()
