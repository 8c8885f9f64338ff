"""``pogly-entrypoint owner show|set`` (entrypoint/spacetimedb/owner_admin.py), issue 10 item 4.

The command always runs as its own process (``python -m entrypoint owner …``),
as an operator runs it with ``kubectl exec``: against the SpacetimeDB stand-in
with a Pogly module published by a publisher whose token is in ``cli.toml``,
and at the end beside a whole running ``pogly-entrypoint run``.

Synchronisation is on process exit, on log events (with deadlines) and on the
watcher task finishing; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoint import localhttp
from entrypoint.config import Settings
from entrypoint.spacetimedb.credentials import Publisher, cli_document, write_cli_toml
from entrypoint.spacetimedb.identity import from_claims
from entrypoint.spacetimedb.ownership import Watcher
from entrypoint.spacetimedb.sql import parse_sql_result, sql
from entrypoint.spacetimedb.statefile import module_state
from entrypoint.supervision.status import Status
from tests.harness import ENTRYPOINT, REPO, Running, base_env, free_port
from tests.oidc.fixtures import node_available, node_provider
from tests.stdbhelp import StandIn

sys.path.insert(0, str(Path(__file__).resolve().parent / "standin"))
from standin_harness import PLAIN_WASM, POGLY_WASM

ISSUER = "https://auth.example.com/application/o/pogly/"
ALICE = from_claims(ISSUER, "alice")
SOMEONE = "ab" * 32
OTHER = "cd" * 32
DEADLINE = 30.0


@dataclass
class World:
    """A stand-in with ``pogly`` (and optionally more) published by the publisher in ``config/cli.toml``."""

    tmp: Path
    standin: StandIn
    publisher: Publisher
    env: dict[str, str]

    def owner(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``pogly-entrypoint owner …`` as a separate process with the container's environment."""
        return subprocess.run([*ENTRYPOINT, "owner", *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=DEADLINE, cwd=REPO, stdin=subprocess.DEVNULL)

    def query(self, statement: str, module: str = "pogly") -> list[dict[str, Any]]:
        with httpx.Client(base_url=self.standin.addr.url, timeout=10) as client:
            response = client.post(f"/v1/database/{module}/sql", content=statement.encode(),
                                   headers=self.publisher.headers)
        assert response.status_code == 200, response.text
        return parse_sql_result(response.json())

    def db_owner(self) -> str:
        return self.query("SELECT * FROM Config WHERE Version = 0")[0]["OwnerIdentity"]

    def config_init(self) -> bool:
        return self.query("SELECT * FROM Config WHERE Version = 0")[0]["ConfigInit"]

    def owner_permissions(self) -> list[str]:
        return sorted(r["Identity"] for r in self.query("SELECT * FROM Permissions WHERE PermissionType = 9999"))

    def publish(self, name: str, wasm: bytes) -> None:
        with httpx.Client(base_url=self.standin.addr.url, timeout=10) as client:
            response = client.put(f"/v1/database/{name}", content=wasm, params={"host_type": "Wasm"},
                                  headers=self.publisher.headers)
        assert response.status_code == 200, response.text


def events(stream: str, name: str) -> list[dict[str, Any]]:
    """JSON log lines (``LOG_FORMAT=json``) with this event name."""
    found = []
    for line in stream.splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            if data.get("event") == name:
                found.append(data)
    return found


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    standin = StandIn(tmp_path / "stdb", tmp_path / "config")
    addr = standin.start()
    try:
        with httpx.Client(base_url=addr.url, timeout=10) as client:
            created = client.post("/v1/identity").json()
        publisher = Publisher(created["identity"], created["token"])
        # What the supervisor leaves on the config volume: the official CLI's cli.toml.
        write_cli_toml(tmp_path / "config" / "cli.toml", cli_document({}, publisher.token, addr))
        env = base_env(tmp_path, OIDC_ISSUER=ISSUER, POGLY_SPACETIME_ADDR=str(addr))
        holder = World(tmp_path, standin, publisher, env)
        holder.publish("pogly", POGLY_WASM)
        yield holder
    finally:
        standin.stop()


# --------------------------------------------------------------------------- show


def test_show_an_unclaimed_database(world: World) -> None:
    shown = world.owner("show")
    assert shown.returncode == 0, shown.stderr
    assert "pogly: unclaimed (nobody owns it)" in shown.stdout
    assert "the first eligible sign-in becomes the owner (auto-claim)" in shown.stdout
    data = json.loads(world.owner("show", "--json").stdout)
    module = data["modules"]["pogly"]
    assert module["state"] == "unclaimed" and module["claimed"] is False and module["how"] is None
    # unclaimed ⇔ OwnerIdentity equals the database's own identity (Init set both)
    assert module["owner_identity"] == module["server_identity"] == world.db_owner()
    assert module["owner_permissions"] == [] and module["config_init"] is False
    assert data["publisher_identity"] == world.publisher.identity and data["oidc_enabled"] is True


def test_show_lists_connected_guests_so_an_identity_can_be_picked(world: World) -> None:
    """With OIDC off people connect anonymously: the operator needs to see who is there."""
    async def main() -> dict[str, Any]:
        from websockets.asyncio.client import connect

        url = world.standin.addr.url.replace("http://", "ws://") + "/v1/database/pogly/subscribe?compression=None"
        async with connect(url, subprotocols=["v1.json.spacetimedb"]) as ws:  # type: ignore[list-item]
            first = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))["IdentityToken"]
            shown = await asyncio.to_thread(world.owner, "show", "--json")
        return {"identity": first["identity"]["__identity__"][2:], "shown": json.loads(shown.stdout)}

    result = asyncio.run(main())
    guests = result["shown"]["modules"]["pogly"]["guests"]
    assert [g["identity"] for g in guests] == [result["identity"]]


