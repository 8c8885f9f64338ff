"""First sign-in becomes Pogly's owner: exactly once per database, never stolen.

Why this exists: a self-hosted Pogly asks its first user to "verify ownership"
with a recovery key nobody ever received.  Instead, the entrypoint (which owns
the database as its publisher and may therefore read private tables and run
SQL DML) watches who connects and makes the first *eligible* OIDC user the
owner, then stops watching.

How Pogly records ownership (facts the module relies on):

* ``Config`` row ``Version = 0`` has ``OwnerIdentity``; ``Heartbeat`` row
  ``Id = 0`` has ``ServerIdentity``.  Ownership is **unclaimed** while the two
  are equal (``Init`` sets both to the publisher).
* The owner also has a ``Permissions`` row (``Identity``, ``PermissionType = 9999``).
* Each open browser connection is a ``Guests`` row (``Address`` = connection
  id, ``Identity``); SpacetimeDB keeps the JWT claims the connection used in
  the private system table ``st_connection_credentials`` (``jwt_payload``).

Who is eligible, and why each rule:

* ``iss`` is **exactly** ``OIDC_ISSUER``: SpacetimeDB accepts tokens from any
  issuer (and mints ``localhost`` identities for anonymous visitors such as
  OBS overlays), so anything else could be anybody.
* ``hex_identity`` (when present) and the guest's identity both equal
  ``from_claims(iss, sub)``: the row we promote is the person the claims name.
* ``aud``, when non-empty, contains ``OIDC_CLIENT_ID``.  An **empty** ``aud`` is
  accepted on purpose: the TypeScript SDK swaps the id token for a 60-second
  token that SpacetimeDB re-signs with ``aud: []`` and only ``iss``/``sub``
  kept (``POST /v1/identity/websocket-token``), so every real browser
  connection looks like that.  Only a client that connects with the raw id
  token is judged on ``aud``.
* With ``OWNER_SUBJECTS`` set, ``sub`` must be one of them.

Residual risk, stated plainly: without ``OWNER_SUBJECTS`` **any account at the
issuer that connects first becomes the owner**.  For Authentik the issuer is
per application (only users allowed into that application get tokens with
that ``iss``); for Keycloak the issuer is the whole realm, so every realm
user, through any client of the realm, qualifies - the re-signed websocket
token hides which client the id token was for.  Set ``OWNER_SUBJECTS`` (print
a subject's identity with ``pogly-entrypoint identity --sub X``) whenever the
issuer has accounts you do not trust; ``STRICT_MODE`` refuses to auto-claim
without it.

Exactly once: the claim is an ``UPDATE … WHERE OwnerIdentity = <server>`` (it
cannot overwrite an owner set meanwhile), then the ``Permissions`` row, each
read back.  The intent is written to the config volume *before* the UPDATE,
so a crash between the two statements is completed on the next boot for that
same identity instead of watching again and admitting a second owner.

The operator's way to change an owner on purpose is ``pogly-entrypoint owner
set`` (owner_admin.py).  It uses the same statements (``owner_update``,
``ensure_owner_permission``) and records ``state: "set"``; a database it set
is claimed, so a watcher still polling sees that at its next look and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.spacetimedb.identity import from_claims, normalize_hex
from entrypoint.spacetimedb.sql import SqlError, is_missing_table, sql, sql_identity
from entrypoint.spacetimedb.statefile import module_state, update_module_state
from entrypoint.supervision.restart import delays

if TYPE_CHECKING:
    from pathlib import Path

    from entrypoint.config import Settings
    from entrypoint.localhttp import AsyncClient
    from entrypoint.spacetimedb.credentials import Publisher
    from entrypoint.supervision.status import ModuleStatus, Status

log = logs.get("ownership")

OWNER_PERMISSION = 9999
ANONYMOUS_ISSUER = "localhost"
POLL_INITIAL = 0.25
#: The pace when nothing tells the watcher that someone connected: it must find a sign-in by itself.
POLL_MAXIMUM = 2.0
#: The pace when the module log rings the bell on every connection (``ConnectionBell``): a safety net
#: only, for a line that never came (a module that stopped logging it, an operator's `owner set`).
#: Each idle look is three SQL reads, ~5 wake-ups of PID 1: 2 s made 2.7 wake-ups/s, 10 s ~0.5/s.
SAFETY_POLL_MAXIMUM = 10.0
#: After the bell, before the look: the line is logged inside ``OnConnect``, before its rows commit.
RING_SETTLE = 0.1
STATE_KEY = "ownership"  # key inside the module's entry of pogly-entrypoint.json

# The ownership record in the state file: its "state" values
REC_PENDING = "pending"      # auto-claim intent written, UPDATE maybe not applied
REC_CLAIMED = "claimed"      # auto-claimed by this entrypoint
REC_SET = "set"              # set by an operator with `pogly-entrypoint owner set`
REC_EXTERNAL = "external"    # owned, but not by any of the above

# Outcomes reported in ModuleStatus.ownership
CLAIMED = "claimed"
UNCLAIMED = "unclaimed"
NOT_POGLY = "not-pogly"
DISABLED = "disabled"

# What a rung ConnectionBell says
LOOK = "look"            # look once (the log stream was (re)opened)
CONNECTED = "connected"  # someone connected: look, then again soon

# Reasons a connection is not eligible (logged, and kept in Watcher.seen)
ELIGIBLE = "eligible"
R_UNREADABLE = "unreadable-payload"
R_ANONYMOUS = "anonymous"
R_FOREIGN_ISSUER = "foreign-issuer"
R_NO_SUB = "no-sub"
R_TOKEN_IDENTITY = "hex-identity-mismatch"
R_AUDIENCE = "wrong-audience"
R_NOT_LISTED = "not-in-owner-subjects"
R_NO_GUEST = "no-guest-row"
R_GUEST_IDENTITY = "guest-identity-mismatch"


SqlFn = Callable[[str], Awaitable[list[dict[str, Any]]]]
Sleep = Callable[[float], Awaitable[None]]


class Unsupported(Exception):
    """The database cannot be auto-claimed at all (no Pogly tables, no credentials table)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


