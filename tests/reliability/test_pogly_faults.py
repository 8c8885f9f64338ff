"""Pogly's own faults (issue 13, item 2): the lock, the identity volume, the publish, a hung server,
the OIDC provider, the public port.

The real program with the real Caddy and the SpacetimeDB stand-in; the faults are the stand-in's test
switches (``STANDIN_PING_HANG``, ``STANDIN_PUBLISH_CUT``, ``STANDIN_PUBLISH_DIE``; tests/standin/README.md),
a second stand-in holding the lock, files removed from the volumes, a provider started and stopped, a
socket on the public port.  Already covered elsewhere and not repeated: a lock held past
``POGLY_LOCK_WAIT`` (69) and a leftover of ours (tests/test_lifecycle.py), ``cli.toml`` lost with the data
kept in both version shapes (``test_database_owned_by_another_identity_exits_78``), swapped keys
(``test_swapped_keys_exit_78_naming_both_identities_and_touch_no_data``), a full config volume while the
token is written (test_disk_and_modules.py).
"""

from __future__ import annotations

import json
import signal
import socket
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.harness import Running, base_env, free_port
from tests.oidc.fixtures import node_provider
from tests.test_lifecycle import Holder, sql, tree_digest

pytestmark = pytest.mark.pid1


def _one_database(env: dict[str, str]) -> None:
    """Exactly one Pogly database, onboarding closed (the first-boot Config applied)."""
    rows = sql(env, "SELECT * FROM Config")
    assert len(rows) == 1, rows
    state = json.loads((Path(env["POGLY_CONFIG_DIR"]) / "pogly-entrypoint.json").read_text())
    assert state["modules"]["pogly"]["first_boot_config_applied"] is True, state


def test_lock_held_by_a_server_outside_the_namespace_then_a_stale_pidfile(tmp_path: Path) -> None:
    """As PID 1: another SpacetimeDB (outside our PID namespace) holds the data dir's flock; we wait,
    never touch the file or the holder, and start once it exits.  Then the holder is SIGKILLed instead,
    leaving its pidfile naming a dead PID: the next start is not delayed by it at all."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    pidfile = Path(env["POGLY_DATA_DIR"]) / "spacetime.pid"
    holder = Holder(env)
    try:
        inode = pidfile.stat().st_ino
        with Running(env, pid1=True) as run:
            held = run.wait_event("spacetime.lock_held", timeout=30)
            assert held["holder_pid"] == holder.proc.pid  # the PID as the file says, from outside the namespace
            run.wait_event("spacetime.lock_held", timeout=30)  # waits again, with backoff
            assert holder.proc.poll() is None and pidfile.stat().st_ino == inode  # neither harmed nor deleted
            assert not run.find(lambda e: e.get("event") == "spacetime.leftover_stopping")
            holder.stop()
            run.wait_event("entrypoint.ready", timeout=60)
            run.stop()
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()
    holder = Holder(env)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(10)
    assert pidfile.read_text() == str(holder.proc.pid)  # stale: names a dead process
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    assert not run.find(lambda e: e.get("event") == "spacetime.lock_held")


def test_one_signing_key_lost_is_78_naming_it_and_the_data_is_untouched(tmp_path: Path) -> None:
    """``id_ecdsa.pub`` deleted between runs: refused before SpacetimeDB starts (it would refuse anyway),
    naming the missing file and warning against deleting the other half."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    config = Path(env["POGLY_CONFIG_DIR"])
    (config / "id_ecdsa.pub").unlink()
    before = tree_digest(Path(env["POGLY_DATA_DIR"]))
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "identity.keys_incomplete")[0]
    assert fatal["missing"] == str(config / "id_ecdsa.pub") and "Do NOT delete" in fatal["message"]
    assert not run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "spacetimedb")
    assert (config / "id_ecdsa").exists() and not (config / "id_ecdsa.pub").exists()  # nothing minted
    assert tree_digest(Path(env["POGLY_DATA_DIR"])) == before


