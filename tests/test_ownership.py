"""First-user auto-claim (entrypoint/spacetimedb/ownership.py), issue 6.

Two layers:

* the rules and the state machine against a fake SQL function and a fake
  sleep (no server, no real time);
* the SpacetimeDB stand-in with **real** ``oidc-provider`` tokens, connecting
  the way the TypeScript SDK does: id token → ``POST /v1/identity/websocket-token``
  → ``/v1/database/pogly/subscribe?token=<re-signed token>`` with the
  ``v1.json.spacetimedb`` subprotocol (and, where the case needs it, the raw
  id token on ``?token=`` as a non-SDK client could).

Synchronisation is always on a condition with a deadline (the watcher's own
verdict for a connection, the watcher task finishing, a READY line).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect

from entrypoint import localhttp
from entrypoint.config import Settings
from entrypoint.spacetimedb import ownership
from entrypoint.spacetimedb.credentials import Publisher
from entrypoint.spacetimedb.identity import from_claims
from entrypoint.spacetimedb.ownership import (
    ELIGIBLE,
    Candidate,
    Watcher,
    choose,
    connection_key,
    eligibility,
    watch,
)
from entrypoint.spacetimedb.sql import SqlError, sql
from entrypoint.spacetimedb.statefile import module_state
from entrypoint.supervision.status import ModuleStatus, Status
from tests.harness import wait_for
from tests.oidc.fixtures import NodeProvider, node_available, node_provider
from tests.oidc.signin import APP_ORIGIN, follow_to_app, pkce
from tests.stdbhelp import StandIn

sys.path.insert(0, str(Path(__file__).resolve().parent / "standin"))
from standin_harness import POGLY_WASM

ISSUER = "https://auth.example.com/application/o/pogly/"
SERVER = "c200" + "11" * 30
DEADLINE = 20.0


def settings_for(tmp: Path, issuer: str = ISSUER, **kw: Any) -> Settings:
    config_dir = tmp / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    return Settings(oidc_issuer=issuer, oidc_client_id=kw.pop("client_id", "pogly"), config_dir=config_dir, **kw)


# =========================================================================== pure rules


def payload(sub: str = "alice", iss: str = ISSUER, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"hex_identity": from_claims(iss, sub), "sub": sub, "iss": iss, "aud": [],
                            "iat": 1_700_000_000, "exp": 1_700_000_060}
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


ALICE = from_claims(ISSUER, "alice")


@pytest.mark.parametrize(("claims", "guest", "owner_subjects", "expected"), [
    (payload(), ALICE, (), ELIGIBLE),                                          # re-signed websocket token
    (payload(aud="pogly"), ALICE, (), ELIGIBLE),                               # raw id token, aud string
    (payload(aud=["other", "pogly"]), ALICE, (), ELIGIBLE),                    # raw id token, aud list
    (payload(aud=None), ALICE, (), ELIGIBLE),                                  # no aud at all
    (payload(hex_identity=None), ALICE, (), ELIGIBLE),                         # hex_identity is optional
    (payload(hex_identity="0x" + ALICE.upper()), ALICE, (), ELIGIBLE),         # any spelling of it
    (payload(aud="other"), ALICE, (), "wrong-audience"),
    (payload(aud=["other"]), ALICE, (), "wrong-audience"),
    (payload(aud=42), ALICE, (), "wrong-audience"),
    (payload(sub="x", iss="localhost", aud=["spacetimedb"]), from_claims("localhost", "x"), (), "anonymous"),
    (payload(iss="https://evil.example/"), from_claims("https://evil.example/", "alice"), (), "foreign-issuer"),
    (payload(iss=ISSUER.rstrip("/")), from_claims(ISSUER.rstrip("/"), "alice"), (), "foreign-issuer"),
    (payload(iss=ISSUER.upper()), ALICE, (), "foreign-issuer"),
    (payload(sub=""), ALICE, (), "no-sub"),
    (payload(hex_identity=from_claims(ISSUER, "bob")), ALICE, (), "hex-identity-mismatch"),
    (payload(hex_identity="nonsense"), ALICE, (), "hex-identity-mismatch"),
    (payload(), from_claims(ISSUER, "bob"), (), "guest-identity-mismatch"),
    (payload(), None, (), "no-guest-row"),
    (payload(), ALICE, ("bob", "carol"), "not-in-owner-subjects"),
    (payload(), ALICE, ("bob", "alice"), ELIGIBLE),
    (None, ALICE, (), "unreadable-payload"),
])
def test_eligibility(claims: dict[str, Any] | None, guest: str | None, owner_subjects: tuple[str, ...],
                     expected: str) -> None:
    assert eligibility(claims, guest, issuer=ISSUER, client_id="pogly", owner_subjects=owner_subjects) == expected


def test_choose_earliest_iat_then_lowest_identity() -> None:
    low, high = sorted([from_claims(ISSUER, "a"), from_claims(ISSUER, "b")])
    early_high = Candidate("01", high, ISSUER, "h", 100)
    late_low = Candidate("02", low, ISSUER, "l", 101)
    assert choose([late_low, early_high]) == (early_high, [late_low])
    same_high = Candidate("03", high, ISSUER, "h", 100)
    same_low = Candidate("04", low, ISSUER, "l", 100)
    assert choose([same_high, same_low]) == (same_low, [same_high])
    # no iat sorts last; the same identity on two connections is not "passed over" for itself
    no_iat = Candidate("05", low, ISSUER, "l", None)
    twice = Candidate("06", high, ISSUER, "h", 100)
    assert choose([no_iat, early_high, twice]) == (early_high, [no_iat])


def test_connection_key_spellings_agree() -> None:
    assert connection_key("0x00ab") == connection_key("ab") == connection_key(["0xAB"]) == connection_key(0xAB)
    assert connection_key({"__connection_id__": 171}) == connection_key("0x" + "0" * 30 + "ab")


# =========================================================================== state machine, fake SQL


class Stop(Exception):
    """Raised by the fake sleep to end a watcher that would otherwise poll forever."""


@dataclass
class FakeDb:
    """Just enough of SpacetimeDB's SQL for the statements ownership.py sends."""

    owner: str = SERVER
    server: str = SERVER
    connections: list[tuple[str, dict[str, Any] | str, str | None]] = field(default_factory=list)
    permissions: list[tuple[str, int]] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    pogly: bool = True
    fail_next: list[BaseException] = field(default_factory=list)
    before_update: Callable[[], None] | None = None

    async def __call__(self, statement: str) -> list[dict[str, Any]]:
        self.statements.append(statement)
        if self.fail_next:
            raise self.fail_next.pop(0)
        if not self.pogly and ("Config" in statement or "Heartbeat" in statement):
            raise SqlError("pogly", statement, 400, "`Config` is not a valid table")
        if statement.startswith("SELECT * FROM Config"):
            return [{"Version": 0, "OwnerIdentity": self.owner}]
        if statement.startswith("SELECT * FROM Heartbeat"):
            return [{"Id": 0, "ServerIdentity": self.server}]
        if statement == "SELECT * FROM st_connection_credentials":
            return [{"connection_id": cid, "jwt_payload": p if isinstance(p, str) else json.dumps(p)}
                    for cid, p, _ in self.connections]
        if statement == "SELECT * FROM Guests":
            return [{"Address": cid, "Identity": g} for cid, _, g in self.connections if g is not None]
        if statement.startswith("UPDATE Config SET OwnerIdentity = 0x"):
            if self.before_update:
                self.before_update()
            new = statement.split("0x", 2)[1][:64]
            expected = statement.rsplit("0x", 1)[1][:64]
            if self.owner == expected:
                self.owner = new
            return []
        if statement.startswith("SELECT * FROM Permissions"):
            ident = statement.split("0x", 1)[1][:64]
            return [{"Identity": i, "PermissionType": t} for i, t in self.permissions if i == ident and t == 9999]
        if statement.startswith("INSERT INTO Permissions"):
            self.permissions.append((statement.split("0x", 1)[1][:64], 9999))
            return []
        raise AssertionError(f"unexpected statement {statement}")

    def connect(self, cid: str, sub: str, iss: str = ISSUER, iat: int = 1_700_000_000, **extra: Any) -> str:
        ident = from_claims(iss, sub)
        self.connections.append((cid, payload(sub, iss, iat=iat, **extra), ident))
        return ident