# ---------------------------------------------------------------------------
# Pure rules (no I/O): eligibility and the tie-break
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An open connection whose claims make it eligible to become the owner."""

    connection_id: str
    identity: str
    iss: str
    sub: str
    iat: float | None

    def sort_key(self) -> tuple[float, str]:
        """Earliest ``iat`` first (a missing one last), then the lowest identity: total and stable."""
        return (self.iat if self.iat is not None else float("inf"), self.identity)


def parse_payload(raw: Any) -> dict[str, Any] | None:
    """``jwt_payload`` (a JSON string, or already decoded) → claims dict, or None when unreadable."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _audience_ok(aud: Any, client_id: str) -> bool:
    """Empty/missing ``aud`` passes (re-signed websocket tokens); otherwise it must name our client."""
    if aud is None or aud == "" or aud == []:
        return True
    if isinstance(aud, str):
        return aud == client_id
    if isinstance(aud, list):
        return client_id in aud
    return False


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def eligibility(payload: Mapping[str, Any] | None, guest_identity: str | None, *, issuer: str,
                client_id: str, owner_subjects: Iterable[str] = ()) -> str:
    """``ELIGIBLE`` or the first reason this connection may not become the owner.

    ``guest_identity`` is the ``Guests.Identity`` of the same connection (None
    when Pogly has no row for it).  The order of the checks only decides which
    reason is reported; every one of them must pass.
    """
    if payload is None:
        return R_UNREADABLE
    iss, sub = payload.get("iss"), payload.get("sub")
    if iss == ANONYMOUS_ISSUER:
        return R_ANONYMOUS
    if not isinstance(iss, str) or iss != issuer:
        return R_FOREIGN_ISSUER
    if not isinstance(sub, str) or not sub:
        return R_NO_SUB
    expected = from_claims(iss, sub)
    hex_identity = payload.get("hex_identity")
    if hex_identity is not None:
        try:
            if not isinstance(hex_identity, str) or normalize_hex(hex_identity) != expected:
                return R_TOKEN_IDENTITY
        except ValueError:
            return R_TOKEN_IDENTITY
    if not _audience_ok(payload.get("aud"), client_id):
        return R_AUDIENCE
    subjects = tuple(owner_subjects)
    if subjects and sub not in subjects:
        return R_NOT_LISTED
    if guest_identity is None:
        return R_NO_GUEST
    try:
        if normalize_hex(guest_identity) != expected:
            return R_GUEST_IDENTITY
    except ValueError:
        return R_GUEST_IDENTITY
    return ELIGIBLE