def test_both_signing_keys_lost_is_78_token_rejected_and_nothing_is_rewritten(tmp_path: Path) -> None:
    """Both key files deleted (a config volume restored without them): SpacetimeDB mints a new pair, which
    no longer accepts the publisher token in ``cli.toml``; exit 78 saying to restore the keys, and neither
    the token nor the data is rewritten."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.stop()
    config = Path(env["POGLY_CONFIG_DIR"])
    token_before = tomllib.loads((config / "cli.toml").read_text())
    for name in ("id_ecdsa", "id_ecdsa.pub"):
        (config / name).unlink()
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "identity.token_rejected")[0]
    assert fatal["exit_code"] == 78 and "restore" in fatal["message"].lower()
    assert tomllib.loads((config / "cli.toml").read_text()) == token_before
    assert not run.find(lambda e: e.get("event") in ("publish.created", "publish.updated"))


@pytest.mark.parametrize("version", ["1.7.0", "1.9.0"])
def test_config_volume_of_another_installation_is_78_not_owner(tmp_path: Path, version: str) -> None:
    """The wrong backup restored: keys and token of installation B beside the data of installation A.
    The publish is refused in the version's own words (1.7: 500 `Permission denied`, 1.9+: 403 `not
    authorized`); both are read as "not the owner": exit 78 naming our identity, data untouched."""
    env = base_env(tmp_path / "a", STANDIN_VERSION=version, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    other = base_env(tmp_path / "b", STANDIN_VERSION=version, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    for installation in (env, other):
        with Running(installation, pid1=True) as run:
            run.wait_event("entrypoint.ready", timeout=60)
            run.stop()
    env["POGLY_CONFIG_DIR"] = other["POGLY_CONFIG_DIR"]
    before = tree_digest(Path(env["POGLY_DATA_DIR"]))
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 78
    fatal = run.find(lambda e: e.get("event") == "publish.not_owner")[0]
    ours = tomllib.loads((Path(other["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())
    assert fatal["exit_code"] == 78 and "pogly" in fatal["message"]
    assert tree_digest(Path(env["POGLY_DATA_DIR"])) == before
    assert ours == tomllib.loads((Path(other["POGLY_CONFIG_DIR"]) / "cli.toml").read_text())


def test_publish_cut_mid_upload_is_retried_and_creates_one_database(tmp_path: Path) -> None:
    """First boot; SpacetimeDB drops the connection after 4 bytes of the module: the publish is retried
    and the one database is created, its first-boot Config applied."""
    marker = tmp_path / "cut-once"
    env = base_env(tmp_path, STANDIN_PUBLISH_CUT=str(marker), OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert marker.exists()
        retried = run.find(lambda e: e.get("event") == "spacetime.retrying")
        assert [e["what"] for e in retried] == ["publish pogly"]
        assert len(run.find(lambda e: e.get("event") == "publish.created")) == 1
        _one_database(env)
        run.stop()


def test_spacetimedb_dying_during_publish_is_restarted_and_the_publish_completes(tmp_path: Path) -> None:
    """First boot; SpacetimeDB is SIGKILLed mid-upload (its pidfile left behind): it is restarted like any
    death, the publish is retried against the new run, one database, onboarding closed."""
    marker = tmp_path / "die-once"
    env = base_env(tmp_path, STANDIN_PUBLISH_DIE=str(marker), OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        assert marker.exists()
        died = run.find(lambda e: e.get("event") == "child.exited" and e.get("child") == "spacetimedb")
        assert [e["exit"] for e in died] == ["killed by SIGKILL"]
        created = run.find(lambda e: e.get("event") in ("publish.created", "publish.updated"))
        assert created and created[0]["event"] == "publish.created"
        _one_database(env)
        run.stop()
    assert not run.find(lambda e: e.get("event") == "entrypoint.internal_error")


def test_spacetimedb_hanging_on_ping_is_69_after_the_start_timeout(tmp_path: Path) -> None:
    """SpacetimeDB accepts connections and reads the request but never answers ``/v1/ping``: exit 69
    ``child.ready_timeout`` after POGLY_START_TIMEOUT, naming the variable; the server is then stopped with
    SIGINT like any other (no SIGKILL needed); nothing was published."""
    env = base_env(tmp_path, STANDIN_PING_HANG="1", POGLY_START_TIMEOUT="3", OIDC_ISSUER="", OIDC_CLIENT_ID="")
    with Running(env, pid1=True) as run:
        assert run.wait(60) == 69
    fatal = run.find(lambda e: e.get("event") == "child.ready_timeout")[0]
    assert fatal["child"] == "spacetimedb" and fatal["exit_code"] == 69
    assert "POGLY_START_TIMEOUT" in fatal["message"] and "3 s" in fatal["message"]
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    assert stopped["spacetimedb"]["exit"] == "exit code 0" and not stopped["spacetimedb"]["killed"]
    assert not run.find(lambda e: e.get("event") in ("publish.start", "entrypoint.ready"))


def test_oidc_provider_flapping_is_never_fatal_and_restarts_nothing(tmp_path: Path) -> None:
    """The real ``oidc-provider`` down at start, up, down, up, down: ready throughout (unverified, then
    verified once it answered), never fatal, no child restarted; SIGTERM then exits 0.  A provider that
    goes away after it was verified is not re-checked (the verdict is about its metadata, which a restart
    would check again)."""
    port = free_port()
    env = base_env(tmp_path, OIDC_ISSUER=f"http://127.0.0.1:{port}/realms/pogly")
    readyz = f"http://127.0.0.1:{env['POGLY_HTTP_PORT']}/readyz"
    status_url = f"http://{env['POGLY_HEALTH_ADDR']}/status"
    with Running(env, pid1=True) as run:
        assert run.wait_event("entrypoint.ready", timeout=60)["oidc"] == "unverified"
        for round_ in range(2):
            with node_provider("--shape", "keycloak", "--port", str(port)) as provider:
                assert provider.issuer == env["OIDC_ISSUER"]
                if round_ == 0:
                    run.wait_event("oidc.verified", timeout=30)
                assert httpx.get(readyz).status_code == 200
                assert httpx.get(status_url).json()["oidc"] == "verified"
            assert httpx.get(readyz).status_code == 200  # the provider is gone again: still serving
            assert httpx.get(status_url).json()["oidc"] == "verified"
        run.stop()
    started = run.find(lambda e: e.get("event") == "child.started")
    assert sorted(e["child"] for e in started) == ["caddy", "spacetimedb"]  # no restart
    assert not run.find(lambda e: e.get("event") in ("oidc.invalid", "oidc.unavailable", "child.exited"))


def test_public_port_taken_is_exit_1_naming_pogly_http_port(tmp_path: Path) -> None:
    """Another process listens on POGLY_HTTP_PORT: Caddy cannot bind; exit 1 (Caddy's failed start, not
    retried) with a message naming the variable, the port and the fix; SpacetimeDB stopped cleanly."""
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")
    port = int(env["POGLY_HTTP_PORT"])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", port))
        squatter.listen()
        with Running(env, pid1=True) as run:
            assert run.wait(60) == 1
    fatal = run.find(lambda e: e.get("event") == "caddy.startup_failed")[0]
    assert fatal["exit_code"] == 1 and fatal["variable"] == "POGLY_HTTP_PORT" and fatal["port"] == port
    assert f"POGLY_HTTP_PORT={port} is already in use" in fatal["message"] and "free port" in fatal["message"]
    assert len(run.find(lambda e: e.get("event") == "child.started" and e.get("child") == "caddy")) == 1
    stopped = {e["child"]: e for e in run.find(lambda e: e.get("event") == "child.stopped")}
    assert not stopped["spacetimedb"]["killed"]