# --------------------------------------------------------------------------- set


def test_set_identity_makes_it_the_one_owner_and_logs_the_event(world: World) -> None:
    before = world.db_owner()
    done = world.owner("set", "--identity", "0x" + SOMEONE.upper())
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == SOMEONE
    assert world.owner_permissions() == [SOMEONE]
    assert world.config_init() is True  # Pogly's onboarding can no longer hand ownership to someone else
    assert f"pogly: owner set to {SOMEONE}" in done.stdout and "it was unclaimed" in done.stdout
    # No supervisor runs here, so the event goes to the command's stderr, and it says so.
    assert "the container log could not be reached" in done.stdout
    (event,) = events(done.stderr, "owner.set")
    assert event["module"] == "pogly" and event["old_owner"] == before and event["new_owner"] == SOMEONE
    assert event["how"] == "identity" and event["was_claimed"] is False
    assert event["permission_inserted"] is True and event["config_init_closed"] is True
    recorded = module_state(world.tmp / "config", "pogly")["ownership"]
    assert recorded["state"] == "set" and recorded["owner_identity"] == SOMEONE
    assert recorded["previous_owner"] == before
    assert world.publisher.token not in done.stdout + done.stderr


def test_set_sub_derives_the_identity_exactly_as_spacetimedb(world: World) -> None:
    done = world.owner("set", "--sub", "alice")  # default issuer: OIDC_ISSUER
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == ALICE
    (event,) = events(done.stderr, "owner.set")
    assert event["how"] == "sub" and event["sub"] == "alice" and event["iss"] == ISSUER
    other_issuer = "https://keycloak.example.com/realms/pogly"
    done = world.owner("set", "--sub", "bob", "--issuer", other_issuer)
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == from_claims(other_issuer, "bob")
    assert world.owner_permissions() == [from_claims(other_issuer, "bob")]


def test_show_after_set_says_who_and_how(world: World) -> None:
    assert world.owner("set", "--sub", "alice").returncode == 0
    shown = world.owner("show")
    assert "pogly: claimed" in shown.stdout and ALICE in shown.stdout
    assert f"owner set --sub alice --issuer {ISSUER}" in shown.stdout
    module = json.loads(world.owner("show", "--json").stdout)["modules"]["pogly"]
    assert module["state"] == "claimed" and module["owner_identity"] == ALICE
    assert module["owner_permissions"] == [ALICE] and module["problems"] == []
    assert module["how"] == f"owner set --sub alice --issuer {ISSUER}" and module["since"] is not None


