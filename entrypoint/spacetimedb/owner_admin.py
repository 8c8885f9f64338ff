"""``pogly-entrypoint owner``: show and set who owns each Pogly database, without wiping volumes.

Why this exists: when the wrong account became the owner, or nobody can (OIDC
off, ``STRICT_MODE`` without ``OWNER_SUBJECTS``, people signing in through
another issuer), the old advice was "clear the PVCs", which throws away every
overlay, layout and setting.  The publisher identity owns every database we
publish and may run SQL DML, so it can simply write the owner.  This command
runs inside the container beside the supervisor (``kubectl exec deploy/pogly
-- pogly-entrypoint owner …``), reads the publisher's token from ``cli.toml``
on the config volume, and talks SQL to SpacetimeDB over loopback.

``owner set`` per Pogly module, with the statements auto-claim uses
(ownership.py):

1. ``Config`` row 0 gets the new ``OwnerIdentity`` (and ``ConfigInit = true``
   when it was false: while false, Pogly's ``SetConfig`` makes whoever
   finishes the onboarding the owner, which would undo this choice);
2. the new owner gets the Owner permission (``Permissions``, type 9999);
3. every other identity's Owner permission is deleted, so there is exactly
   one owner (other permission types are kept);
4. all of it is read back; a mismatch (something changed it meanwhile) is
   retried once, then reported;
5. the state file records ``state: "set"`` with the previous owner (written
   before step 1 and again after step 4), so ``owner show``, ``status`` and a
   still-polling auto-claim watcher know how the owner got there.  The
   watcher never fights it: its claim is conditional on the database being
   unclaimed, and at its next look it finds it claimed and stops.

Every change is the event ``owner.set`` in the container log (containerlog.py
says how it gets there from a ``kubectl exec`` process).  Nothing here prints
or logs the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE, Fatal
from entrypoint.spacetimedb.identity import from_claims, normalize_hex
from entrypoint.spacetimedb.ownership import (
    CLAIMED,
    NOT_POGLY,
    REC_CLAIMED,
    REC_EXTERNAL,
    REC_SET,
    STATE_KEY,
    UNCLAIMED,
    SqlFn,
    Unsupported,
    bound_sql,
    describe_record,
    ensure_owner_permission,
    owner_permissions,
    owner_update,
    read_ownership,
    record_owner_set,
    revoke_owner_permission,
)
from entrypoint.spacetimedb.sql import SqlError

if TYPE_CHECKING:
    from entrypoint.config import Settings
    from entrypoint.localhttp import AsyncClient
    from entrypoint.spacetimedb.credentials import Publisher

log = logs.get("owner")

EXIT_NOT_POGLY = 65  # sysexits EX_DATAERR: the database is not what the command works on
NOT_PUBLISHED = "not-published"
MAX_CLAIM_BYTES = 128  # SpacetimeDB's limit for iss and sub
ATTEMPTS = 2  # one retry when the read-back shows a concurrent change
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TIMEOUT = 10.0


class OwnerError(Exception):
    """The command cannot do what was asked; ``message`` says why and what to do, ``exit_code`` how it ends."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# ---------------------------------------------------------------------------
