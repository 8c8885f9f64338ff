"""Publishing: every module's wasm onto the server, then a new database's first-boot config.

Per module: read the wasm (refused when empty or not WebAssembly), skip it when
the state file says this exact hash is already live in this database, make
sure the database is ours, ``PUT`` it, then make sure its first-boot config is
applied, and record the outcome.

First-boot config: the environment's stream settings go into Pogly's
``Config`` row, which closes Pogly's onboarding (``ConfigInit``; while it is
false, whoever calls ``SetConfig`` first becomes the owner).  Whether it is
still needed is read from **the database**, not from the state file: a
``Config`` row with ``ConfigInit = false`` in a database this identity owns is
configured now, whether we created it a moment ago or a state write after its
creation was lost (a full config volume, a crash in that window).  A row that
is already initialised is never touched, so later owner changes survive.  The
state file only remembers "done" for one database identity, to spare a query.

Safety rules that shape the code (reference/spacetimedb.md §2-§5): never
publish with ``clear`` and never delete anything on the volumes.  A database
owned by another identity, or a token the server refuses, stops the container
with exit 78 and a message naming both identities and the way out, instead of
"fixing" it by destroying data.  A failed *update* leaves the previously
published module running inside SpacetimeDB (its onboarding still closed) but
makes ``/readyz`` answer 503 (``Status.not_ready``): the new image's web app
would talk to the old schema, and a not-Ready pod is what ``kubectl rollout
status`` and ``flux --wait`` see.  Only a failed *first* publish is fatal.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.config import Settings
from entrypoint.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import WriteFailed
from entrypoint.spacetimedb.api import (
    DEFAULT_BACKOFF,
    PUBLISH_TIMEOUT,
    Backoff,
    SpacetimeUnavailable,
    body_text,
    database_owner,
    describe_error,
    identity_from_json,
    parse_ownership_error,
    request_or_fatal,
    request_with_retry,
)
from entrypoint.spacetimedb.credentials import Publisher, token_rejected, token_sub
from entrypoint.spacetimedb.server import CLI_TOML
from entrypoint.spacetimedb.sql import SqlError, is_missing_table, sql, sql_bool, sql_string
from entrypoint.spacetimedb.statefile import module_state, update_module_state

if TYPE_CHECKING:
    from entrypoint.localhttp import AsyncClient, Response
    from entrypoint.supervision.status import Status

log = logs.get("publish")


def _not_owner_fatal(settings: Settings, module: str, ours: str, owner: str | None, text: str) -> Fatal:
    owner_text = owner or "another identity (the server did not say which)"
    return Fatal(
        EXIT_CONFIG,
        f"Database {module!r} is owned by {owner_text}, but this container's publisher identity is {ours} "
        f"(token in {settings.config_dir / CLI_TOML}). This happens when the config volume "
        f"(POGLY_CONFIG_DIR={settings.config_dir}: cli.toml, id_ecdsa, id_ecdsa.pub) was lost or replaced "
        f"while the data volume (POGLY_DATA_DIR={settings.data_dir}) was kept. Nothing was published and "
        "nothing was deleted. Safe way out: restore the config volume that holds the original identity"
        + (f" {owner}" if owner else "")
        + " (its cli.toml with spacetimedb_token and its id_ecdsa keys) and restart. Do NOT publish with "
        "--delete-data/clear or wipe the data volume: that destroys every overlay, layout and setting."
        + (f" Server said: {text}" if text else ""),
        event="publish.not_owner",
        module=module,
        publisher_identity=ours,
        owner_identity=owner,
        server_message=text,
    )


async def _check_owner(settings: Settings, client: AsyncClient, publisher: Publisher, module: str,
                       wasm: bytes, backoff: Backoff) -> None:
    """Stop before touching a database that belongs to someone else.

    The database-info route names the owner; when it does not, the dry-run
    ``pre_publish`` gives the 1.7 (401, names the owner) or 1.9+ (403) refusal.
    Any other answer is inconclusive and the real publish decides.
    """
    try:
        owner = await database_owner(client, module, publisher.headers)
    except Exception as exc:  # inconclusive; the publish path has its own error handling
        log.debug("publish.owner_lookup_failed", module=module, error=describe_error(exc))
        owner = None
    if owner is not None:
        if owner != publisher.identity:
            raise _not_owner_fatal(settings, module, publisher.identity, owner, "")
        return
    try:
        response = await request_with_retry(client, "POST", f"/v1/database/{module}/pre_publish",
                                            what=f"pre-publish check of {module}", backoff=backoff,
                                            timeout=PUBLISH_TIMEOUT, params={"host_type": "Wasm"},
                                            content=wasm, headers=publisher.headers)
    except SpacetimeUnavailable as exc:
        log.debug("publish.pre_publish_unavailable", module=module, error=str(exc))
        return
    refusal = parse_ownership_error(response.status_code, body_text(response))
    if refusal is not None:
        raise _not_owner_fatal(settings, module, publisher.identity, refusal.owner, refusal.text)


async def _database_identity(client: AsyncClient, publisher: Publisher, module: str,
                             backoff: Backoff) -> str | None:
    """``GET /v1/database/<name>/identity``: the database's identity, None when it does not exist."""
    response = await request_or_fatal(client, "GET", f"/v1/database/{module}/identity",
                                      what=f"look up database {module}", backoff=backoff,
                                      headers=publisher.headers)
    if response.status_code == 404:
        return None
    identity = identity_from_json(body_text(response).strip('"'))
    if response.status_code != 200 or identity is None:
        raise Fatal(EXIT_UNAVAILABLE,
                    f"could not tell whether database {module!r} exists: {response.status_code} "
                    f"{body_text(response)}",
                    event="publish.lookup_failed", module=module)
    return identity