def test_previous_owner_loses_only_its_owner_permission(world: World) -> None:
    assert world.owner("set", "--identity", SOMEONE).returncode == 0
    world.query(f"INSERT INTO Permissions (Identity, PermissionType) VALUES (0x{SOMEONE}, 1)")  # e.g. an editor
    done = world.owner("set", "--identity", OTHER)
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == OTHER and world.owner_permissions() == [OTHER]
    kept = world.query(f"SELECT * FROM Permissions WHERE Identity = 0x{SOMEONE}")
    assert [r["PermissionType"] for r in kept] == [1]
    (event,) = events(done.stderr, "owner.set")
    assert event["old_owner"] == SOMEONE and event["permissions_removed"] == [SOMEONE]
    assert event["was_claimed"] is True and f"previous owner {SOMEONE}" in event["message"]
    assert f"removed from {SOMEONE}" in done.stdout


def test_the_record_keeps_who_auto_claimed_before(world: World) -> None:
    from entrypoint.spacetimedb.statefile import update_module_state

    world.query(f"UPDATE Config SET OwnerIdentity = 0x{ALICE} WHERE Version = 0")
    world.query(f"INSERT INTO Permissions (Identity, PermissionType) VALUES (0x{ALICE}, 9999)")
    claimed = {"state": "claimed", "owner_identity": ALICE, "sub": "alice", "iss": ISSUER, "claimed_at": 1.0}
    update_module_state(world.tmp / "config", "pogly", ownership=claimed)
    assert json.loads(world.owner("show", "--json").stdout)["modules"]["pogly"]["how"] == "auto-claim sub=alice"
    assert world.owner("set", "--identity", SOMEONE).returncode == 0
    assert world.owner("set", "--identity", OTHER).returncode == 0
    recorded = module_state(world.tmp / "config", "pogly")["ownership"]
    assert recorded["state"] == "set" and recorded["owner_identity"] == OTHER
    assert recorded["previous_owner"] == SOMEONE and recorded["previous"] == claimed


def test_setting_the_same_owner_again_changes_nothing(world: World) -> None:
    assert world.owner("set", "--identity", SOMEONE).returncode == 0
    again = world.owner("set", "--identity", SOMEONE)
    assert again.returncode == 0, again.stderr
    assert "already is the only owner; nothing changed" in again.stdout
    assert events(again.stderr, "owner.unchanged") and not events(again.stderr, "owner.set")


def test_show_reports_extra_owner_rows_and_set_repairs_them(world: World) -> None:
    """E.g. an owner set by hand with SQL, or a half-finished change."""
    world.query(f"UPDATE Config SET OwnerIdentity = 0x{SOMEONE} WHERE Version = 0")
    world.query(f"INSERT INTO Permissions (Identity, PermissionType) VALUES (0x{OTHER}, 9999)")
    module = json.loads(world.owner("show", "--json").stdout)["modules"]["pogly"]
    assert module["how"].startswith("not recorded by this entrypoint")
    assert any("no Owner permission" in p for p in module["problems"])
    assert any(OTHER in p for p in module["problems"])
    assert world.owner("set", "--identity", SOMEONE).returncode == 0
    assert world.owner_permissions() == [SOMEONE]


# --------------------------------------------------------------------------- refusals