# Who the new owner is
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The identity to make the owner, and the claims it was derived from (when given as --sub)."""

    identity: str
    sub: str | None = None
    issuer: str | None = None

    @property
    def how(self) -> str:
        return "sub" if self.sub is not None else "identity"

    def describe(self) -> str:
        if self.sub is not None:
            return f"sub {self.sub!r} at issuer {self.issuer!r}"
        return "given as --identity"


def _claim_value(flag: str, value: str) -> str:
    if not value or len(value.encode()) > MAX_CLAIM_BYTES or _CONTROL.search(value):
        raise OwnerError(EXIT_CONFIG, f"{flag} {value!r} is not a valid claim: SpacetimeDB takes 1-{MAX_CLAIM_BYTES} "
                                      "bytes without control characters, exactly as the provider writes it")
    return value


def resolve_target(settings: Settings, *, sub: str | None, issuer: str | None, identity: str | None) -> Target:
    """The new owner from the arguments; ``OwnerError(78)`` for anything unusable, before any change."""
    if identity is not None:
        if sub is not None or issuer is not None:
            raise OwnerError(EXIT_CONFIG, "--identity cannot be combined with --sub or --issuer")
        try:
            return Target(normalize_hex(identity))
        except ValueError:
            raise OwnerError(EXIT_CONFIG, f"--identity {identity!r} is not a SpacetimeDB identity: give 64 hex digits, "
                                          "optionally prefixed with 0x (`pogly-entrypoint owner show` lists "
                                          "connected guests' identities; `pogly-entrypoint identity --sub S` "
                                          "prints an OIDC subject's)") from None
    if sub is None:
        raise OwnerError(EXIT_CONFIG, "give --sub SUB [--issuer ISSUER] or --identity HEX")
    sub = _claim_value("--sub", sub)
    if issuer is None:
        if not settings.oidc_enabled:
            raise OwnerError(EXIT_CONFIG, "OIDC is off (OIDC_ISSUER and OIDC_CLIENT_ID are empty), so there is no "
                                          "issuer to derive the identity of --sub from: add --issuer ISSUER (exactly "
                                          "as that provider writes `iss` in its tokens), or give --identity HEX")
        issuer = settings.oidc_issuer
    issuer = _claim_value("--issuer", issuer)
    return Target(from_claims(issuer, sub), sub, issuer)


def selected_modules(settings: Settings, module: str | None) -> tuple[str, ...]:
    """Every module in MODULES, or the one named (which must be one of them)."""
    if module is None:
        return settings.modules
    if module not in settings.modules:
        raise OwnerError(EXIT_CONFIG, f"--module {module!r} is not one of MODULES ({' '.join(settings.modules)})")
    return (module,)


# ---------------------------------------------------------------------------
# Talking to SpacetimeDB as the publisher
# ---------------------------------------------------------------------------


def read_publisher(settings: Settings) -> Publisher:
    """The supervisor's publisher identity and token, from ``cli.toml`` on the config volume."""
    from entrypoint.spacetimedb.credentials import Publisher, read_cli_toml, stored_token, token_identity
    from entrypoint.spacetimedb.server import CLI_TOML

    path = settings.config_dir / CLI_TOML
    try:
        document = read_cli_toml(path)
    except Fatal as exc:
        raise OwnerError(exc.exit_code, exc.message) from None
    token = stored_token(document)
    if token is None:
        raise OwnerError(EXIT_UNAVAILABLE,
                         f"no publisher token in {path}: `pogly-entrypoint run` has not started here yet, or "
                         "POGLY_CONFIG_DIR differs from the supervisor's. Run this command inside the running "
                         "container (kubectl exec deploy/pogly -- pogly-entrypoint owner …)")
    try:
        return Publisher(token_identity(token), token)
    except ValueError as exc:
        raise OwnerError(EXIT_CONFIG, f"spacetimedb_token in {path} is not a usable JWT ({exc}); the supervisor "
                                      "refuses it too (identity.token_invalid): restore cli.toml from backup") from None


def _unreachable(settings: Settings, error: str) -> OwnerError:
    return OwnerError(EXIT_UNAVAILABLE,
                      f"SpacetimeDB does not answer on {settings.spacetime_addr} ({error}): is `pogly-entrypoint run` "
                      "running in this container? Run this command inside it (kubectl exec deploy/pogly -- "
                      "pogly-entrypoint owner …); `pogly-entrypoint status` shows the supervisor's state")


@dataclass
class Link:
    """An HTTP client to SpacetimeDB and the publisher it acts as."""

    settings: Settings
    client: AsyncClient
    publisher: Publisher

    def sql_fn(self, module: str) -> SqlFn:
        return bound_sql(self.client, self.publisher, module)

    def refused(self, module: str, exc: SqlError) -> OwnerError:
        """A SQL refusal in words: the publisher not (or no longer) owning the database is a config problem."""
        text = exc.text or "(no message)"
        if exc.status in (401, 403) or "Only owners" in text or "does not own" in text:
            return OwnerError(EXIT_CONFIG,
                              f"SpacetimeDB refused the publisher identity {self.publisher.identity} (from cli.toml "
                              f"on POGLY_CONFIG_DIR) on database {module!r} ({exc.status}: {text}). The supervisor "
                              "reports the same at start (publish.not_owner / identity.token_rejected): restore "
                              "the config volume that belongs to this data (docs/deployment.md, Troubleshooting)")
        return OwnerError(EXIT_SOFTWARE, f"SpacetimeDB answered {exc.status} on database {module!r}: {text}")