class FakeSleep:
    """Records the delays; ends the run after ``limit`` sleeps."""

    def __init__(self, limit: int = 50, on_sleep: Callable[[int], None] | None = None) -> None:
        self.delays: list[float] = []
        self.limit = limit
        self.on_sleep = on_sleep

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.on_sleep:
            self.on_sleep(len(self.delays))
        if len(self.delays) >= self.limit:
            raise Stop


def fake_watcher(tmp: Path, db: FakeDb, sleep: FakeSleep, **settings_kw: Any) -> Watcher:
    return Watcher(settings_for(tmp, **settings_kw), "pogly", db, ModuleStatus("pogly"), sleep=sleep,
                   now=lambda: 1234.5)


def events(cap: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in cap if e.get("event") == name]


def test_unclaimed_polls_with_backoff_250ms_to_2s(tmp_path: Path) -> None:
    db, sleep = FakeDb(), FakeSleep(limit=7)
    watcher = fake_watcher(tmp_path, db, sleep)
    with capture_logs() as cap, pytest.raises(Stop):
        asyncio.run(watcher.run())
    assert sleep.delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert watcher.status.ownership == "unclaimed"
    assert len(events(cap, "ownership.unclaimed")) == 1  # announced once, not per poll
    assert "Residual risk: ANY account" in events(cap, "ownership.unclaimed")[0]["message"]
    # an idle poll costs three reads, no Guests query while nobody is eligible by claims
    assert db.statements[:3] == ["SELECT * FROM Config WHERE Version = 0", "SELECT * FROM Heartbeat WHERE Id = 0",
                                 "SELECT * FROM st_connection_credentials"]
    assert len(db.statements) == 3 * 7


def test_new_connection_resets_the_backoff(tmp_path: Path) -> None:
    db = FakeDb()
    sleep = FakeSleep(limit=7, on_sleep=lambda n: n == 4 and db.connect("0a", "x", iss="localhost") and None)
    with pytest.raises(Stop):
        asyncio.run(fake_watcher(tmp_path, db, sleep).run())
    assert sleep.delays == [0.25, 0.5, 1.0, 2.0, 0.25, 0.5, 1.0]


def _bell_delays(tmp: Path, ring: Callable[[ownership.ConnectionBell], None] | None, limit: int) -> list[float]:
    """The pauses of a watcher with a bell on an unclaimed database; ``ring`` is called during the 2nd sleep."""
    db, bell = FakeDb(), ownership.ConnectionBell()
    sleep = FakeSleep(limit=limit, on_sleep=lambda n: n == 2 and ring is not None and ring(bell))
    with capture_logs():
        asyncio.run(watch(settings_for(tmp), Status(), None, None, "pogly",  # type: ignore[arg-type]
                          sql_fn=db, sleep=sleep, bell=bell))
    return sleep.delays