def choose(candidates: Iterable[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The one winner and the others, deterministically (several eligible users in one poll).

    The same identity on two connections counts once, so it is never "passed
    over" in favour of itself.
    """
    ordered = sorted(candidates, key=Candidate.sort_key)
    if not ordered:
        raise ValueError("no candidates")
    winner = ordered[0]
    others: list[Candidate] = []
    seen = {winner.identity}
    for candidate in ordered[1:]:
        if candidate.identity not in seen:
            seen.add(candidate.identity)
            others.append(candidate)
    return winner, others


def connection_key(value: Any) -> str:
    """One spelling for a ConnectionId cell, whatever shape the SQL answer used.

    SATS-JSON may give a u128 number or ``0x…`` hex (with or without leading
    zeros); two columns of the same connection must compare equal.
    """
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return format(value, "032x")
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0x") else text
        with contextlib.suppress(ValueError):
            return format(int(text, 16), "032x")
        return text
    return str(value)


def is_connection_line(message: str, fields: Mapping[str, Any]) -> bool:
    """Whether a module-log line may announce a new connection (so ownership is worth a look now).

    Pogly's ``OnConnect`` reducer logs ``[OnConnect] New guest connected …``; SpacetimeDB names the
    reducer in ``function``.  Deliberately loose (any mention of "connect", disconnects included):
    a needless look costs three SQL reads, a missed one up to ``SAFETY_POLL_MAXIMUM`` of waiting.
    """
    return "connect" in f"{fields.get('function') or ''} {message}".lower()


class ConnectionBell:
    """Rung by a module's log follower when someone may have connected; the ownership watcher listens.

    Why: polling SQL every 2 s while a database is unclaimed woke PID 1 ~2.7 times a second for as
    long as nobody signed in.  Every connection runs Pogly's ``OnConnect``, which logs a line the
    follower already reads, so the watcher looks when that line comes (and a few times soon after)
    and otherwise only rarely.  Also rung, for one look, when the follower (re)connects: lines
    written while it was away are never replayed.  Implements ``module_logs.LogListener``.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.connected = False  # a connection line came (not only a (re)opened stream)

    def following(self) -> None:
        self.event.set()

    def line(self, message: str, fields: Mapping[str, Any]) -> None:
        if is_connection_line(message, fields):
            self.connected = True
            self.event.set()

    def answer(self) -> str | None:
        """Whether it rang since the last answer: ``CONNECTED``, ``LOOK`` or None; then silent again."""
        rang = (CONNECTED if self.connected else LOOK) if self.event.is_set() else None
        self.event.clear()
        self.connected = False
        return rang


def disabled_message(settings: Settings) -> str:
    """What an operator reads when OIDC off or STRICT_MODE turned auto-claim off."""
    if not settings.oidc_enabled:
        return (
            "OIDC is off (OIDC_ISSUER and OIDC_CLIENT_ID are empty), so auto-claim is disabled: nobody signs in, "
            "so nobody can become the owner by signing in first. Give the database an owner with "
            "`pogly-entrypoint owner set --identity <hex>`"
        )
    return (
        "STRICT_MODE=true and OWNER_SUBJECTS is empty, so auto-claim is disabled: nobody becomes the owner "
        "by signing in first. Set OWNER_SUBJECTS to the space-separated 'sub' claim(s) of the account(s) "
        f"allowed to claim ownership at {settings.oidc_issuer} and restart; "
        "`pogly-entrypoint identity --sub <sub>` prints the SpacetimeDB identity a subject will have"
    )


# ---------------------------------------------------------------------------
# Reading and changing the owner: shared by the watcher and `owner set`
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ownership:
    """What Pogly's tables say: ``Config.OwnerIdentity`` and ``Heartbeat.ServerIdentity``.

    ``config_init`` is None when the row has no such column (older shapes,
    test fakes); it is reported, never used to decide "claimed".
    """

    owner: str
    server: str
    config_init: bool | None = None

    @property
    def claimed(self) -> bool:
        return self.owner != self.server


async def read_ownership(sql_fn: SqlFn) -> Ownership:
    """The owner and the database's own identity, or ``Unsupported(NOT_POGLY)`` for another module."""
    try:
        config = await sql_fn("SELECT * FROM Config WHERE Version = 0")
        heartbeat = await sql_fn("SELECT * FROM Heartbeat WHERE Id = 0")
    except SqlError as exc:
        if is_missing_table(exc):
            raise Unsupported(NOT_POGLY, f"no Config/Heartbeat table ({exc.text})") from None
        raise
    try:
        owner = normalize_hex(str(config[0]["OwnerIdentity"]))
        server = normalize_hex(str(heartbeat[0]["ServerIdentity"]))
    except (IndexError, KeyError, ValueError):
        raise Unsupported(NOT_POGLY, "no Config row 0 with OwnerIdentity or Heartbeat row 0 with ServerIdentity") \
            from None
    init = config[0].get("ConfigInit")
    return Ownership(owner, server, init if isinstance(init, bool) else None)


def owner_update(identity: str, *, replacing: str | None = None, close_onboarding: bool = False) -> str:
    """The one statement that makes ``identity`` the owner in ``Config`` row 0.

    ``replacing``: only if the owner is still that identity (auto-claim: never
    overwrite an owner set meanwhile).  ``close_onboarding`` also sets
    ``ConfigInit = true``: while it is false, Pogly's ``SetConfig`` makes
    whoever finishes the onboarding the owner, undoing an explicit choice.
    """
    assignments = f"OwnerIdentity = {sql_identity(identity)}" + (", ConfigInit = true" if close_onboarding else "")
    condition = f" AND OwnerIdentity = {sql_identity(replacing)}" if replacing is not None else ""
    return f"UPDATE Config SET {assignments} WHERE Version = 0{condition}"


def _permission_select(identity: str) -> str:
    return (f"SELECT * FROM Permissions WHERE Identity = {sql_identity(identity)} "
            f"AND PermissionType = {OWNER_PERMISSION}")


async def ensure_owner_permission(sql_fn: SqlFn, identity: str) -> bool:
    """The owner's ``Permissions`` row exists afterwards; True when this call inserted it."""
    if await sql_fn(_permission_select(identity)):
        return False
    await sql_fn(f"INSERT INTO Permissions (Identity, PermissionType) "
                 f"VALUES ({sql_identity(identity)}, {OWNER_PERMISSION})")
    if not await sql_fn(_permission_select(identity)):
        raise RuntimeError("the owner's Permissions row is not there after the INSERT")
    return True


async def owner_permissions(sql_fn: SqlFn) -> list[str]:
    """Every identity holding the Owner permission (sorted), or ``Unsupported`` without that table."""
    try:
        rows = await sql_fn(f"SELECT * FROM Permissions WHERE PermissionType = {OWNER_PERMISSION}")
    except SqlError as exc:
        if is_missing_table(exc):
            raise Unsupported(NOT_POGLY, f"no Permissions table ({exc.text})") from None
        raise
    found: set[str] = set()
    for row in rows:
        with contextlib.suppress(ValueError):
            found.add(normalize_hex(str(row.get("Identity"))))
    return sorted(found)


async def revoke_owner_permission(sql_fn: SqlFn, identity: str) -> None:
    """Remove one identity's Owner permission (its other permissions are kept)."""
    await sql_fn(f"DELETE FROM Permissions WHERE Identity = {sql_identity(identity)} "
                 f"AND PermissionType = {OWNER_PERMISSION}")


def describe_record(recorded: Mapping[str, Any]) -> str | None:
    """How the recorded owner got there, in words (``claimed_by`` in status, ``owner show``)."""
    state = recorded.get("state")
    if state == REC_CLAIMED:
        return f"auto-claim sub={recorded.get('sub')}"
    if state == REC_SET:
        if recorded.get("sub") is not None:
            return f"owner set --sub {recorded.get('sub')} --issuer {recorded.get('iss')}"
        return "owner set --identity"
    if state == REC_EXTERNAL:
        return "external (not auto-claimed by this entrypoint)"
    return None


def record_owner_set(config_dir: Path, module: str, identity: str, *, previous_owner: str,
                     sub: str | None, iss: str | None, now: float,
                     previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Remember in the state file that an operator set this owner (read by the watcher and ``owner show``).

    Written *before* the first statement, like auto-claim's intent: a watcher
    that polls between the UPDATE and the end of the command must already
    find out who set the owner, or it records "external".  Everyone reading
    the record trusts it only while its ``owner_identity`` is the database's
    owner, so an attempt that failed before the UPDATE misleads nobody.
    ``previous`` (the record this one replaces, one level deep) keeps e.g.
    who auto-claimed before.
    """
    entry: dict[str, Any] = {"state": REC_SET, "how": "owner-set", "owner_identity": identity,
                             "previous_owner": previous_owner, "set_at": now}
    if sub is not None:
        entry.update(sub=sub, iss=iss)
    if previous:
        entry["previous"] = {k: v for k, v in previous.items() if k != "previous"}
    return update_module_state(config_dir, module, **{STATE_KEY: entry})


# ---------------------------------------------------------------------------
# The watcher
# ---------------------------------------------------------------------------


@dataclass
class Watcher:
    """Reads one module's ownership and, while unclaimed, polls for the first eligible connection.

    Everything that talks to SpacetimeDB goes through ``sql_fn`` (one
    statement → rows) and every pause through ``sleep``, so the state machine
    runs in tests against a fake without a server or real time.

    ``bell`` (rung by the module's log follower) ends a pause early: the
    watcher looks ``RING_SETTLE`` later.  Idle pauses are then ``maximum``
    from the start; after a connection line they start over from ``initial``
    (its rows may commit a little after the line), and a pause after a rung
    look is never shorter than ``initial``, whatever rings.  Without a bell the
    pauses grow from ``initial`` to ``maximum``: nothing else says when
    someone connects.
    """

    settings: Settings
    module: str
    sql_fn: SqlFn
    status: ModuleStatus
    sleep: Sleep = asyncio.sleep
    now: Callable[[], float] = time.time
    initial: float = POLL_INITIAL
    maximum: float = POLL_MAXIMUM
    bell: ConnectionBell | None = None
    # connection id → ELIGIBLE or the reason it was not (only the currently open connections)
    seen: dict[str, str] = field(default_factory=dict)
    polls: int = 0
    _problem_logged: bool = field(default=False, init=False)
    _announced: bool = field(default=False, init=False)
    _rang: bool = field(default=False, init=False)  # the last look was the bell's

    # -- entry point -------------------------------------------------------------------------
    async def run(self) -> str:
        """Return the final outcome ("claimed", "not-pogly", "disabled", …) once there is nothing to watch."""
        pauses = self._pauses(busy=False)
        while True:
            try:
                outcome = await self._step()
            except Unsupported as exc:
                self.status.ownership = exc.outcome
                return exc.outcome
            except SqlError as exc:
                self._transient(f"SQL refused ({exc.status}): {exc.text}")
                outcome = "error"
            except Exception as exc:  # SpacetimeDB restarting, connection refused, timeouts …
                self._transient(f"{type(exc).__name__}: {exc}".rstrip(": "))
                outcome = "error"
            else:
                if self._problem_logged:
                    log.info("ownership.poll_recovered", module=self.module)
                    self._problem_logged = False
            if outcome in (CLAIMED, DISABLED):
                return outcome
            if outcome == "activity":
                pauses = self._pauses(busy=True)  # someone is connecting: look again soon
            rang = await self._pause(next(pauses))
            if rang is not None:  # this look comes early; someone connected: soon again too
                pauses = self._pauses(busy=rang == CONNECTED)

    def _pauses(self, *, busy: bool) -> Iterator[float]:
        """From ``initial`` up to ``maximum``; idle with a bell, ``maximum`` straight away."""
        return delays(self.maximum if self.bell is not None and not busy else self.initial, self.maximum)

    async def _pause(self, seconds: float) -> str | None:
        """Wait ``seconds``, or less when the bell rings; what it said, if it rang.

        One timer per pause while nothing rings (each is a wake-up of PID 1).  After a look the bell
        asked for, the next pause lasts at least ``initial``: a storm of connections costs at most
        one look per ``initial``.
        """
        if self.bell is None:
            await self.sleep(seconds)
            return None
        if self._rang:
            gap = min(seconds, self.initial)
            await self.sleep(gap)
            seconds -= gap
        if not self.bell.event.is_set() and seconds > 0:
            sleeper = asyncio.ensure_future(self.sleep(seconds))
            ringing = asyncio.ensure_future(self.bell.event.wait())
            try:
                await asyncio.wait({sleeper, ringing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, ringing):
                    task.cancel()
                await asyncio.gather(sleeper, ringing, return_exceptions=True)
            if sleeper.done() and not sleeper.cancelled() and sleeper.exception() is not None:
                raise sleeper.exception()  # type: ignore[misc]
        rang = self.bell.answer()
        self._rang = rang is not None
        if rang is not None:
            await self.sleep(RING_SETTLE)
        return rang

    def _transient(self, error: str) -> None:
        """Keep polling through outages; say so once, not every 2 s."""
        if not self._problem_logged:
            log.warning("ownership.poll_failed", module=self.module, error=error,
                        message="could not read or change the ownership state; retrying every few seconds")
            self._problem_logged = True
        else:
            log.debug("ownership.poll_failed", module=self.module, error=error)

    # -- one poll -------------------------------------------------------------------------------
    async def _step(self) -> str:
        """One look at the database; returns CLAIMED/DISABLED (done), "activity", or "idle"."""
        self.polls += 1
        current = await self._read_ownership()
        if current.claimed:
            await self._settle_claimed(current)
            return CLAIMED
        recorded = self._recorded()
        if recorded.get("state") == REC_PENDING:
            # The UPDATE never took effect (crash or refusal before it): nothing to complete.
            log.info("ownership.pending_discarded", module=self.module,
                     identity=recorded.get("owner_identity"),
                     message="an interrupted claim had not changed the owner; watching again")
            update_module_state(self.settings.config_dir, self.module,
                                **{STATE_KEY: {"state": "unclaimed", "discarded": recorded}})
        if not self.settings.oidc_enabled or (self.settings.strict_mode and not self.settings.owner_subjects):
            self.status.ownership = DISABLED
            self.status.owner_identity = None
            log.warning("ownership.auto_claim_disabled", module=self.module, message=disabled_message(self.settings))
            return DISABLED
        self.status.ownership = UNCLAIMED
        self.status.owner_identity = None
        if not self._announced:
            self._announce_unclaimed()
            self._announced = True
        candidates, changed = await self._candidates()
        if not candidates:
            return "activity" if changed else "idle"
        winner, others = choose(candidates)
        for other in others:
            log.info("ownership.passed_over", module=self.module, identity=other.identity, sub=other.sub,
                     iat=other.iat, chosen=winner.identity,
                     message=f"{other.sub} connected in the same poll as {winner.sub}; the earliest token "
                             "(then the lowest identity) wins")
        await self._claim(winner, current)
        return CLAIMED

    def _announce_unclaimed(self) -> None:
        subjects = list(self.settings.owner_subjects)
        issuer = self.settings.oidc_issuer
        if subjects:
            rule = f"the first of OWNER_SUBJECTS {subjects} to sign in through {issuer} becomes the owner"
        else:
            rule = (f"the first account to sign in through {issuer} becomes the owner. Residual risk: ANY "
                    "account at that issuer qualifies (a Keycloak issuer is the whole realm); set "
                    "OWNER_SUBJECTS to the allowed 'sub' values to restrict it")
        log.info("ownership.unclaimed", module=self.module, issuer=issuer, owner_subjects=subjects or None,
                 message=f"nobody owns {self.module!r} yet: {rule}")

    async def _read_ownership(self) -> Ownership:
        try:
            return await read_ownership(self.sql_fn)
        except Unsupported as exc:
            log.info("ownership.skipped", module=self.module, reason=str(exc),
                     message=f"{self.module!r} is not shaped like Pogly's module; ownership is not managed")
            raise

    async def _candidates(self) -> tuple[list[Candidate], bool]:
        """Eligible open connections, and whether the set of connections changed since the last poll."""
        try:
            credentials = await self.sql_fn("SELECT * FROM st_connection_credentials")
        except SqlError as exc:
            if is_missing_table(exc):
                log.error("ownership.unsupported", module=self.module, server_message=exc.text,
                          message="this SpacetimeDB does not expose st_connection_credentials, so the first "
                                  "user cannot be recognised; auto-claim is off for this database")
                raise Unsupported(UNCLAIMED, exc.text) from None
            raise
        payloads: dict[str, dict[str, Any] | None] = {}
        for row in credentials:
            payloads[connection_key(row.get("connection_id"))] = parse_payload(row.get("jwt_payload"))
        changed = set(payloads) != set(self.seen)
        guests: dict[str, str] = {}
        if any(self._judge(p, None) == R_NO_GUEST for p in payloads.values()):
            # Only worth a query when someone passed every claim check.
            for row in await self.sql_fn("SELECT * FROM Guests"):
                identity = row.get("Identity")
                if isinstance(identity, str):
                    guests[connection_key(row.get("Address"))] = identity
        candidates: list[Candidate] = []
        current: dict[str, str] = {}
        for cid, payload in payloads.items():
            verdict = self._judge(payload, guests.get(cid))
            current[cid] = verdict
            if verdict == ELIGIBLE and payload is not None:
                candidates.append(Candidate(cid, from_claims(payload["iss"], payload["sub"]), payload["iss"],
                                            payload["sub"], _number(payload.get("iat"))))
            elif self.seen.get(cid) != verdict:
                self._log_ineligible(cid, payload, guests.get(cid), verdict)
        self.seen = current
        return candidates, changed

    def _judge(self, payload: Mapping[str, Any] | None, guest: str | None) -> str:
        return eligibility(payload, guest, issuer=self.settings.oidc_issuer,
                           client_id=self.settings.oidc_client_id, owner_subjects=self.settings.owner_subjects)

    def _log_ineligible(self, cid: str, payload: Mapping[str, Any] | None, guest: str | None, reason: str) -> None:
        """Once per connection and reason; anonymous visitors (overlays) only at debug level."""
        fields: dict[str, Any] = {"module": self.module, "connection_id": cid, "reason": reason}
        if payload is not None:
            fields.update(iss=payload.get("iss"), sub=payload.get("sub"), aud=payload.get("aud"))
        if guest is not None:
            fields["identity"] = guest
        if reason == R_ANONYMOUS:
            log.debug("ownership.ineligible", **fields)
        elif reason == R_NO_GUEST:
            log.debug("ownership.ineligible", **fields, message="no Guests row for this connection yet")
        else:
            log.info("ownership.ineligible", **fields, message="this connection may not become the owner")

    # -- claiming ---------------------------------------------------------------------------------
    def _recorded(self) -> dict[str, Any]:
        entry = module_state(self.settings.config_dir, self.module).get(STATE_KEY)
        return dict(entry) if isinstance(entry, dict) else {}

    async def _claim(self, winner: Candidate, current: Ownership) -> None:
        """Intent on disk, then the conditional UPDATE; the Permissions row follows in _settle_claimed.

        Any failure raises: the next poll reads the owner back and either
        completes this claim (UPDATE applied) or discards it (not applied).
        """
        update_module_state(self.settings.config_dir, self.module, **{STATE_KEY: {
            "state": REC_PENDING, "owner_identity": winner.identity, "sub": winner.sub, "iss": winner.iss,
            "connection_id": winner.connection_id, "iat": winner.iat, "started_at": self.now(),
        }})
        await self.sql_fn(owner_update(winner.identity, replacing=current.server))
        after = await self._read_ownership()
        if not after.claimed:
            raise RuntimeError(f"the owner UPDATE did not take effect (OwnerIdentity is still {after.owner})")
        await self._settle_claimed(after, just_claimed=True)

    async def _settle_claimed(self, current: Ownership, *, just_claimed: bool = False) -> None:
        """Report an owned database; finish our own interrupted claim, for that same owner only.

        ``just_claimed``: this run's UPDATE set the owner a moment ago.  Otherwise
        a "pending" record means an earlier run (or poll) was cut short after
        the UPDATE: the owner is already decided, only the Permissions row and
        the record may be missing, and completing them creates no second owner.
        """
        recorded = self._recorded()
        ours = recorded.get("owner_identity") == current.owner
        self.status.ownership = CLAIMED
        self.status.owner_identity = current.owner
        if ours and recorded.get("state") == REC_PENDING:
            inserted = await ensure_owner_permission(self.sql_fn, current.owner)
            resumed = not just_claimed
            sub = recorded.get("sub")
            entry = {**recorded, "state": REC_CLAIMED, "claimed_at": self.now(), "how": "auto-claim"}
            if resumed:
                entry["completed_after_interruption"] = True
            update_module_state(self.settings.config_dir, self.module, **{STATE_KEY: entry})
            self.status.claimed_by = f"auto-claim sub={sub}" + (" (completed after an interruption)"
                                                                 if resumed else "")
            log.info("ownership.claimed", module=self.module, identity=current.owner, sub=sub,
                     iss=recorded.get("iss"), completed_after_interruption=resumed,
                     permission_inserted=inserted,
                     message=f"auto-claimed ownership of {self.module!r} for {sub} ({current.owner})"
                             + ("; completed a claim that was interrupted before its Permissions row"
                                if resumed else ""))
            return
        if ours and recorded.get("state") == REC_CLAIMED:
            self.status.claimed_by = describe_record(recorded)
            log.info("ownership.owned", module=self.module, identity=current.owner, sub=recorded.get("sub"),
                     how="auto-claim", claimed_at=recorded.get("claimed_at"),
                     message=f"{self.module!r} is owned by {current.owner} (auto-claimed for "
                             f"{recorded.get('sub')}); nothing to do")
            return
        if ours and recorded.get("state") == REC_SET:
            # An operator chose this owner (`owner set`): a watcher still polling stops here.
            self.status.claimed_by = describe_record(recorded)
            log.info("ownership.owned", module=self.module, identity=current.owner, how="owner-set",
                     sub=recorded.get("sub"), set_at=recorded.get("set_at"),
                     message=f"{self.module!r} is owned by {current.owner}, set with `pogly-entrypoint owner "
                             "set`; nothing to do")
            return
        if recorded.get("state") == REC_PENDING:
            log.warning("ownership.claimed_elsewhere", module=self.module, identity=current.owner,
                        intended=recorded.get("owner_identity"),
                        message="another owner was set while our claim was in flight; it is left alone")
        if not (recorded.get("state") == REC_EXTERNAL and ours):
            entry = {"state": REC_EXTERNAL, "owner_identity": current.owner, "seen_at": self.now()}
            if recorded:
                entry["previous"] = recorded
            update_module_state(self.settings.config_dir, self.module, **{STATE_KEY: entry})
        self.status.claimed_by = describe_record({"state": REC_EXTERNAL})
        log.info("ownership.owned", module=self.module, identity=current.owner, how="external",
                 message=f"{self.module!r} is owned by {current.owner}, set before or outside auto-claim; "
                         "nothing to do")


def bound_sql(client: AsyncClient, publisher: Publisher, module: str) -> SqlFn:
    """One module's SQL as the publisher, in the ``SqlFn`` shape the helpers above take."""

    async def run(statement: str) -> list[dict[str, Any]]:
        return await sql(client, publisher, module, statement)

    return run


async def watch(settings: Settings, status: Status, client: AsyncClient, publisher: Publisher,
                module: str, *, sql_fn: SqlFn | None = None, sleep: Sleep = asyncio.sleep,
                bell: ConnectionBell | None = None) -> None:
    """Run by the supervisor per module once it is published: settle ownership, then return.

    Returns as soon as the database is owned (or cannot be managed, or
    auto-claim is disabled); otherwise polls cheaply forever: every 2 s, or,
    with a ``bell`` rung by the module's log follower, when it rings and
    every ``SAFETY_POLL_MAXIMUM`` s besides.  Never raises except
    ``CancelledError``: a bug here must not take the other lifecycle tasks
    (module logs) down with it.
    """
    run_sql = sql_fn if sql_fn is not None else bound_sql(client, publisher, module)
    watcher = Watcher(settings, module, run_sql, status.module(module), sleep=sleep,
                      maximum=SAFETY_POLL_MAXIMUM if bell is not None else POLL_MAXIMUM, bell=bell)
    try:
        await watcher.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        watcher.status.ownership = "unknown"
        log.error("ownership.failed", module=module, error=f"{type(exc).__name__}: {exc}",
                  message="auto-claim stopped for this database; restart to retry")


__all__ = [
    "ELIGIBLE", "OWNER_PERMISSION", "Candidate", "ConnectionBell", "Ownership", "Unsupported", "Watcher",
    "bound_sql", "choose", "connection_key", "describe_record", "disabled_message", "eligibility",
    "ensure_owner_permission", "is_connection_line", "owner_permissions", "owner_update", "parse_payload",
    "read_ownership", "record_owner_set",
    "revoke_owner_permission", "watch",
]
