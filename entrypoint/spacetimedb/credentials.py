"""The publisher identity: the token that owns our databases, kept on the config volume.

First start: ``POST /v1/identity`` and store the token in ``cli.toml`` in the
official CLI's own format, so ``spacetime sql pogly "…"`` inside the container
acts as the same identity (``~/.config/spacetime`` is linked to the volume).
Later starts reuse it and ask the server to verify it.

Safety rules that shape the code (reference/spacetimedb.md §2-§5):

* The identity is only as durable as its token (``cli.toml``) and the
  server's signing keys (``id_ecdsa*``), all on ``POGLY_CONFIG_DIR``.  A
  rejected token or an unreadable ``cli.toml`` stops the container with exit
  78 and a message naming the way out; nothing is replaced or deleted, since
  the databases belong to the original identity.
* Tokens are secrets: never logged, masked in ``repr``, written mode 0600.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.config import HostPort, Settings
from entrypoint.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import SECRET_MODE, atomic_write
from entrypoint.spacetimedb.api import DEFAULT_BACKOFF, Backoff, body_text, database_owner, request_or_fatal
from entrypoint.spacetimedb.server import CLI_TOML, PRIVATE_KEY, PUBLIC_KEY

if TYPE_CHECKING:
    from entrypoint.localhttp import AsyncClient

log = logs.get("publisher")

LOCAL_NICKNAME = "local"


@dataclass(frozen=True, repr=False)
class Publisher:
    """The identity that owns our databases, and its bearer token (a secret)."""

    identity: str
    token: str

    def __repr__(self) -> str:
        return f"Publisher(identity={self.identity!r}, token='***')"

    __str__ = __repr__

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, *unverified* (the server verifies; we only need iss/sub/identity)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT (expected three dot-separated parts)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    data = json.loads(base64.urlsafe_b64decode(payload))
    if not isinstance(data, dict):
        raise ValueError("JWT payload is not an object")
    return data


def token_identity(token: str) -> str:
    """The identity a token stands for: its ``hex_identity``, else ``from_claims(iss, sub)``."""
    from entrypoint.spacetimedb import identity

    claims = token_claims(token)
    if isinstance(claims.get("hex_identity"), str):
        return identity.normalize_hex(claims["hex_identity"])
    iss, sub = claims.get("iss"), claims.get("sub")
    if isinstance(iss, str) and isinstance(sub, str):
        return identity.from_claims(iss, sub)
    raise ValueError("JWT has neither hex_identity nor iss/sub")


def token_sub(token: str) -> str | None:
    """The token's ``sub``, or None: named in messages on how to re-sign a token for the same identity."""
    try:
        sub = token_claims(token).get("sub")
    except ValueError:
        return None
    return sub if isinstance(sub, str) else None


def stored_token(document: Mapping[str, Any]) -> str | None:
    """The ``spacetimedb_token`` of a cli.toml document, stripped; None when absent or blank."""
    token = document.get("spacetimedb_token")
    return token.strip() if isinstance(token, str) and token.strip() else None


def read_cli_toml(path: Path) -> dict[str, Any]:
    """The CLI config as a dict; ``{}`` when absent.

    An unreadable or malformed file, or a ``spacetimedb_token`` that is not a
    string, is fatal rather than replaced: it may hold the only copy of the
    token that owns the databases.
    """
    import tomllib

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise Fatal(EXIT_CONFIG, f"cannot read {path}: {exc}. Check the config volume's permissions.",
                    event="identity.cli_toml_unreadable", path=str(path)) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Fatal(
            EXIT_CONFIG,
            f"{path} is not valid TOML ({exc}). It holds the publisher token that owns the databases, so it "
            "is not overwritten: fix it by hand (or restore it from backup) and restart.",
            event="identity.cli_toml_invalid", path=str(path),
        ) from None
    token = document.get("spacetimedb_token")
    if token is not None and not isinstance(token, str):  # e.g. `spacetimedb_token = 5`: damaged, not "no token"
        raise Fatal(
            EXIT_CONFIG,
            f"spacetimedb_token in {path} is a {type(token).__name__}, not a token string. Restore cli.toml from "
            "the backup of this config volume; it is not replaced automatically because the databases belong to "
            "the identity of the original token.",
            event="identity.token_invalid", path=str(path),
        )
    return document