def test_refuses_a_database_that_is_not_pogly(world: World) -> None:
    world.publish("other", PLAIN_WASM)
    refused = world.owner("set", "--identity", SOMEONE, MODULES="other")
    assert refused.returncode == 65, refused.stderr
    assert "not a Pogly module: 'other'" in refused.stderr and "nothing was changed" in refused.stderr
    refused = world.owner("set", "--identity", SOMEONE, "--module", "other", MODULES="pogly other")
    assert refused.returncode == 65
    assert world.db_owner() != SOMEONE  # refused before any change, pogly included
    shown = world.owner("show", "--json", MODULES="pogly other")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["modules"]["other"]["state"] == "not-pogly"
    # Without --module, every Pogly module is set and the others are named as skipped.
    done = world.owner("set", "--identity", SOMEONE, MODULES="pogly other")
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == SOMEONE and "other: skipped, not-pogly" in done.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--identity", "c200"], "is not a SpacetimeDB identity: give 64 hex digits, optionally prefixed with 0x"),
    (["--identity", "0x" + "g" * 64], "is not a SpacetimeDB identity"),
    (["--identity", SOMEONE, "--issuer", ISSUER], "--identity cannot be combined with --sub or --issuer"),
    (["--sub", "x" * 129], "is not a valid claim"),
    (["--sub", "alice", "--module", "nope"], "--module 'nope' is not one of MODULES (pogly)"),
])
def test_refuses_bad_arguments_with_78(world: World, args: list[str], message: str) -> None:
    refused = world.owner("set", *args)
    assert refused.returncode == 78, refused.stderr
    assert message in refused.stderr
    assert world.owner_permissions() == []


def test_usage_errors_are_argparse_2(world: World) -> None:
    assert world.owner("set").returncode == 2  # neither --sub nor --identity
    assert world.owner("set", "--sub", "a", "--identity", SOMEONE).returncode == 2


def test_refuses_the_databases_own_identity(world: World) -> None:
    own = world.db_owner()
    refused = world.owner("set", "--identity", own)
    assert refused.returncode == 78 and "means 'unclaimed'" in refused.stderr


def test_oidc_off_needs_an_explicit_issuer_for_sub(world: World) -> None:
    off = {"OIDC_ISSUER": "", "OIDC_CLIENT_ID": ""}
    refused = world.owner("set", "--sub", "alice", **off)
    assert refused.returncode == 78
    assert "OIDC is off" in refused.stderr and "--issuer" in refused.stderr and "--identity" in refused.stderr
    assert "sign-in: off" in world.owner("show", **off).stdout
    done = world.owner("set", "--sub", "alice", "--issuer", ISSUER, **off)
    assert done.returncode == 0, done.stderr
    assert world.db_owner() == ALICE


def test_spacetimedb_unreachable_is_69(world: World) -> None:
    for action in (["show"], ["set", "--identity", SOMEONE]):
        refused = world.owner(*action, POGLY_SPACETIME_ADDR=f"127.0.0.1:{free_port()}")
        assert refused.returncode == 69, refused.stderr
        assert "SpacetimeDB does not answer" in refused.stderr and "kubectl exec" in refused.stderr


def test_no_publisher_token_yet_is_69(world: World, tmp_path: Path) -> None:
    empty = tmp_path / "other-config"
    empty.mkdir()
    refused = world.owner("show", POGLY_CONFIG_DIR=str(empty))
    assert refused.returncode == 69 and "no publisher token" in refused.stderr


def test_database_not_published_yet_is_69(world: World) -> None:
    shown = world.owner("show", MODULES="pogly later")
    assert shown.returncode == 69 and "later: not-published" in shown.stdout
    refused = world.owner("set", "--identity", SOMEONE, MODULES="pogly later")
    assert refused.returncode == 69 and "no database 'later'" in refused.stderr
    assert world.db_owner() != SOMEONE


