"""The OIDC check as the running program applies it: fatal, unverified, or verified later.

The provider is the real ``oidc-provider`` (tests/js/oidc_server.mjs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import Running, base_env, free_port
from tests.oidc.fixtures import node_provider


@pytest.mark.pid1
def test_verified_provider_is_reported_in_status(tmp_path: Path) -> None:
    with node_provider("--shape", "keycloak") as provider:
        env = base_env(tmp_path, OIDC_ISSUER=provider.issuer)
        with Running(env, pid1=True) as run:
            ready = run.wait_event("entrypoint.ready", timeout=60)
            assert ready["oidc"] == "verified"
            assert run.find(lambda e: e.get("event") == "oidc.verified" and e.get("service") == "oidc")
            status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status").json()
            assert status["oidc"] == "verified"
            run.stop()


@pytest.mark.pid1
def test_issuer_off_by_a_trailing_slash_exits_78_before_ready(tmp_path: Path) -> None:
    with node_provider("--shape", "authentik") as provider:
        assert provider.issuer.endswith("/")
        env = base_env(tmp_path, OIDC_ISSUER=provider.issuer.rstrip("/"))
        with Running(env, pid1=True) as run:
            assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "oidc.invalid")[0]
    assert "trailing slash" in fatal["message"] and provider.issuer in fatal["message"]
    assert not run.find(lambda e: e.get("event") == "entrypoint.ready")
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    # Stopped with SIGINT: a clean exit once serving, the default action while it was still
    # starting (upstream handles SIGINT only once it serves; nothing is written before that).
    assert stopped["spacetimedb"]["exit"] in ("exit code 0", "killed by SIGINT")
    assert not stopped["spacetimedb"]["killed"]


@pytest.mark.pid1
def test_unreachable_provider_under_strict_mode_exits_69(tmp_path: Path) -> None:
    env = base_env(tmp_path, OIDC_ISSUER=f"https://127.0.0.1:{free_port()}/realms/pogly", STRICT_MODE="true")
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 69
    assert run.find(lambda e: e.get("event") == "oidc.unavailable")
    assert not run.find(lambda e: e.get("event") == "entrypoint.ready")


@pytest.mark.pid1
def test_unreachable_provider_keeps_serving_then_verifies_when_it_appears(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/realms/pogly")
    with Running(env, pid1=True) as run:
        ready = run.wait_event("entrypoint.ready", timeout=60)
        assert ready["oidc"] == "unverified"
        assert run.find(lambda e: e.get("event") == "oidc.unverified")
        public = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
        assert httpx.get(f"{public}/readyz").status_code == 200  # overlays stay up for OBS
        with node_provider("--shape", "keycloak", "--port", str(port)) as provider:
            assert provider.issuer == env["OIDC_ISSUER"]
            run.wait_event("oidc.verified", timeout=30)
            status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status").json()
            assert status["oidc"] == "verified"
        run.stop()


def test_check_and_render_commands(tmp_path: Path) -> None:
    with node_provider("--shape", "authentik") as provider:
        env = base_env(tmp_path, OIDC_ISSUER=provider.issuer, POGLY_PUBLIC_URL="https://overlay.example.com")
        check = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, capture_output=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        out = check.stdout.decode()
        assert json.loads(out[: out.index("\nCaddyfile:")])["settings"]["oidc_issuer"] == provider.issuer
        assert "Caddyfile: valid" in out and "OIDC provider: verified" in out
        assert "https://overlay.example.com/callback" in out
        assert "https://overlay.example.com/silent-oidc-renew.html" in out
        assert "note: POGLY_PUBLIC_URL is not set" not in out
        del env["POGLY_PUBLIC_URL"]
        paths_only = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, capture_output=True,
                                    timeout=60)
        assert paths_only.returncode == 0, paths_only.stdout + paths_only.stderr
        assert b"\n  /callback\n" in paths_only.stdout
        assert b"note: POGLY_PUBLIC_URL is not set, so these are paths only" in paths_only.stdout
        env["OIDC_ISSUER"] = provider.issuer.rstrip("/")
        bad = subprocess.run([sys.executable, "-m", "entrypoint", "check"], env=env, capture_output=True, timeout=60)
        assert bad.returncode == 78 and b"trailing slash" in bad.stdout
    render = subprocess.run([sys.executable, "-m", "entrypoint", "render"], env=env, capture_output=True, timeout=30)
    assert render.returncode == 0
    assert b"reverse_proxy" in render.stdout and b"window.POGLY_RUNTIME_CONFIG" in render.stdout
    assert not (tmp_path / "run").exists()  # render and check write nothing to the run dir


# --------------------------------------------------------------------------- the helper process (issue 15)

ANSWERS_THEN_HANGS = """
import json, sys, time
settings = json.load(open(sys.argv[1]))
sys.stderr.write(json.dumps({"event": "oidc.verified", "level": "info", "issuer": settings["oidc_issuer"]}) + "\\n")
print(json.dumps({"ok": True, "report": {"issuer": settings["oidc_issuer"]}}), flush=True)
time.sleep(3600)  # an interpreter slow to tear down: the answer must not wait for it
"""

REFUSES = """
import json, sys
print(json.dumps({"ok": False, "reason": "issuer_mismatch", "message": "the issuer differs"}), flush=True)
sys.exit(78)
"""


def _fake_helper(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    from entrypoint.oidc import helper

    monkeypatch.setattr(helper, "command", lambda path, timeout: [sys.executable, "-c", script, str(path)])


def test_prespawned_helper_is_adopted_and_its_answer_counts_when_printed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Started before the loop (0600 settings file), adopted, answered while it still runs, then cleaned up."""
    import asyncio
    import os

    from entrypoint.config import Settings
    from entrypoint.oidc import helper, verdict
    from entrypoint.supervision.process import Reaper
    from tests.harness import wait_for

    _fake_helper(monkeypatch, ANSWERS_THEN_HANGS)
    monkeypatch.setattr(verdict, "HELPER_EXIT_S", 0.5)  # how long its teardown may take before it is killed
    settings = Settings(oidc_issuer="https://auth.example.com/application/o/pogly/", oidc_client_id="pogly",
                        run_dir=tmp_path / "run")
    early = helper.prespawn(settings)
    assert early is not None
    assert early.settings_file.parent == settings.run_dir
    assert early.settings_file.stat().st_mode & 0o777 == 0o600

    async def main() -> tuple[int, dict[str, object]]:
        reaper = Reaper(expected=(early.pid,))
        reaper.install(asyncio.get_running_loop())
        try:
            code, answer = await verdict.ask_helper(settings, reaper, 30.0, early=early)
            os.kill(early.pid, 0)  # still running (its "teardown"): the answer did not wait for its exit
            await asyncio.to_thread(wait_for, lambda: not early.settings_file.exists(), 20, "the settings file gone")
            return code, answer
        finally:
            reaper.uninstall()

    code, answer = asyncio.run(main())
    assert (code, answer) == (0, {"ok": True, "report": {"issuer": settings.oidc_issuer}})
    assert not list(settings.run_dir.glob(".oidc-check-*"))


def test_a_refusal_waits_for_the_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from entrypoint.config import Settings
    from entrypoint.oidc import verdict
    from entrypoint.supervision.process import Reaper

    _fake_helper(monkeypatch, REFUSES)
    (tmp_path / "run").mkdir()
    settings = Settings(oidc_issuer="https://auth.example.com/application/o/pogly/", oidc_client_id="pogly",
                        run_dir=tmp_path / "run")

    async def main() -> tuple[int, dict[str, object]]:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            return await verdict.ask_helper(settings, reaper, 30.0)
        finally:
            reaper.uninstall()

    code, answer = asyncio.run(main())
    assert code == 78 and answer["message"] == "the issuer differs"
    assert not list(settings.run_dir.glob(".oidc-check-*"))