def test_with_a_bell_an_idle_watcher_looks_every_10s_and_soon_after_a_connection(tmp_path: Path) -> None:
    """Issue 15: with the module log ringing on connections, idle looks are 10 s apart (not 2 s)."""
    assert _bell_delays(tmp_path, None, 4) == [10.0] * 4
    # A connection line: a look RING_SETTLE later, then again soon (0.25, 0.5, 1, 2, 4 … up to 10 s).
    settle = ownership.RING_SETTLE
    assert _bell_delays(tmp_path, lambda bell: bell.line("[OnConnect] New guest connected", {}), 8) == [
        10.0, 10.0, settle, 0.25, 0.5, 1.0, 2.0, 4.0]
    # The log stream (re)opened: one look, then idle again (the pause after a rung look is never under 0.25 s).
    assert _bell_delays(tmp_path, lambda bell: bell.following(), 5) == [10.0, 10.0, settle, 0.25, 9.75]


def test_a_rung_bell_ends_a_long_pause_and_the_claim_follows(tmp_path: Path) -> None:
    db, bell = FakeDb(), ownership.ConnectionBell()
    sleeps: list[float] = []
    waiting = asyncio.Event()
    cancelled: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if seconds < 1.0:
            return
        waiting.set()
        try:
            await asyncio.Event().wait()  # a pause only the bell can end
        except asyncio.CancelledError:
            cancelled.append(seconds)
            raise

    async def main() -> ModuleStatus:
        status = Status()
        task = asyncio.create_task(watch(settings_for(tmp_path), status, None, None, "pogly",  # type: ignore[arg-type]
                                         sql_fn=db, sleep=sleep, bell=bell))
        await asyncio.wait_for(waiting.wait(), DEADLINE)
        looks = len(db.statements)
        bell.line("some other module line", {"function": "set_layout"})  # not a connection: still waiting
        await asyncio.sleep(0)
        assert not task.done() and len(db.statements) == looks
        alice = db.connect("0a", "alice")
        bell.line(f"[OnConnect] New guest connected {alice} at 0a!", {"function": "on_connect"})
        await asyncio.wait_for(task, DEADLINE)
        return status.module("pogly")

    with capture_logs() as cap:
        module = asyncio.run(main())
    assert (module.ownership, module.owner_identity) == ("claimed", from_claims(ISSUER, "alice"))
    assert cancelled == [10.0]  # the first pause, ended by the bell: the claim did not wait for the next look
    assert events(cap, "ownership.claimed")[0]["sub"] == "alice"


def test_which_module_lines_ring_the_bell() -> None:
    assert ownership.is_connection_line("[OnConnect] New guest connected c200ab at 0a!", {"function": "on_connect"})
    assert ownership.is_connection_line("hello", {"function": "client_connected"})
    assert ownership.is_connection_line("[OnDisconnect] Guest disconnected c200ab at 0a!", {})
    assert not ownership.is_connection_line("[Init] Server successfully started!", {"function": "init"})
    assert not ownership.is_connection_line("layout saved", {"function": None})
    bell = ownership.ConnectionBell()
    bell.line("layout saved", {})
    assert bell.answer() is None
    bell.following()  # the log stream (re)opened: lines written meanwhile are lost, so look once
    assert bell.answer() == ownership.LOOK and bell.answer() is None
    bell.following()
    bell.line("[OnConnect] New guest connected c200ab at 0a!", {"function": "on_connect"})
    assert bell.answer() == ownership.CONNECTED and bell.answer() is None


