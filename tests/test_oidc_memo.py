"""A restart with settings verified at an earlier boot is ready without waiting for the provider check.

Issue 15 (restart ≤ 1.5× the floor): the check still runs at once, at nice 19,
and its answer is acted on as on a first boot.  The provider is the real
``oidc-provider`` (tests/js/oidc_server.mjs); "ready did not wait" is shown
without any timing: the provider is down on the restart and the check's
deadline is long, so a ready that reports ``rechecking`` cannot have waited.
"""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from entrypoint import config
from entrypoint.oidc import memo
from tests.harness import Running, base_env, cmdline, free_port, wait_for
from tests.oidc.fixtures import node_provider
from tests.test_pid1 import namespace_procs

pytestmark = pytest.mark.pid1


def _memo_file(env: dict[str, str]) -> Path:
    return Path(env["POGLY_CONFIG_DIR"]) / memo.MEMO_FILE


def _first_boot(env: dict[str, str]) -> None:
    with Running(env, pid1=True) as run:
        assert run.wait_event("entrypoint.ready", timeout=60)["oidc"] == "verified"
        run.stop()


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_a_restart_with_verified_settings_is_ready_while_the_check_runs_again_at_low_priority(
        tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/realms/pogly", OIDC_DISCOVERY_TIMEOUT="60")
    with node_provider("--shape", "keycloak", "--port", str(port)):
        _first_boot(env)
    path = _memo_file(env)
    recorded = json.loads(path.read_text())
    assert recorded["issuer"] == env["OIDC_ISSUER"] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "pogly" not in json.dumps(recorded).replace(env["OIDC_ISSUER"], "")  # a fingerprint, not the settings

    with Running(env, pid1=True) as run:  # the provider is down: the check retries for up to 60 s
        ready = run.wait_event("entrypoint.ready", timeout=60)
        assert ready["oidc"] == "rechecking"
        assert run.find(lambda e: e.get("event") == "oidc.rechecking")
        assert httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status").json()["oidc"] == "rechecking"
        assert httpx.get(f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}/readyz").status_code == 200
        helpers = wait_for(lambda: [p for p in namespace_procs(run.inner_pid) if "oidc-check" in cmdline(p.pid)],
                           10, "the oidc-check helper")
        assert [_nice(p.pid) for p in helpers] == [19]
        with node_provider("--shape", "keycloak", "--port", str(port)):
            run.wait_event("oidc.verified", timeout=60)
            assert httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status").json()["oidc"] == "verified"
        run.stop()


def test_changed_settings_wait_for_the_check_again(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/realms/pogly", OIDC_DISCOVERY_TIMEOUT="2")
    with node_provider("--shape", "keycloak", "--port", str(port)):
        _first_boot(env)
    assert _memo_file(env).exists()

    with Running({**env, "OIDC_CLIENT_ID": "another-client"}, pid1=True) as run:  # provider down, new client
        assert run.wait_event("entrypoint.ready", timeout=60)["oidc"] == "unverified"  # waited out the 2 s
        assert not run.find(lambda e: e.get("event") == "oidc.rechecking")
        run.stop()
    assert _memo_file(env).exists()  # an unreachable provider is no verdict about it: kept for the old settings


def test_what_the_memo_covers_and_when_it_is_not_used(tmp_path: Path) -> None:
    settings = config.load(base_env(tmp_path, OIDC_ISSUER="https://id.example.com/realms/pogly"))
    assert not memo.remembered(settings)  # nothing remembered yet (a first boot)
    assert memo.remember(settings) is None
    assert memo.remembered(settings)
    for changed in ({"oidc_issuer": "https://id.example.com/realms/other"}, {"oidc_client_id": "other"},
                    {"public_url": "https://overlay.example.com"}, {"oidc_allow_http": True}):
        assert not memo.remembered(replace(settings, **changed)), changed
    assert not memo.remembered(replace(settings, strict_mode=True))  # nothing served unverified, not even briefly
    assert not memo.remembered(replace(settings, oidc_issuer="", oidc_client_id=""))  # OIDC off
    memo.memo_path(settings).write_text("{not json")  # torn by hand: as on a first boot
    assert not memo.remembered(settings)
    memo.memo_path(settings).unlink()
    memo.memo_path(settings).mkdir()  # cannot be replaced by a file (EISDIR, even as root): a reason, no exception
    assert "cannot write" in (memo.remember(settings) or "")


def test_a_provider_that_answers_wrongly_after_a_verified_boot_is_still_exit_78_and_forgotten(
        tmp_path: Path) -> None:
    with node_provider("--shape", "authentik") as provider:  # its issuer ends with "/"; we drop it
        env = base_env(tmp_path, OIDC_ISSUER=provider.issuer.rstrip("/"))
        settings = config.load(env)
        settings.config_dir.mkdir(parents=True, exist_ok=True)
        assert memo.remember(settings) is None  # as if an earlier boot had verified exactly these settings
        with Running(env, pid1=True) as run:
            assert run.wait(60) == 78
    [fatal] = run.find(lambda e: e.get("event") == "oidc.invalid")
    assert "trailing slash" in fatal["message"] and "verified at an earlier boot" in fatal["message"]
    assert not _memo_file(env).exists()  # the next boot waits for the check