WASM_MAGIC = b"\x00asm"


def _read_wasm(settings: Settings, module: str) -> tuple[Path, bytes]:
    path = settings.module_wasm(module)
    try:
        wasm = path.read_bytes()
    except OSError as exc:
        wanted = "pogly.wasm" if module == "pogly" else f"{module}.wasm or the shared pogly.wasm"
        raise Fatal(
            EXIT_CONFIG,
            f"module {module!r}: cannot read {path} ({exc.strerror or exc}). Put {wanted} "
            f"in POGLY_MODULE_DIR={settings.module_dir}, or point POGLY_MODULE_DIR at the directory that has it.",
            event="publish.module_missing", module=module, path=str(path),
        ) from None
    if not wasm.startswith(WASM_MAGIC):
        what = ("is empty (0 bytes)" if not wasm
                else f"is not a WebAssembly module ({len(wasm)} bytes, no \\0asm header)")
        raise Fatal(
            EXIT_CONFIG,
            f"module {module!r}: {path} {what}; nothing was published. A truncated copy or a failed build? "
            f"Put the built {path.name} in POGLY_MODULE_DIR={settings.module_dir} and restart.",
            event="publish.module_invalid", module=module, path=str(path), size=len(wasm),
        )
    return path, wasm


def _record(settings: Settings, module: str, **fields: Any) -> None:
    """Remember a module's outcome in the state file; a volume that cannot take it is exit 78, named."""
    try:
        update_module_state(settings.config_dir, module, **fields)
    except WriteFailed as exc:
        raise exc.fatal("POGLY_CONFIG_DIR", settings.config_dir) from exc