def _cli_host(addr: HostPort) -> str:
    """What the CLI should connect to: the listen address, with a wildcard host made loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    return str(HostPort(host, addr.port))


def cli_document(existing: Mapping[str, Any], token: str, addr: HostPort) -> dict[str, Any]:
    """``existing`` with our token, ``default_server = "local"`` and a ``local`` entry for ``addr``.

    Everything else the operator (or the CLI) put there is kept as it was.
    """
    doc: dict[str, Any] = {"default_server": LOCAL_NICKNAME, "spacetimedb_token": token}
    for key, value in existing.items():
        if key not in doc:
            doc[key] = value
    servers = [dict(s) for s in existing.get("server_configs", []) if isinstance(s, dict)]
    local = {"nickname": LOCAL_NICKNAME, "host": _cli_host(addr), "protocol": "http"}
    for entry in servers:
        if entry.get("nickname") == LOCAL_NICKNAME:
            entry.update(local)
            break
    else:
        servers.append(local)
    doc["server_configs"] = servers
    return doc


def write_cli_toml(path: Path, doc: Mapping[str, Any]) -> None:
    """Write the CLI config atomically, mode 0600 from its first byte: it holds the token.

    tomli-w writes every value ``tomllib`` reads (dates, nested tables, arrays
    of tables, any Unicode), so whatever the operator or the CLI put in the
    file survives our rewrite.
    """
    import tomli_w

    atomic_write(path, tomli_w.dumps(doc), SECRET_MODE)


def _write_secret_if_changed(path: Path, doc: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    if dict(doc) != dict(old) or not path.exists():
        write_cli_toml(path, doc)
        return
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) != SECRET_MODE:
            os.chmod(path, SECRET_MODE)


def link_cli_config(config_dir: Path, home: Path | None = None) -> bool:
    """Make ``$HOME/.config/spacetime`` point at the config volume, when nothing is there yet.

    So that ``kubectl exec … spacetime sql pogly "…"`` finds our cli.toml and
    acts as the publisher identity.  Best effort: an existing directory or
    link is never touched, and a read-only home is only logged.
    """
    if home is None:
        env_home = os.environ.get("HOME")
        home = Path(env_home) if env_home else Path.home()
    link = home / ".config" / "spacetime"
    try:
        if os.path.lexists(link):
            if link.resolve() == config_dir.resolve():
                return True
            log.info("identity.cli_link_skipped", path=str(link), config_dir=str(config_dir),
                     message="exists already and is left alone; use `spacetime --config-path "
                             f"{config_dir / CLI_TOML}` to act as the publisher")
            return False
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(config_dir, target_is_directory=True)
    except OSError as exc:
        log.info("identity.cli_link_failed", path=str(link), config_dir=str(config_dir), error=str(exc),
                 message=f"use `spacetime --config-path {config_dir / CLI_TOML}` to act as the publisher")
        return False
    log.info("identity.cli_link_created", path=str(link), target=str(config_dir))
    return True


def token_rejected(stored: str, path: Path, config_dir: Path, status: int, text: str,
                   sub: str | None, owners: Mapping[str, str]) -> Fatal:
    """The ``Fatal(78)`` for a stored token the server refuses: why, who owns what, and the safe way out."""
    owned = "; ".join(f"database {name!r} is owned by {owner}" for name, owner in owners.items())
    keys = "InvalidSignature" in text or "not signed by this instance" in text
    cause = (
        f"the signing keys in {config_dir} ({PRIVATE_KEY}, {PUBLIC_KEY}) are not the ones that signed this "
        "token: they were replaced, or were missing and SpacetimeDB generated a new pair"
        if keys else "the token is not accepted by this server"
    )
    resign = (
        f" or (b) keep the new keys and re-sign a token with the same iss \"localhost\" and sub "
        f"{sub!r} with the new {PRIVATE_KEY} (SpacetimeDB docs: self-hosted key rotation, strategy B), "
        f"then put it in {path} as spacetimedb_token"
        if sub else ""
    )
    return Fatal(
        EXIT_CONFIG,
        f"SpacetimeDB rejected the publisher token stored in {path} for identity {stored} "
        f"({status}: {text or 'no message'}): {cause}."
        + (f" Current owners: {owned}." if owned else "")
        + " Nothing was changed or deleted. Safe way out: (a) restore id_ecdsa and id_ecdsa.pub from the "
        f"backup of this config volume that matches the token, then restart;{resign}. Do not delete the "
        "data directory or publish with --delete-data/clear: the databases and their data are intact and "
        f"still belong to {stored}.",
        event="identity.token_rejected",
        stored_identity=stored,
        status=status,
        server_message=text,
        **({"database_owners": dict(owners)} if owners else {}),
    )


async def _database_owners(client: AsyncClient, modules: Iterable[str]) -> dict[str, str]:
    """Owner per existing database, best effort and unauthenticated (for error messages only)."""
    owners: dict[str, str] = {}
    for module in modules:
        with contextlib.suppress(Exception):
            owner = await database_owner(client, module)
            if owner:
                owners[module] = owner
    return owners


async def ensure_identity(
    settings: Settings,
    client: AsyncClient,
    *,
    home: Path | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> Publisher:
    """The publisher identity, persisted in ``config_dir/cli.toml`` and checked against the server.

    First start: ``POST /v1/identity`` and store the token (mode 0600,
    atomically) in the official CLI's format.  Later starts reuse it and ask
    the server to verify it; a rejected token is ``Fatal(78)`` explaining that
    the signing keys were replaced, without touching anything.
    """
    config_dir = settings.config_dir
    path = config_dir / CLI_TOML
    existing = read_cli_toml(path)
    token = stored_token(existing)
    if token is not None:
        try:
            identity = token_identity(token)
            sub = token_sub(token)
        except ValueError as exc:
            raise Fatal(
                EXIT_CONFIG,
                f"spacetimedb_token in {path} is not a usable JWT ({exc}). Restore cli.toml from the backup of "
                "this config volume; it is not replaced automatically because the databases belong to the "
                "identity of the original token.",
                event="identity.token_invalid", path=str(path),
            ) from None
        response = await request_or_fatal(client, "GET", f"/v1/identity/{identity}/verify",
                                          what="verify identity", backoff=backoff,
                                          headers={"Authorization": f"Bearer {token}"})
        if response.status_code in (401, 400, 403):
            owners = await _database_owners(client, settings.modules)
            raise token_rejected(identity, path, config_dir, response.status_code, body_text(response),
                                 sub, owners)
        if not response.is_success:
            raise Fatal(EXIT_UNAVAILABLE,
                        f"SpacetimeDB could not verify the publisher identity {identity}: "
                        f"{response.status_code} {body_text(response)}",
                        event="identity.verify_failed", stored_identity=identity)
        publisher = Publisher(identity, token)
        log.info("identity.reused", identity=identity, cli_toml=str(path))
    else:
        response = await request_or_fatal(client, "POST", "/v1/identity", what="create identity",
                                          backoff=backoff)
        try:
            data = response.json()
            from entrypoint.spacetimedb.identity import normalize_hex

            publisher = Publisher(normalize_hex(data["identity"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            raise Fatal(EXIT_UNAVAILABLE,
                        f"SpacetimeDB did not issue an identity: {response.status_code} {body_text(response)}",
                        event="identity.create_failed") from None
        log.info("identity.created", identity=publisher.identity, cli_toml=str(path),
                 message="new publisher identity stored on the config volume; back it up with the keys")
    _write_secret_if_changed(path, cli_document(existing, publisher.token, settings.spacetime_addr), existing)
    link_cli_config(config_dir, home)
    return publisher


__all__ = [
    "LOCAL_NICKNAME", "Publisher", "cli_document", "ensure_identity", "link_cli_config",
    "read_cli_toml", "stored_token", "token_claims", "token_identity", "token_rejected", "token_sub", "write_cli_toml",
]
