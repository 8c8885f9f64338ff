"""OIDC off (``OIDC_ISSUER`` and ``OIDC_CLIENT_ID`` both empty) is a mode: the whole program, end to end.

Real Caddy, the SpacetimeDB stand-in; the ``config.js`` Caddy serves is evaluated
in node and read the way the web app reads it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from entrypoint import config
from entrypoint.web.config_js import GLOBAL_NAME, KEY_OIDC_CLIENT_ID, KEY_OIDC_ISSUER
from tests.harness import Running, base_env

READ_AS_THE_APP_DOES = r"""
const vm = require('node:vm');
let code = '';
process.stdin.on('data', (d) => { code += d; });
process.stdin.on('end', () => {
  const [globalName, issuerKey, clientKey] = process.argv.slice(1);
  const window = {};
  vm.runInNewContext(code, { window });
  const cfg = window[globalName];
  process.stdout.write(JSON.stringify({ issuer: cfg[issuerKey], clientId: cfg[clientKey] }));
});
"""


def read_as_the_app_does(config_js: str) -> dict[str, str]:
    node = shutil.which("node")
    assert node, "node is required for this test"
    out = subprocess.run([node, "-e", READ_AS_THE_APP_DOES, GLOBAL_NAME, KEY_OIDC_ISSUER, KEY_OIDC_CLIENT_ID],
                         input=config_js.encode(), capture_output=True, timeout=30, check=True)
    result: dict[str, str] = json.loads(out.stdout)
    return result


def test_oidc_off_end_to_end(tmp_path: Path) -> None:
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env) as run:
        ready = run.wait_event("entrypoint.ready", timeout=60)
        assert ready["oidc"] == "disabled"
        (disabled,) = run.find(lambda e: e.get("event") == "oidc.disabled")
        assert "anonymous" in disabled["message"] and "pogly-entrypoint owner set" in disabled["message"]
        # No provider check ran: the oidc-check helper's own lines are relayed with service "oidc".
        assert not run.find(lambda e: e.get("service") == "oidc" or e.get("event") in (
            "oidc.unverified", "oidc.invalid", "oidc.verified"))

        status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()
        assert status["ready"] is True and status["oidc"] == "disabled"

        public = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
        served = httpx.get(f"{public}/config.js", timeout=5)
        assert served.status_code == 200
        assert read_as_the_app_does(served.text) == {"issuer": "", "clientId": ""}
        assert httpx.get(f"{public}/readyz", timeout=5).status_code == 200

        # No auto-claim: the watcher reads the owner, says why it will not claim, and stops.
        off = run.wait_event("ownership.auto_claim_disabled", timeout=30, module="pogly")
        assert "OIDC is off" in off["message"] and "owner set" in off["message"]
        assert not run.find(lambda e: e.get("event") in ("ownership.unclaimed", "ownership.claimed"))
        status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()
        assert status["modules"]["pogly"]["ownership"] == "disabled"

        shown = subprocess.run([sys.executable, "-m", "entrypoint", "status"], env=env, capture_output=True,
                               timeout=30)
        assert shown.returncode == 0 and "oidc: disabled" in shown.stdout.decode()
        run.stop()


def test_oidc_check_helper_has_nothing_to_check(tmp_path: Path) -> None:
    # The helper checks the settings it is handed on stdin, not the environment: here the environment
    # names an unreachable provider, the settings say OIDC off.
    env = base_env(tmp_path)
    settings = config.load(base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID=""))
    out = subprocess.run([sys.executable, "-m", "entrypoint", "oidc-check"], env=env, capture_output=True,
                         input=json.dumps(settings.to_json()).encode(), timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["disabled"] is True


def test_oidc_check_helper_without_settings_says_so(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "entrypoint", "oidc-check"], env=base_env(tmp_path),
                         capture_output=True, input=b'{"oidc_issuer": "https://auth.example.com/"}', timeout=30)
    answer = json.loads(out.stdout)
    assert out.returncode == 70 and answer["ok"] is False and answer["reason"] == "bad_input"
    assert "stdin" in answer["message"] and "missing" in answer["message"]


def test_strict_mode_refuses_oidc_off_before_starting_anything(tmp_path: Path) -> None:
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="", STRICT_MODE="true")
    with Running(env) as run:
        assert run.wait(30) == 78
    (invalid,) = run.find(lambda e: e.get("event") == "config.invalid")
    assert any("OIDC_ISSUER" in p and "OIDC_CLIENT_ID" in p and "STRICT_MODE" in p for p in invalid["problems"])
    assert not run.find(lambda e: e.get("event") == "child.started")


def test_one_empty_value_exits_78_naming_both(tmp_path: Path) -> None:
    env = base_env(tmp_path, OIDC_CLIENT_ID="")
    with Running(env) as run:
        assert run.wait(30) == 78
    (invalid,) = run.find(lambda e: e.get("event") == "config.invalid")
    (problem,) = [p for p in invalid["problems"] if p.startswith("OIDC_CLIENT_ID")]
    assert "OIDC_ISSUER" in problem