def _success(response: Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    success = data.get("Success") if isinstance(data, dict) else None
    return success if isinstance(success, dict) else None


async def _publish_one(settings: Settings, status: Status, client: AsyncClient,
                       publisher: Publisher, module: str, backoff: Backoff) -> None:
    info = status.module(module)
    path, wasm = await asyncio.to_thread(_read_wasm, settings, module)
    digest = hashlib.sha256(wasm).hexdigest()
    recorded = module_state(settings.config_dir, module)
    existing = await _database_identity(client, publisher, module, backoff)

    if existing is None and recorded.get("database_identity"):
        log.warning("publish.database_missing", module=module, recorded_identity=recorded["database_identity"],
                    data_dir=str(settings.data_dir),
                    message="the state file knows this database but SpacetimeDB does not (new or wiped data "
                            "volume?); creating it again")

    if existing is not None:
        await _check_owner(settings, client, publisher, module, wasm, backoff)
        if recorded.get("hash") == digest and recorded.get("database_identity") == existing:
            info.database_identity, info.published_hash = existing, digest
            info.publish_result, info.serving = "unchanged", True
            log.info("publish.unchanged", module=module, database_identity=existing, sha256=digest)
            if recorded.get("first_boot_config_applied") is not True:
                outcome = await ensure_first_boot_config(settings, client, publisher, module, created=False)
                _record(settings, module, **_first_boot_fields(outcome))
            return

    log.info("publish.start", module=module, path=str(path), sha256=digest, size=len(wasm),
             update=existing is not None)
    failure: str
    try:
        response = await request_with_retry(client, "PUT", f"/v1/database/{module}", what=f"publish {module}",
                                            backoff=backoff, timeout=PUBLISH_TIMEOUT,
                                            params={"host_type": "Wasm"}, content=wasm,
                                            headers={**publisher.headers, "Content-Type": "application/wasm"})
    except SpacetimeUnavailable as exc:
        response, failure, code = None, str(exc), EXIT_UNAVAILABLE
    else:
        text = body_text(response)
        refusal = parse_ownership_error(response.status_code, text)
        if refusal is not None:
            raise _not_owner_fatal(settings, module, publisher.identity, refusal.owner, refusal.text)
        if "PermissionDenied" in text:
            raise _not_owner_fatal(settings, module, publisher.identity, None, text)
        if response.status_code == 401:
            owners = {module: existing} if existing else {}
            raise token_rejected(publisher.identity, settings.config_dir / CLI_TOML, settings.config_dir,
                                 401, text, token_sub(publisher.token), owners)
        success = _success(response) if response.is_success else None
        if success is not None:
            database_identity = identity_from_json(success.get("database_identity")) or existing
            op = "created" if success.get("op") == "created" else "updated"
            info.database_identity, info.published_hash = database_identity, digest
            info.publish_result, info.serving = op, True
            log.info(f"publish.{op}", module=module, database_identity=database_identity, sha256=digest)
            fields: dict[str, Any] = {"hash": digest, "database_identity": database_identity}
            # Known done for this very database: spare the query.  Otherwise the database decides
            # (created now, or created earlier and its state write lost): before anything is recorded.
            if not (recorded.get("first_boot_config_applied") is True
                    and recorded.get("database_identity") == database_identity):
                outcome = await ensure_first_boot_config(settings, client, publisher, module,
                                                         created=op == "created")
                fields.update(_first_boot_fields(outcome))
            _record(settings, module, **fields)
            return
        failure = f"{response.status_code}: {text or '(no message)'}"
        code = EXIT_SOFTWARE

    if existing is None:
        raise Fatal(
            code,
            f"first publish of module {module!r} ({path}) failed: {failure}. The database does not exist yet, "
            "so there is nothing to serve."
            + (" Check that SpacetimeDB is healthy." if code == EXIT_UNAVAILABLE
               else " Check that the wasm is a SpacetimeDB module built for this server version."),
            event="publish.first_failed", module=module, path=str(path), server_message=failure,
        )
    info.database_identity, info.published_hash = existing, recorded.get("hash")
    # serving: the old module still runs in SpacetimeDB; the "failed: " result alone makes /readyz 503.
    info.publish_result, info.serving = f"failed: {failure}", True
    log.error("publish.failed", module=module, database_identity=existing, sha256=digest,
              server_message=failure,
              message=f"update of {module!r} was refused; the previously published module keeps running, "
                      "but the container is not ready (/readyz 503) until an update succeeds. Fix the module "
                      "or roll back to the previous image (its module is then unchanged), and restart.")
    # The previous module keeps running, so its onboarding must be closed all the same.
    if not (recorded.get("first_boot_config_applied") is True and recorded.get("database_identity") == existing):
        outcome = await ensure_first_boot_config(settings, client, publisher, module, created=False)
        _record(settings, module, **_first_boot_fields(outcome))


async def publish_all(settings: Settings, status: Status, client: AsyncClient, publisher: Publisher,
                      *, backoff: Backoff = DEFAULT_BACKOFF) -> None:
    """Publish every module in ``settings.modules`` concurrently; skip the unchanged ones.

    Raises the first ``Fatal`` (a missing wasm, a lost identity, a failed
    first publish) after cancelling the other modules' work; a failed update
    of an existing database is reported and does not raise.
    """
    status.publisher_identity = publisher.identity
    for module in settings.modules:
        status.module(module)
    tasks = [asyncio.create_task(_publish_one(settings, status, client, publisher, m, backoff),
                                 name=f"publish:{m}")
             for m in settings.modules]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ---------------------------------------------------------------------------
# First-boot configuration
# ---------------------------------------------------------------------------



def first_boot_statement(settings: Settings) -> str:
    """The owner UPDATE that applies the environment to Pogly's ``Config`` row and closes onboarding."""
    return (
        "UPDATE Config SET "
        f"StreamingPlatform = {sql_string(settings.stream_platform)}, "
        f"StreamName = {sql_string(settings.stream_name)}, "
        f"DebugMode = {sql_bool(settings.debug_mode)}, "
        f"StrictMode = {sql_bool(settings.strict_mode)}, "
        "ConfigInit = true WHERE Version = 0"
    )


def _config_matches(row: Mapping[str, Any], settings: Settings) -> bool:
    return (
        row.get("StreamingPlatform") == settings.stream_platform
        and row.get("StreamName") == settings.stream_name
        and row.get("DebugMode") is settings.debug_mode
        and row.get("StrictMode") is settings.strict_mode
        and row.get("ConfigInit") is True
    )


def _first_boot_fields(outcome: str) -> dict[str, Any]:
    return {"first_boot_config_applied": not outcome.startswith("failed"), "first_boot_config": outcome}


async def ensure_first_boot_config(settings: Settings, client: AsyncClient, publisher: Publisher,
                                   module: str, *, created: bool) -> str:
    """Apply STREAM_*/DEBUG_MODE/STRICT_MODE to the Config row if the database says onboarding is open.

    Why: Pogly's ``SetConfig`` reducer makes whoever calls it first the owner
    while ``ConfigInit`` is false; setting it here closes that door.  The
    database is the record: ``ConfigInit`` false means nobody configured it
    (we created it just now, or earlier and the state write that followed was
    lost), true means somebody did and the row is left alone, so later owner
    changes survive restarts.  ``created``: we created it in this very publish
    (only changes how the outcome is logged).  Returns "applied",
    "already-initialised", "not-pogly" or "failed: …" (retried at the next
    start); the caller records it.
    """
    select = "SELECT * FROM Config WHERE Version = 0"
    try:
        rows = await sql(client, publisher, module, select)
        if not rows:
            log.info("config.first_boot_skipped", module=module, reason="no Config row with Version 0")
            return "not-pogly"
        if rows[0].get("ConfigInit") is True:
            if created:
                log.warning("config.first_boot_skipped", module=module, reason="Config already initialised",
                            message="left untouched: somebody completed onboarding before us")
            else:
                log.info("config.first_boot_skipped", module=module, reason="Config already initialised",
                         message="onboarding was completed earlier; left untouched")
            return "already-initialised"
        await sql(client, publisher, module, first_boot_statement(settings))
        rows = await sql(client, publisher, module, select)
    except SqlError as exc:
        if is_missing_table(exc):
            log.info("config.first_boot_skipped", module=module, reason="no Config table (not a Pogly module)")
            return "not-pogly"
        log.error("config.first_boot_failed", module=module, server_message=exc.text, status=exc.status,
                  message="Pogly's onboarding stays open (ConfigInit false) until this succeeds; "
                          "it is retried at the next start")
        return f"failed: {exc.text}"
    except Exception as exc:
        log.error("config.first_boot_failed", module=module, error=describe_error(exc),
                  message="retried at the next start")
        return f"failed: {describe_error(exc)}"
    if not rows or not _config_matches(rows[0], settings):
        log.error("config.first_boot_failed", module=module, row=rows[0] if rows else None,
                  message="the Config row does not show the values just written; retried at the next start")
        return "failed: read-back mismatch"
    fields = {"module": module, "streaming_platform": settings.stream_platform,
              "stream_name": settings.stream_name, "debug_mode": settings.debug_mode,
              "strict_mode": settings.strict_mode}
    if created:
        log.info("config.first_boot_applied", **fields)
    else:
        log.warning("config.first_boot_applied", **fields, repaired=True,
                    message="this database existed with Pogly's onboarding still open (ConfigInit false: its "
                            "first-boot config was never applied, e.g. a state write lost after its creation); "
                            "applied now, so nobody can take ownership through SetConfig")
    return "applied"


__all__ = ["ensure_first_boot_config", "first_boot_statement", "publish_all"]