@contextlib.asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Link]:
    """The publisher's token and a client that has seen SpacetimeDB answer ``/v1/ping``."""
    from entrypoint.localhttp import AsyncClient, Timeout, TransportError
    from entrypoint.spacetimedb.api import describe_error

    publisher = read_publisher(settings)
    async with AsyncClient(base_url=settings.spacetime_addr.url, timeout=Timeout(TIMEOUT, connect=5.0)) as client:
        try:
            response = await client.get("/v1/ping")
        except TransportError as exc:
            raise _unreachable(settings, describe_error(exc)) from None
        if not response.is_success:
            raise _unreachable(settings, f"/v1/ping answered {response.status_code}")
        yield Link(settings, client, publisher)


# ---------------------------------------------------------------------------
# What the database says: owner show
# ---------------------------------------------------------------------------


@dataclass
class ModuleReport:
    """One module's ownership, as its tables and our state file say."""

    module: str
    state: str  # CLAIMED, UNCLAIMED, NOT_POGLY, NOT_PUBLISHED
    reason: str | None = None
    owner: str | None = None
    server: str | None = None
    config_init: bool | None = None
    owner_permissions: list[str] = field(default_factory=list)
    guests: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def pogly(self) -> bool:
        return self.state in (CLAIMED, UNCLAIMED)

    @property
    def how(self) -> str | None:
        """How the current owner got there, when this entrypoint knows; None while unclaimed."""
        if self.state != CLAIMED:
            return None
        if self.record.get("owner_identity") == self.owner and self.record.get("state") in (REC_CLAIMED, REC_SET):
            return describe_record(self.record)
        if self.record.get("owner_identity") == self.owner and self.record.get("state") == REC_EXTERNAL:
            return "external: set before or outside this entrypoint (Pogly's onboarding or recovery key, SQL)"
        return "not recorded by this entrypoint (Pogly's onboarding or recovery key, SQL, or another volume)"

    @property
    def since(self) -> float | None:
        if self.state != CLAIMED or self.record.get("owner_identity") != self.owner:
            return None
        for key in ("set_at", "claimed_at", "seen_at"):
            value = self.record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    def settled_for(self, identity: str) -> bool:
        """``identity`` already is the one owner, with onboarding closed: ``owner set`` has nothing to do."""
        return (self.owner == identity and self.config_init is not False
                and self.owner_permissions == [identity])

    def problems(self) -> list[str]:
        """What is inconsistent, each with the command that repairs it."""
        found: list[str] = []
        if self.state == CLAIMED and self.owner not in self.owner_permissions:
            found.append(f"the owner has no Owner permission row: `pogly-entrypoint owner set --identity {self.owner} "
                         f"--module {self.module}` adds it")
        others = [i for i in self.owner_permissions if i != self.owner]
        if others:
            found.append(f"other identities hold the Owner permission ({', '.join(others)}): `pogly-entrypoint owner "
                         f"set --identity {self.owner} --module {self.module}` removes them")
        return found

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"module": self.module, "state": self.state, "pogly": self.pogly}
        if self.reason:
            data["reason"] = self.reason
        if self.pogly:
            data.update(owner_identity=self.owner, server_identity=self.server, claimed=self.state == CLAIMED,
                        config_init=self.config_init, owner_permissions=self.owner_permissions, how=self.how,
                        since=self.since, record=self.record or None, problems=self.problems(), guests=self.guests)
        return data


async def inspect(link: Link, module: str, *, full: bool = True) -> ModuleReport:
    """Read one module's ownership; ``OwnerError`` only when SpacetimeDB itself cannot be used.

    ``full=False`` (``owner set``'s read-back) skips the connected guests and the state file record.
    """
    from entrypoint.localhttp import TransportError
    from entrypoint.spacetimedb.api import describe_error
    from entrypoint.spacetimedb.statefile import module_state

    run_sql = link.sql_fn(module)
    try:
        current = await read_ownership(run_sql)
        holders = await owner_permissions(run_sql)
        guests = await _guests(run_sql) if full else []
    except Unsupported as exc:
        return ModuleReport(module, NOT_POGLY, reason=str(exc))
    except SqlError as exc:
        if exc.status == 404:
            return ModuleReport(module, NOT_PUBLISHED,
                                reason=f"no database {module!r} on this SpacetimeDB (yet): the supervisor publishes "
                                       "it at start; `pogly-entrypoint status` shows how far it got")
        raise link.refused(module, exc) from None
    except TransportError as exc:
        raise _unreachable(link.settings, describe_error(exc)) from None
    recorded = module_state(link.settings.config_dir, module).get(STATE_KEY) if full else None
    return ModuleReport(module, CLAIMED if current.claimed else UNCLAIMED, owner=current.owner,
                        server=current.server, config_init=current.config_init, owner_permissions=holders,
                        guests=guests, record=dict(recorded) if isinstance(recorded, Mapping) else {})