def test_claim_happy_path_statements_state_and_log(tmp_path: Path) -> None:
    db = FakeDb()
    db.connections.append(("01", payload("anon", "localhost", aud=["spacetimedb"]), from_claims("localhost", "anon")))
    alice = db.connect("02", "alice")
    watcher = fake_watcher(tmp_path, db, FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == alice and db.permissions == [(alice, 9999)]
    update = next(s for s in db.statements if s.startswith("UPDATE"))
    assert update == (f"UPDATE Config SET OwnerIdentity = 0x{alice} WHERE Version = 0 "
                      f"AND OwnerIdentity = 0x{SERVER}")
    assert watcher.status.ownership == "claimed" and watcher.status.owner_identity == alice
    assert watcher.status.claimed_by == "auto-claim sub=alice"
    claimed = events(cap, "ownership.claimed")
    assert len(claimed) == 1 and "auto-claimed ownership" in claimed[0]["message"]
    assert claimed[0]["identity"] == alice and claimed[0]["sub"] == "alice"
    assert claimed[0]["completed_after_interruption"] is False
    recorded = module_state(watcher.settings.config_dir, "pogly")["ownership"]
    assert recorded["state"] == "claimed" and recorded["owner_identity"] == alice and recorded["sub"] == "alice"
    assert watcher.seen[connection_key("01")] == "anonymous"


def test_two_in_one_poll_earliest_iat_wins_even_with_higher_identity(tmp_path: Path) -> None:
    db = FakeDb()
    subs = {from_claims(ISSUER, s): s for s in ("u1", "u2", "u3")}
    high, low = max(subs), min(subs)
    db.connect("01", subs[low], iat=1_700_000_005)
    db.connect("02", subs[high], iat=1_700_000_001)
    with capture_logs() as cap:
        assert asyncio.run(fake_watcher(tmp_path, db, FakeSleep()).run()) == "claimed"
    assert db.owner == high and db.permissions == [(high, 9999)]
    passed = events(cap, "ownership.passed_over")
    assert [(e["identity"], e["chosen"]) for e in passed] == [(low, high)]


def test_claimed_database_is_left_alone(tmp_path: Path) -> None:
    someone = from_claims(ISSUER, "someone")
    db = FakeDb(owner=someone)
    db.connect("01", "alice")
    watcher = fake_watcher(tmp_path, db, FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == someone and db.permissions == []
    assert not any(s.startswith(("UPDATE", "INSERT")) for s in db.statements)
    assert watcher.status.claimed_by.startswith("external")
    assert events(cap, "ownership.owned")[0]["how"] == "external"


def test_owner_set_between_read_and_update_is_not_overwritten(tmp_path: Path) -> None:
    rival = from_claims(ISSUER, "rival")
    db = FakeDb()
    db.connect("01", "alice")
    db.before_update = lambda: setattr(db, "owner", rival)  # e.g. Pogly's own recovery-key flow
    watcher = fake_watcher(tmp_path, db, FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == rival and db.permissions == []
    assert events(cap, "ownership.claimed_elsewhere") and not events(cap, "ownership.claimed")
    assert module_state(watcher.settings.config_dir, "pogly")["ownership"]["state"] == "external"


def test_pending_claim_that_never_updated_is_discarded(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    ownership.update_module_state(settings.config_dir, "pogly",
                                  ownership={"state": "pending", "owner_identity": ALICE, "sub": "alice"})
    db = FakeDb()
    bob = db.connect("01", "bob")
    with capture_logs() as cap:
        assert asyncio.run(fake_watcher(tmp_path, db, FakeSleep()).run()) == "claimed"
    assert db.owner == bob and db.permissions == [(bob, 9999)]
    assert events(cap, "ownership.pending_discarded")


def test_interrupted_claim_is_completed_for_the_same_owner_only(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    ownership.update_module_state(settings.config_dir, "pogly",
                                  ownership={"state": "pending", "owner_identity": ALICE, "sub": "alice"})
    db = FakeDb(owner=ALICE)  # the UPDATE happened, the INSERT did not
    db.connect("01", "bob")
    watcher = fake_watcher(tmp_path, db, FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == ALICE and db.permissions == [(ALICE, 9999)]
    claimed = events(cap, "ownership.claimed")
    assert len(claimed) == 1 and claimed[0]["completed_after_interruption"] is True
    assert "auto-claimed ownership" in claimed[0]["message"]
    assert watcher.status.claimed_by == "auto-claim sub=alice (completed after an interruption)"


def test_strict_mode_without_owner_subjects_disables_auto_claim(tmp_path: Path) -> None:
    db = FakeDb()
    db.connect("01", "alice")
    watcher = fake_watcher(tmp_path, db, FakeSleep(), strict_mode=True)
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "disabled"
    assert db.owner == SERVER and watcher.status.ownership == "disabled"
    (line,) = events(cap, "ownership.auto_claim_disabled")
    assert line["log_level"] == "warning"
    assert "OWNER_SUBJECTS" in line["message"] and "pogly-entrypoint identity --sub" in line["message"]


def test_strict_mode_with_owner_subjects_claims_only_those(tmp_path: Path) -> None:
    db = FakeDb()
    db.connect("01", "alice", iat=1)
    bob = db.connect("02", "bob", iat=2)
    watcher = fake_watcher(tmp_path, db, FakeSleep(), strict_mode=True, owner_subjects=("bob",))
    assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == bob and watcher.seen[connection_key("01")] == "not-in-owner-subjects"


def test_not_pogly_is_skipped(tmp_path: Path) -> None:
    watcher = fake_watcher(tmp_path, FakeDb(pogly=False), FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "not-pogly"
    assert watcher.status.ownership == "not-pogly" and events(cap, "ownership.skipped")


def test_outage_is_logged_once_and_polling_goes_on(tmp_path: Path) -> None:
    db = FakeDb(fail_next=[localhttp.ConnectError("refused"), localhttp.ConnectError("refused"),
                           SqlError("pogly", "x", 503, "busy")])
    alice = db.connect("01", "alice")
    watcher = fake_watcher(tmp_path, db, FakeSleep())
    with capture_logs() as cap:
        assert asyncio.run(watcher.run()) == "claimed"
    assert db.owner == alice
    warnings = [e for e in events(cap, "ownership.poll_failed") if e["log_level"] == "warning"]
    assert len(warnings) == 1 and events(cap, "ownership.poll_recovered")


def test_watch_keeps_polling_through_errors_and_cancels_cleanly(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)

    async def main() -> None:
        calls = 0
        polled_twice = asyncio.Event()

        async def broken(statement: str) -> list[dict[str, Any]]:
            nonlocal calls
            calls += 1
            if calls >= 2:
                polled_twice.set()
            raise RuntimeError("boom")

        task = asyncio.create_task(watch(settings, Status(), None, None, "pogly", sql_fn=broken))  # type: ignore[arg-type]
        await asyncio.wait_for(polled_twice.wait(), DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with capture_logs() as cap:
        asyncio.run(main())
    assert not events(cap, "ownership.failed")
    assert [e["log_level"] for e in events(cap, "ownership.poll_failed")][:2] == ["warning", "debug"]


def test_watch_contains_its_own_bugs(tmp_path: Path) -> None:
    """Anything escaping the watcher is logged and the task ends: the supervisor's TaskGroup survives."""
    async def bad_sleep(seconds: float) -> None:
        raise RuntimeError("bug")

    status = Status()
    with capture_logs() as cap:
        asyncio.run(watch(settings_for(tmp_path), status, None, None, "pogly",  # type: ignore[arg-type]
                          sql_fn=FakeDb(), sleep=bad_sleep))
    assert status.module("pogly").ownership == "unknown"
    assert events(cap, "ownership.failed")[0]["error"] == "RuntimeError: bug"


# =========================================================================== stand-in + oidc-provider

@dataclass(frozen=True)
class Idp:
    """A running provider and the one client ID it knows."""

    provider: NodeProvider
    client_id: str

    @property
    def issuer(self) -> str:
        return self.provider.issuer


_TOKENS: dict[tuple[str, str], str] = {}


def sign_in(idp: Idp, login: str) -> str:
    """An id token for ``login`` (its ``sub``): code flow + PKCE through the dev login and consent forms."""
    key = (idp.issuer, login)
    if key in _TOKENS:
        return _TOKENS[key]
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        meta = client.get(idp.issuer.rstrip("/") + "/.well-known/openid-configuration").json()
        verifier, challenge = pkce()
        redirect_uri = f"{APP_ORIGIN}/callback"
        response = follow_to_app(client, client.get(meta["authorization_endpoint"], params={
            "client_id": idp.client_id, "response_type": "code", "scope": "openid profile",
            "redirect_uri": redirect_uri, "code_challenge": challenge, "code_challenge_method": "S256",
            "state": "s", "nonce": secrets.token_urlsafe(8),
        }))
        assert 'name="login"' in response.text, response.text[:500]
        response = follow_to_app(client, client.post(str(response.url), data={
            "prompt": "login", "login": login, "password": "any"}))
        if not response.is_redirect:
            assert 'value="consent"' in response.text
            response = follow_to_app(client, client.post(str(response.url), data={"prompt": "consent"}))
        code = parse_qs(urlsplit(response.headers["location"]).query)["code"][0]
        token = client.post(meta["token_endpoint"], data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": idp.client_id, "code_verifier": verifier})
        assert token.status_code == 200, token.text
    _TOKENS[key] = token.json()["id_token"]
    return _TOKENS[key]


def _provider(*args: str, client_id: str = "pogly") -> Iterator[Idp]:
    problem = node_available()
    assert problem is None, problem  # make test installs Node.js; a missing one fails, never skips
    with node_provider(*args, "--client-id", client_id) as provider:
        yield Idp(provider, client_id)


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    """Our issuer (Authentik-shaped, trailing slash), client ``pogly``."""
    yield from _provider("--shape", "authentik")


@pytest.fixture(scope="module")
def foreign_idp() -> Iterator[Idp]:
    """Some other issuer SpacetimeDB will happily accept tokens from."""
    yield from _provider("--shape", "keycloak")


@pytest.fixture(scope="module")
def other_client_idp() -> Iterator[Idp]:
    """An issuer whose only client is ``other``: its id tokens carry ``aud: "other"``."""
    yield from _provider("--shape", "keycloak", client_id="other")


@dataclass
class Db:
    """A stand-in with the Pogly-shaped module published as ``pogly`` by a fresh publisher identity."""

    tmp: Path
    standin: StandIn
    publisher: Publisher

    @property
    def base(self) -> str:
        return self.standin.addr.url

    def restart(self) -> None:
        self.standin.stop()
        self.standin = StandIn(self.tmp / "stdb", self.tmp / "config")
        self.standin.start()

    async def sql(self, statement: str) -> list[dict[str, Any]]:
        async with localhttp.AsyncClient(base_url=self.base) as client:
            return await sql(client, self.publisher, "pogly", statement)

    async def owner(self) -> str:
        return (await self.sql("SELECT * FROM Config WHERE Version = 0"))[0]["OwnerIdentity"]

    async def owner_permissions(self) -> list[str]:
        rows = await self.sql("SELECT * FROM Permissions WHERE PermissionType = 9999")
        return sorted(r["Identity"] for r in rows)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    holder = Db(tmp_path, StandIn(tmp_path / "stdb", tmp_path / "config"), Publisher("", ""))
    holder.standin.start()
    try:
        with httpx.Client(base_url=holder.base, timeout=10) as client:
            created = client.post("/v1/identity").json()
            holder.publisher = Publisher(created["identity"], created["token"])
            published = client.put("/v1/database/pogly", content=POGLY_WASM, params={"host_type": "Wasm"},
                                   headers=holder.publisher.headers)
            assert published.status_code == 200, published.text
        yield holder
    finally:
        holder.standin.stop()


@dataclass
class Browser:
    """One open subscription, like a browser tab running the SDK."""

    ws: ClientConnection
    identity: str
    connection_id: str
    token: str | None


async def websocket_token(base: str, id_token: str) -> str:
    """``POST /v1/identity/websocket-token`` with the id token as bearer, as the SDK does first."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.post("/v1/identity/websocket-token", headers={"Authorization": f"Bearer {id_token}"})
    assert response.status_code == 200, response.text
    return response.json()["token"]


async def open_tab(base: str, token: str | None) -> Browser:
    """Subscribe (``?token=…&compression=None``, ``v1.json.spacetimedb``) and wait for IdentityToken."""
    url = base.replace("http://", "ws://") + "/v1/database/pogly/subscribe?compression=None"
    if token is not None:
        url += f"&token={token}"
    ws = await connect(url, subprotocols=["v1.json.spacetimedb"], open_timeout=10)  # type: ignore[list-item]
    first = json.loads(await asyncio.wait_for(ws.recv(), DEADLINE))["IdentityToken"]
    return Browser(ws, first["identity"]["__identity__"][2:], connection_key(first["connection_id"]), token)


async def sdk_tab(db: Db, idp: Idp, login: str) -> Browser:
    """Sign in, swap the id token for a websocket token, subscribe: the TypeScript SDK's path."""
    id_token = await asyncio.to_thread(sign_in, idp, login)
    return await open_tab(db.base, await websocket_token(db.base, id_token))


async def until(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Wait for a condition of the running watcher with a deadline.

    Polled from a worker thread so the event loop (and the watcher on it) keeps running meanwhile.
    """
    return await asyncio.to_thread(wait_for, predicate, timeout, what)


@dataclass
class LiveWatcher:
    """A Watcher task against the stand-in."""

    watcher: Watcher
    task: asyncio.Task[str]

    async def verdict(self, tab: Browser) -> str:
        return await until(lambda: self.watcher.seen.get(tab.connection_id), f"a verdict on {tab.connection_id}")

    async def finished(self) -> str:
        return await asyncio.wait_for(self.task, DEADLINE)

    async def stop(self) -> None:
        self.task.cancel()
        with_exc = await asyncio.gather(self.task, return_exceptions=True)
        assert isinstance(with_exc[0], asyncio.CancelledError | str)


def start_watcher(db: Db, settings: Settings, status: Status | None = None) -> LiveWatcher:
    client = localhttp.AsyncClient(base_url=db.base, timeout=10)

    async def run_sql(statement: str) -> list[dict[str, Any]]:
        return await sql(client, db.publisher, "pogly", statement)

    watcher = Watcher(settings, "pogly", run_sql, (status or Status()).module("pogly"))

    async def run() -> str:
        try:
            return await watcher.run()
        finally:
            await client.aclose()

    return LiveWatcher(watcher, asyncio.create_task(run()))


def live_settings(db: Db, issuer: str, **kw: Any) -> Settings:
    return Settings(oidc_issuer=issuer, oidc_client_id=kw.pop("client_id", "pogly"), config_dir=db.tmp / "config",
                    data_dir=db.tmp / "stdb", **kw)


async def close_all(*tabs: Browser) -> None:
    for tab in tabs:
        await tab.ws.close()


# --------------------------------------------------------------------------- cases


def test_stored_payload_of_an_sdk_connection_has_empty_aud(db: Db, idp: Idp) -> None:
    """The premise (reference §9): the stand-in re-signs and stores only iss/sub/hex_identity, aud []."""
    async def main() -> None:
        tab = await sdk_tab(db, idp, "alice")
        rows = await db.sql("SELECT * FROM st_connection_credentials")
        stored = {connection_key(r["connection_id"]): json.loads(r["jwt_payload"]) for r in rows}[tab.connection_id]
        assert list(stored) == ["hex_identity", "sub", "iss", "aud", "iat", "exp"]
        assert stored["aud"] == [] and stored["iss"] == idp.issuer and stored["sub"] == "alice"
        assert stored["exp"] - stored["iat"] == 60
        assert tab.identity == stored["hex_identity"] == from_claims(idp.issuer, "alice")
        await close_all(tab)

    asyncio.run(main())


def test_anonymous_first_then_oidc_user_becomes_owner(db: Db, idp: Idp) -> None:
    async def main() -> None:
        status = Status()
        live = start_watcher(db, live_settings(db, idp.issuer), status)
        anonymous = await open_tab(db.base, None)
        assert await live.verdict(anonymous) == "anonymous"
        assert await db.owner() == db.publisher.identity  # however early, anonymous never owns
        alice = await sdk_tab(db, idp, "alice")
        with capture_logs() as cap:
            assert await live.finished() == "claimed"
        expected = from_claims(idp.issuer, "alice")
        assert alice.identity == expected
        assert await db.owner() == expected
        assert await db.owner_permissions() == [expected]
        module = status.module("pogly")
        assert (module.ownership, module.owner_identity, module.claimed_by) == (
            "claimed", expected, "auto-claim sub=alice")
        (claimed,) = events(cap, "ownership.claimed")
        assert "auto-claimed ownership" in claimed["message"] and claimed["sub"] == "alice"
        assert not any(alice_token_leak(e, alice) for e in cap)
        recorded = module_state(db.tmp / "config", "pogly")["ownership"]
        assert (recorded["state"], recorded["owner_identity"], recorded["iss"]) == ("claimed", expected, idp.issuer)
        await close_all(anonymous, alice)

    asyncio.run(main())


def alice_token_leak(event: dict[str, Any], tab: Browser) -> bool:
    return tab.token is not None and tab.token in json.dumps(event, default=str)


def test_the_module_log_rings_the_watcher_when_someone_signs_in(db: Db, idp: Idp) -> None:
    """The real path (issue 15): the stand-in logs OnConnect, the follower rings, the idle watcher claims.

    Every pause longer than the first never ends by itself here, so only the bell can explain the claim.
    """
    from entrypoint.spacetimedb.module_logs import follow_module_logs

    async def sleep(seconds: float) -> None:
        if seconds <= ownership.POLL_INITIAL:
            await asyncio.sleep(seconds)
        else:
            await asyncio.Event().wait()

    async def main() -> None:
        status = Status()
        bell = ownership.ConnectionBell()
        async with localhttp.AsyncClient(base_url=db.base, timeout=10) as client:
            settings = live_settings(db, idp.issuer)
            watcher = Watcher(settings, "pogly", ownership.bound_sql(client, db.publisher, "pogly"),
                              status.module("pogly"), sleep=sleep, bell=bell)
            stop = asyncio.Event()
            follower = asyncio.create_task(follow_module_logs(settings, client, db.publisher, "pogly", stop=stop,
                                                              listener=bell))
            task = asyncio.create_task(watcher.run())
            try:
                # The first look, then one more when the log stream opened (the bell's LOOK): then it waits.
                await until(lambda: watcher.polls >= 2, "the watcher in a pause that never ends by itself")
                alice = await sdk_tab(db, idp, "alice")
                assert await asyncio.wait_for(task, DEADLINE) == "claimed"
                assert await db.owner() == alice.identity == from_claims(idp.issuer, "alice")
                await close_all(alice)
            finally:
                stop.set()
                task.cancel()
                await asyncio.gather(follower, task, return_exceptions=True)

    asyncio.run(main())


def test_foreign_issuer_never_becomes_owner(db: Db, idp: Idp, foreign_idp: Idp) -> None:
    async def main() -> None:
        live = start_watcher(db, live_settings(db, idp.issuer))
        # SpacetimeDB accepts the other issuer's token (any issuer, via its JWKS) ...
        mallory = await sdk_tab(db, foreign_idp, "alice")
        assert mallory.identity == from_claims(foreign_idp.issuer, "alice")
        # ... but the watcher refuses it, even though it connected first and the sub is the same
        assert await live.verdict(mallory) == "foreign-issuer"
        assert await db.owner() == db.publisher.identity
        bob = await sdk_tab(db, idp, "bob")
        assert await live.finished() == "claimed"
        assert await db.owner() == bob.identity == from_claims(idp.issuer, "bob")
        assert await db.owner_permissions() == [bob.identity]
        await close_all(mallory, bob)

    asyncio.run(main())


def test_raw_id_token_for_another_client_never_becomes_owner(db: Db, other_client_idp: Idp) -> None:
    """A client connecting with the id token itself: the stored payload keeps ``aud``, which is judged."""
    async def main() -> None:
        settings = live_settings(db, other_client_idp.issuer, client_id="pogly")
        live = start_watcher(db, settings)
        id_token = await asyncio.to_thread(sign_in, other_client_idp, "mallory")
        mallory = await open_tab(db.base, id_token)
        assert mallory.identity == from_claims(other_client_idp.issuer, "mallory")
        rows = await db.sql("SELECT * FROM st_connection_credentials")
        (stored,) = [json.loads(r["jwt_payload"]) for r in rows]
        assert stored["aud"] == "other"
        assert await live.verdict(mallory) == "wrong-audience"
        polls = live.watcher.polls
        await until(lambda: live.watcher.polls >= polls + 2, "two more polls")
        assert await db.owner() == db.publisher.identity and not live.task.done()
        await live.stop()
        await close_all(mallory)

    asyncio.run(main())


def test_another_client_via_websocket_token_is_indistinguishable(db: Db, other_client_idp: Idp) -> None:
    """The residual risk, pinned: after the SDK's re-signing nothing says which client the token was for.

    The stored payload is exactly what our own client's users produce, so it is
    eligible unless ``OWNER_SUBJECTS`` excludes it; with ``OWNER_SUBJECTS`` it
    is refused.  (Authentik issuers are per application, so there the issuer
    check already separates clients; a Keycloak realm issuer does not.)
    """
    async def main() -> None:
        settings = live_settings(db, other_client_idp.issuer, client_id="pogly", owner_subjects=("alice",))
        live = start_watcher(db, settings)
        mallory = await sdk_tab(db, other_client_idp, "mallory")
        rows = await db.sql("SELECT * FROM st_connection_credentials")
        (stored,) = [json.loads(r["jwt_payload"]) for r in rows]
        assert stored["aud"] == [] and "azp" not in stored
        assert eligibility(stored, mallory.identity, issuer=other_client_idp.issuer, client_id="pogly") == ELIGIBLE
        assert await live.verdict(mallory) == "not-in-owner-subjects"
        assert await db.owner() == db.publisher.identity
        await live.stop()
        await close_all(mallory)

    asyncio.run(main())


def test_owner_subjects_only_that_subject(db: Db, idp: Idp) -> None:
    async def main() -> None:
        live = start_watcher(db, live_settings(db, idp.issuer, owner_subjects=("carol",)))
        alice = await sdk_tab(db, idp, "alice")
        assert await live.verdict(alice) == "not-in-owner-subjects"
        carol = await sdk_tab(db, idp, "carol")
        assert await live.finished() == "claimed"
        assert await db.owner() == carol.identity == from_claims(idp.issuer, "carol")
        assert await db.owner_permissions() == [carol.identity]
        await close_all(alice, carol)

    asyncio.run(main())


def test_already_claimed_is_untouched_across_restarts(db: Db, idp: Idp) -> None:
    async def main() -> None:
        live = start_watcher(db, live_settings(db, idp.issuer))
        alice = await sdk_tab(db, idp, "alice")
        assert await live.finished() == "claimed"
        await close_all(alice)

    asyncio.run(main())
    first_state = module_state(db.tmp / "config", "pogly")["ownership"]
    alice = from_claims(idp.issuer, "alice")
    for _ in range(2):
        db.restart()

        async def again() -> None:
            bob = await sdk_tab(db, idp, "bob")  # eligible, and connected before the watcher looks
            status = Status()
            with capture_logs() as cap:
                async with localhttp.AsyncClient(base_url=db.base) as client:
                    await asyncio.wait_for(
                        watch(live_settings(db, idp.issuer), status, client, db.publisher, "pogly"), DEADLINE)
            assert await db.owner() == alice
            assert await db.owner_permissions() == [alice]
            module = status.module("pogly")
            assert (module.ownership, module.owner_identity, module.claimed_by) == (
                "claimed", alice, "auto-claim sub=alice")
            (owned,) = events(cap, "ownership.owned")
            assert owned["how"] == "auto-claim" and owned["identity"] == alice
            assert not events(cap, "ownership.claimed")
            await close_all(bob)

        asyncio.run(again())
    assert module_state(db.tmp / "config", "pogly")["ownership"] == first_state


def test_owner_set_outside_auto_claim_is_untouched(db: Db, idp: Idp) -> None:
    """E.g. Pogly's own recovery-key flow, or an operator's SQL, before we ever looked."""
    someone = from_claims("https://elsewhere.example", "someone")

    async def main() -> None:
        await db.sql(f"UPDATE Config SET OwnerIdentity = 0x{someone} WHERE Version = 0")
        alice = await sdk_tab(db, idp, "alice")
        live = start_watcher(db, live_settings(db, idp.issuer))
        assert await live.finished() == "claimed"
        assert await db.owner() == someone and await db.owner_permissions() == []
        assert live.watcher.status.claimed_by.startswith("external")
        await close_all(alice)

    asyncio.run(main())


def test_two_eligible_in_one_poll_single_deterministic_owner(db: Db, idp: Idp) -> None:
    async def main() -> None:
        dave = await sdk_tab(db, idp, "dave")
        erin = await sdk_tab(db, idp, "erin")
        rows = await db.sql("SELECT * FROM st_connection_credentials")
        stored = [json.loads(r["jwt_payload"]) for r in rows]
        expected = min(stored, key=lambda p: (p["iat"], p["hex_identity"]))["hex_identity"]
        with capture_logs() as cap:
            live = start_watcher(db, live_settings(db, idp.issuer))
            assert await live.finished() == "claimed"
        assert live.watcher.polls == 1  # both were there at the first look
        assert await db.owner() == expected
        assert await db.owner_permissions() == [expected]
        (passed,) = events(cap, "ownership.passed_over")
        other = ({dave.identity, erin.identity} - {expected}).pop()
        assert passed["chosen"] == expected and passed["identity"] == other
        await close_all(dave, erin)

    asyncio.run(main())


class Crash(BaseException):
    """The entrypoint dying between the two statements (not an Exception: nothing may catch it)."""


def test_crash_between_update_and_insert_is_completed_on_next_boot(db: Db, idp: Idp) -> None:
    alice = from_claims(idp.issuer, "alice")
    settings = live_settings(db, idp.issuer)

    async def first_boot() -> None:
        tab = await sdk_tab(db, idp, "alice")
        async with localhttp.AsyncClient(base_url=db.base) as client:
            async def crashing(statement: str) -> list[dict[str, Any]]:
                rows = await sql(client, db.publisher, "pogly", statement)
                if statement.startswith("UPDATE Config"):
                    raise Crash
                return rows

            with pytest.raises(Crash):
                await asyncio.wait_for(watch(settings, Status(), client, db.publisher, "pogly", sql_fn=crashing),
                                       DEADLINE)
        assert await db.owner() == alice
        assert await db.owner_permissions() == []  # the crash left the claim half done
        await close_all(tab)

    asyncio.run(first_boot())
    assert module_state(db.tmp / "config", "pogly")["ownership"]["state"] == "pending"
    db.restart()

    async def next_boot() -> None:
        bob = await sdk_tab(db, idp, "bob")  # eligible and connected: must not become a second owner
        status = Status()
        with capture_logs() as cap:
            async with localhttp.AsyncClient(base_url=db.base) as client:
                await asyncio.wait_for(watch(settings, status, client, db.publisher, "pogly"), DEADLINE)
        assert await db.owner() == alice
        assert await db.owner_permissions() == [alice]
        (claimed,) = events(cap, "ownership.claimed")
        assert claimed["completed_after_interruption"] is True and claimed["identity"] == alice
        assert "auto-claimed ownership" in claimed["message"]
        assert status.module("pogly").claimed_by == "auto-claim sub=alice (completed after an interruption)"
        await close_all(bob)

    asyncio.run(next_boot())
    recorded = module_state(db.tmp / "config", "pogly")["ownership"]
    assert recorded["state"] == "claimed" and recorded["completed_after_interruption"] is True


def test_strict_mode_without_owner_subjects_is_disabled_live(db: Db, idp: Idp) -> None:
    async def main() -> None:
        alice = await sdk_tab(db, idp, "alice")
        status = Status()
        with capture_logs() as cap:
            async with localhttp.AsyncClient(base_url=db.base) as client:
                await asyncio.wait_for(watch(live_settings(db, idp.issuer, strict_mode=True), status, client,
                                             db.publisher, "pogly"), DEADLINE)
        assert status.module("pogly").ownership == "disabled"
        assert await db.owner() == db.publisher.identity and await db.owner_permissions() == []
        (line,) = events(cap, "ownership.auto_claim_disabled")
        assert "OWNER_SUBJECTS" in line["message"] and "pogly-entrypoint identity --sub" in line["message"]
        await close_all(alice)

    asyncio.run(main())


def test_identity_cli_prints_what_the_owner_will_be(idp: Idp) -> None:
    """``pogly-entrypoint identity --sub X`` (the hint in the disabled message) agrees with SpacetimeDB."""
    import subprocess

    exe = shutil.which("pogly-entrypoint", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "identity", "--sub", "alice"], capture_output=True, text=True, timeout=30,
                         env={"OIDC_ISSUER": idp.issuer, "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == from_claims(idp.issuer, "alice")


# --------------------------------------------------------------------------- whole program


def test_supervisor_runs_the_watcher_and_stops_cleanly_while_unclaimed(tmp_path: Path) -> None:
    """``pogly-entrypoint run`` starts the watcher after publishing; SIGTERM mid-watch leaves no traceback."""

    from tests.harness import Running, base_env

    with Running(base_env(tmp_path)) as run:
        unclaimed = run.wait_event("ownership.unclaimed", timeout=60)
        assert unclaimed["module"] == "pogly" and "Residual risk" in unclaimed["message"]
        run.stop()
    output = "\n".join(run.raw + run.stderr)
    assert "Traceback" not in output and "CancelledError" not in output
    assert not run.find(lambda e: e.get("event") in ("ownership.failed", "ownership.poll_failed"))