def test_a_refused_change_is_logged_and_its_intent_misleads_nobody(world: World, tmp_path: Path) -> None:
    """A cli.toml whose identity does not own the database: reads work (public tables), the UPDATE is refused.

    The intent record is written before the first statement (so a polling watcher can attribute a change
    it sees mid-command); after a refusal it names an identity that is not the owner, so nobody believes it.
    """
    with httpx.Client(base_url=world.standin.addr.url, timeout=10) as client:
        stranger = client.post("/v1/identity").json()
    config = tmp_path / "stranger-config"
    config.mkdir()
    write_cli_toml(config / "cli.toml", cli_document({}, stranger["token"], world.standin.addr))
    before = world.db_owner()
    refused = world.owner("set", "--identity", SOMEONE, POGLY_CONFIG_DIR=str(config))
    assert refused.returncode == 78, refused.stdout + refused.stderr
    assert "SpacetimeDB refused the publisher identity" in refused.stderr
    (failed,) = events(refused.stderr, "owner.set_failed")
    assert failed["module"] == "pogly" and failed["new_owner"] == SOMEONE and failed["exit_code"] == 78
    assert world.db_owner() == before and world.owner_permissions() == []
    assert module_state(config, "pogly")["ownership"]["owner_identity"] == SOMEONE  # the intent, first
    shown = json.loads(world.owner("show", "--json", POGLY_CONFIG_DIR=str(config)).stdout)["modules"]["pogly"]
    assert shown["state"] == "unclaimed" and shown["how"] is None
    assert stranger["token"] not in refused.stdout + refused.stderr


# --------------------------------------------------------------------------- the watcher does not fight


def test_a_polling_watcher_stops_once_owner_set_ran(world: World) -> None:
    """Auto-claim is conditional on "unclaimed": after ``owner set`` it finds the database claimed and stops."""
    settings = Settings(oidc_issuer=ISSUER, oidc_client_id="pogly", config_dir=world.tmp / "config")
    status = Status()

    async def main() -> str:
        async with localhttp.AsyncClient(base_url=world.standin.addr.url, timeout=10) as client:
            async def run_sql(statement: str) -> list[dict[str, Any]]:
                return await sql(client, world.publisher, "pogly", statement)

            watcher = Watcher(settings, "pogly", run_sql, status.module("pogly"))
            task = asyncio.create_task(watcher.run())
            await asyncio.to_thread(_wait, lambda: status.module("pogly").ownership == "unclaimed")
            done = await asyncio.to_thread(world.owner, "set", "--sub", "alice")
            assert done.returncode == 0, done.stderr
            return await asyncio.wait_for(task, DEADLINE)

    assert asyncio.run(main()) == "claimed"
    module = status.module("pogly")
    assert module.owner_identity == ALICE and module.claimed_by == f"owner set --sub alice --issuer {ISSUER}"
    assert world.db_owner() == ALICE and world.owner_permissions() == [ALICE]
    assert module_state(world.tmp / "config", "pogly")["ownership"]["state"] == "set"  # not overwritten


def _wait(predicate: Any) -> Any:
    from tests.harness import wait_for

    return wait_for(predicate, DEADLINE, "the watcher's first look")


def test_every_log_line_is_one_write_so_an_injected_line_never_splits_ours() -> None:
    """``owner set`` writes into the supervisor's stdout; each of the supervisor's lines must be one write().

    In its own process: ``logs.configure`` is global.
    """
    script = (
        "import json\n"
        "from entrypoint import logs\n"
        "class Recorder:\n"
        "    calls = []\n"
        "    def write(self, text):\n"
        "        self.calls.append(text)\n"
        "        return len(text)\n"
        "    def flush(self): pass\n"
        "    def isatty(self): return False\n"
        "logs.configure('json', stream=Recorder())\n"
        "logs.get().info('a.b', big='y' * 5000)\n"
        "logs.get().warning('c.d')\n"
        "print(json.dumps(Recorder.calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE,
                         cwd=REPO, check=True, env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"})
    calls = json.loads(out.stdout)
    assert len(calls) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in calls)


def test_every_owner_event_is_documented() -> None:
    source = (REPO / "entrypoint" / "spacetimedb" / "owner_admin.py").read_text()
    names = set(re.findall(r'log\.\w+\(\s*"(owner\.[a-z_]+)"', source))
    assert names == {"owner.set", "owner.unchanged", "owner.set_failed"}
    operations = (REPO / "docs" / "operations.md").read_text()
    assert not [n for n in names if f"`{n}`" not in operations]


# --------------------------------------------------------------------------- whole program