async def _guests(run_sql: SqlFn) -> list[dict[str, Any]]:
    """Who is connected now (identity, nickname): how an operator finds an identity when OIDC is off."""
    try:
        rows = await run_sql("SELECT * FROM Guests")
    except SqlError:
        return []  # not needed to manage ownership; a module without it is still reported
    return [{"identity": row.get("Identity"), "nickname": row.get("Nickname") or None,
             "authenticated": row.get("Authenticated")} for row in rows]


# ---------------------------------------------------------------------------
# Changing it: owner set
# ---------------------------------------------------------------------------


@dataclass
class SetResult:
    module: str
    old_owner: str
    new_owner: str
    was_claimed: bool
    permission_inserted: bool = False
    permissions_removed: list[str] = field(default_factory=list)
    config_init_closed: bool = False

    @property
    def changed(self) -> bool:
        return (self.old_owner != self.new_owner or self.permission_inserted or bool(self.permissions_removed)
                or self.config_init_closed)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "changed": self.changed, "old_owner": self.old_owner,
                "new_owner": self.new_owner, "was_claimed": self.was_claimed,
                "permission_inserted": self.permission_inserted, "permissions_removed": self.permissions_removed,
                "config_init_closed": self.config_init_closed}


async def apply(link: Link, report: ModuleReport, target: Target) -> SetResult:
    """Make ``target`` the one owner of a Pogly module (steps 1-4 of the module docstring)."""
    assert report.owner is not None and report.server is not None
    run_sql = link.sql_fn(report.module)
    result = SetResult(report.module, report.owner, target.identity, report.state == CLAIMED)
    current = report
    if current.settled_for(target.identity):
        return result
    for attempt in range(1, ATTEMPTS + 1):
        close = current.config_init is False
        if current.owner != target.identity or close:
            await run_sql(owner_update(target.identity, close_onboarding=close))
            result.config_init_closed |= close
        if target.identity not in current.owner_permissions:
            result.permission_inserted |= await ensure_owner_permission(run_sql, target.identity)
        for other in current.owner_permissions:
            if other != target.identity:
                await revoke_owner_permission(run_sql, other)
                if other not in result.permissions_removed:
                    result.permissions_removed.append(other)
        current = await inspect(link, report.module, full=False)
        if current.owner == target.identity and current.owner_permissions == [target.identity]:
            return result
        if attempt == ATTEMPTS:
            break
    raise OwnerError(EXIT_SOFTWARE,
                     f"after setting {target.identity} as the owner of {report.module!r}, the database says owner "
                     f"{current.owner} with Owner permission(s) {current.owner_permissions}: something else changed "
                     "it at the same time. Check with `pogly-entrypoint owner show` and run the command again")


def _event_fields(result: SetResult, target: Target) -> dict[str, Any]:
    fields: dict[str, Any] = {"module": result.module, "old_owner": result.old_owner,
                              "new_owner": result.new_owner, "how": target.how}
    if target.sub is not None:
        fields.update(sub=target.sub, iss=target.issuer)
    return fields


def _log_result(result: SetResult, target: Target) -> None:
    fields = _event_fields(result, target)
    if not result.changed:
        log.info("owner.unchanged", **fields, command="owner set",
                 message=f"{result.new_owner} already is the only owner of {result.module!r}; nothing changed")
        return
    before = (f"previous owner {result.old_owner}" if result.was_claimed
              else "it was unclaimed")
    log.info("owner.set", **fields, was_claimed=result.was_claimed,
             permission_inserted=result.permission_inserted, permissions_removed=result.permissions_removed,
             config_init_closed=result.config_init_closed, command="owner set",
             message=f"owner of {result.module!r} set to {result.new_owner} ({target.describe()}) with "
                     f"`pogly-entrypoint owner set`; {before}")


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def main(settings: Settings, action: str, *, as_json: bool = False, module: str | None = None,
         sub: str | None = None, issuer: str | None = None, identity: str | None = None,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``owner show`` / ``owner set``: the exit code (0, 65, 69, 70, 78; see docs/operations.md)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        modules = selected_modules(settings, module)
        if action == "show":
            logs.configure("console" if err.isatty() else "json", settings.debug_mode, stream=err,
                           level=settings.log_level)
            return asyncio.run(_show(settings, modules, out, as_json))
        target = resolve_target(settings, sub=sub, issuer=issuer, identity=identity)
        return asyncio.run(_set(settings, modules, target, explicit=module is not None, out=out, err=err,
                                as_json=as_json))
    except OwnerError as exc:
        print(f"pogly-entrypoint owner {action}: {exc.message}", file=err)
        return exc.exit_code


async def _show(settings: Settings, modules: tuple[str, ...], out: TextIO, as_json: bool) -> int:
    async with connect(settings) as link:
        reports = [await inspect(link, m) for m in modules]
        publisher = link.publisher.identity
    if as_json:
        print(json.dumps({"oidc_enabled": settings.oidc_enabled, "issuer": settings.oidc_issuer or None,
                          "publisher_identity": publisher,
                          "modules": {r.module: r.to_json() for r in reports}}, indent=2), file=out)
    else:
        print(format_show(settings, publisher, reports), file=out)
    return EXIT_UNAVAILABLE if any(r.state == NOT_PUBLISHED for r in reports) else 0


async def _set(settings: Settings, modules: tuple[str, ...], target: Target, *, explicit: bool, out: TextIO,
               err: TextIO, as_json: bool) -> int:
    from entrypoint.containerlog import EventSink, find_supervisor

    pid, found = await find_supervisor(settings.health_addr)
    sink = EventSink.open(pid, err, found)
    logs.configure(settings.log_format, settings.debug_mode, stream=sink, level=settings.log_level)
    results: list[SetResult] = []
    try:
        async with connect(settings) as link:
            reports = [await inspect(link, m) for m in modules]
            _refuse(reports, target, explicit)
            for report in (r for r in reports if r.pogly):
                results.append(await _apply_logged(link, report, target))
    finally:
        sink.close()
    skipped = [r for r in reports if not r.pogly]
    delivered = sink.failure is None
    if as_json:
        print(json.dumps({
            "target": {"identity": target.identity, "how": target.how, "sub": target.sub, "issuer": target.issuer},
            "modules": {r.module: r.to_json() for r in results},
            "skipped": {r.module: r.reason for r in skipped},
            "container_log": {"written": delivered, "pid": pid, "found_by": found if pid else None,
                              "failure": sink.failure},
        }, indent=2), file=out)
    else:
        print(format_set(results, skipped, target, pid, found, sink.failure), file=out)
    return 0


def _refuse(reports: list[ModuleReport], target: Target, explicit: bool) -> None:
    """Every reason not to start, checked before the first change."""
    missing = [r for r in reports if r.state == NOT_PUBLISHED]
    if missing:
        raise OwnerError(EXIT_UNAVAILABLE, "; ".join(str(r.reason) for r in missing))
    foreign = [r for r in reports if r.state == NOT_POGLY]
    if foreign and (explicit or len(foreign) == len(reports)):
        names = ", ".join(f"{r.module!r} ({r.reason})" for r in foreign)
        raise OwnerError(EXIT_NOT_POGLY, f"not a Pogly module: {names}. Only databases with Pogly's Config "
                                         "(OwnerIdentity), Heartbeat and Permissions tables have an owner to set; "
                                         "nothing was changed")
    for report in reports:
        if report.pogly and report.server == target.identity:
            raise OwnerError(EXIT_CONFIG, f"{target.identity} is the identity of database {report.module!r} itself; "
                                          "as OwnerIdentity it means 'unclaimed', not an owner. Nothing was changed")


async def _apply_logged(link: Link, report: ModuleReport, target: Target) -> SetResult:
    """``apply`` plus its event and state record; a failure part-way is logged as ``owner.set_failed``."""
    from entrypoint.localhttp import TransportError
    from entrypoint.spacetimedb.api import describe_error

    def record() -> None:
        previous = report.record if report.record.get("state") != REC_SET else report.record.get("previous")
        record_owner_set(link.settings.config_dir, report.module, target.identity, previous_owner=report.owner or "",
                         sub=target.sub, iss=target.issuer, now=time.time(), previous=previous)

    if not report.settled_for(target.identity):
        record()  # before the first statement: see ownership.record_owner_set
    try:
        result = await apply(link, report, target)
    except (OwnerError, SqlError, TransportError, RuntimeError) as exc:
        if isinstance(exc, OwnerError):
            failure = exc
        elif isinstance(exc, SqlError):
            failure = link.refused(report.module, exc)
        elif isinstance(exc, TransportError):
            failure = _unreachable(link.settings, describe_error(exc))
        else:
            failure = OwnerError(EXIT_SOFTWARE, str(exc))
        log.error("owner.set_failed", module=report.module, old_owner=report.owner, new_owner=target.identity,
                  how=target.how, error=failure.message, exit_code=failure.exit_code, command="owner set",
                  message="setting the owner stopped part-way; every step is idempotent: run the same command "
                          "again, then check with `pogly-entrypoint owner show`")
        raise failure from None
    if result.changed:
        record()  # again: a watcher racing for the same database may have replaced the intent
    _log_result(result, target)
    return result


# ---------------------------------------------------------------------------
# Output for people
# ---------------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return " since " + datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_show(settings: Settings, publisher: str, reports: list[ModuleReport]) -> str:
    if settings.oidc_enabled:
        mode = f"sign-in: OIDC through {settings.oidc_issuer}"
    else:
        mode = "sign-in: off (OIDC_ISSUER and OIDC_CLIENT_ID empty): nobody can claim by signing in"
    lines = [mode, f"publisher identity: {publisher}"]
    for r in reports:
        lines.append("")
        if not r.pogly:
            lines.append(f"{r.module}: {r.state} ({r.reason})")
            continue
        lines.append(f"{r.module}: {'claimed' if r.state == CLAIMED else 'unclaimed (nobody owns it)'}")
        if r.state == CLAIMED:
            lines.append(f"  owner:             {r.owner}")
            lines.append(f"  how:               {r.how}{_when(r.since)}")
        else:
            lines.append(f"  owner:             - (OwnerIdentity is the database's own identity {r.server})")
            if not settings.oidc_enabled:
                nxt = "nobody can sign in to claim it"
            elif settings.strict_mode and not settings.owner_subjects:
                nxt = "auto-claim is off (STRICT_MODE without OWNER_SUBJECTS)"
            else:
                nxt = "the first eligible sign-in becomes the owner (auto-claim)"
            lines.append(f"  next:              {nxt}; or `pogly-entrypoint owner set --sub SUB` / `--identity HEX`")
        onboarding = {True: "closed (ConfigInit true)",
                      False: "open (ConfigInit false: whoever finishes Pogly's setup becomes the owner)",
                      None: "unknown (no ConfigInit column)"}[r.config_init]
        lines.append(f"  onboarding:        {onboarding}")
        lines.append(f"  Owner permission:  {', '.join(r.owner_permissions) or '-'}")
        lines.append(f"  database identity: {r.server}")
        if r.guests:
            shown = ", ".join(f"{g['identity']}" + (f" ({g['nickname']})" if g.get("nickname") else "")
                              for g in r.guests[:10])
            more = f" and {len(r.guests) - 10} more" if len(r.guests) > 10 else ""
            lines.append(f"  connected now:     {shown}{more}")
        for problem in r.problems():
            lines.append(f"  problem:           {problem}")
    return "\n".join(lines)


def format_set(results: list[SetResult], skipped: list[ModuleReport], target: Target, pid: int | None,
               found: str, failure: str | None) -> str:
    lines: list[str] = []
    for r in results:
        if not r.changed:
            lines.append(f"{r.module}: {r.new_owner} already is the only owner; nothing changed")
            continue
        lines.append(f"{r.module}: owner set to {r.new_owner} ({target.describe()})")
        lines.append(f"  previous owner:   {r.old_owner if r.was_claimed else '- (it was unclaimed)'}")
        removed = f"; removed from {', '.join(r.permissions_removed)}" if r.permissions_removed else ""
        inserted = "added for the new owner" if r.permission_inserted else "the new owner had it already"
        lines.append(f"  Owner permission: {inserted}{removed}")
        if r.config_init_closed:
            lines.append("  onboarding:       closed (ConfigInit false -> true), so nobody can take ownership "
                         "by finishing Pogly's setup")
    for r in skipped:
        lines.append(f"{r.module}: skipped, {r.state} ({r.reason})")
    if failure is None:
        lines.append(f"logged in the container log (pogly-entrypoint pid {pid}, found by {found})")
    else:
        lines.append(f"WARNING: the container log could not be reached ({failure}); the events are on stderr "
                     "above instead: keep them for your records")
    return "\n".join(lines)


__all__ = [
    "EXIT_NOT_POGLY", "ModuleReport", "OwnerError", "SetResult", "Target", "apply", "connect", "format_set",
    "format_show", "inspect", "main", "read_publisher", "resolve_target", "selected_modules",
]