def _show_json(env: dict[str, str]) -> dict[str, Any]:
    shown = subprocess.run([*ENTRYPOINT, "owner", "show", "--json"], env=env, capture_output=True, text=True,
                           timeout=DEADLINE, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["modules"]["pogly"]


def test_whole_program_owner_set_reaches_the_container_log_and_stops_the_watcher(tmp_path: Path) -> None:
    problem = node_available()
    assert problem is None, problem  # make test installs Node.js; a missing one fails, never skips
    with node_provider("--shape", "keycloak") as provider:
        env = base_env(tmp_path, OIDC_ISSUER=provider.issuer)
        with Running(env) as run:
            run.wait_event("entrypoint.ready", timeout=60)
            run.wait_event("ownership.unclaimed", timeout=60, module="pogly")
            done = subprocess.run([*ENTRYPOINT, "owner", "set", "--identity", SOMEONE], env=env,
                                  capture_output=True, text=True, timeout=DEADLINE, cwd=REPO)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"logged in the container log (pogly-entrypoint pid {run.proc.pid}" in done.stdout
            assert not events(done.stderr, "owner.set")  # it went to the container log instead
            # The command wrote the event into the supervisor's own stdout: the container log.
            event = run.wait_event("owner.set", module="pogly", new_owner=SOMEONE)
            assert event["how"] == "identity" and event["service"] == "entrypoint"
            # The watcher found the database claimed at its next look, and stopped.
            owned = run.wait_event("ownership.owned", module="pogly", how="owner-set")
            assert owned["identity"] == SOMEONE
            status = httpx.get(f"http://{env['POGLY_HEALTH_ADDR']}/status", timeout=5).json()
            assert status["modules"]["pogly"]["ownership"] == "claimed"
            assert status["modules"]["pogly"]["claimed_by"] == "owner set --identity"
            assert status["modules"]["pogly"]["owner_identity"] == SOMEONE
            module = _show_json(env)
            assert module["owner_identity"] == SOMEONE and module["owner_permissions"] == [SOMEONE]
            run.stop()
    assert not run.find(lambda e: e.get("event") in ("ownership.claimed", "ownership.failed",
                                                      "ownership.claimed_elsewhere"))


def test_whole_program_oidc_off_no_auto_claim_then_owner_set(tmp_path: Path) -> None:
    """OIDC off: ready, an anonymous visitor does not become the owner, ``owner set`` makes it one.

    The documented flow: connect (as the web app does in its anonymous mode), find your identity
    under "connected now" in ``owner show``, then ``owner set --identity``.
    """
    env = base_env(tmp_path, OIDC_ISSUER="", OIDC_CLIENT_ID="")

    def owner(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ENTRYPOINT, "owner", *args], env=env, capture_output=True, text=True,
                              timeout=DEADLINE, cwd=REPO)

    async def visit(run: Running) -> str:
        from websockets.asyncio.client import connect

        url = f"ws://{env['POGLY_SPACETIME_ADDR']}/v1/database/pogly/subscribe?compression=None"
        async with connect(url, subprotocols=["v1.json.spacetimedb"]) as ws:  # type: ignore[list-item]
            first = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))["IdentityToken"]
            visitor = first["identity"]["__identity__"][2:]
            module = await asyncio.to_thread(_show_json, env)
            assert module["state"] == "unclaimed"  # connected, and nobody auto-claimed
            assert visitor in [g["identity"] for g in module["guests"]]
            refused = await asyncio.to_thread(owner, "set", "--sub", "alice")
            assert refused.returncode == 78 and "OIDC is off" in refused.stderr
            done = await asyncio.to_thread(owner, "set", "--identity", visitor)
            assert done.returncode == 0, done.stdout + done.stderr
        return visitor

    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        run.wait_event("oidc.disabled")
        visitor = asyncio.run(visit(run))
        run.wait_event("owner.set", module="pogly", new_owner=visitor)
        module = _show_json(env)
        assert module["state"] == "claimed" and module["owner_identity"] == visitor
        assert module["owner_permissions"] == [visitor] and module["how"] == "owner set --identity"
        run.stop()
    assert not run.find(lambda e: e.get("event") == "ownership.claimed")
