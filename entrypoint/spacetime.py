"""SpacetimeDB as seen from outside: command line, readiness, identity, publish, SQL, module logs.

Two halves with different constraints:

* The **start path** (``command``, ``parse_lock_error``, ``is_listening_line``,
  ``ping``, ``check_keys``) runs before anything is ready, in PID 1, right
  after the signal handlers are installed.  It imports nothing heavy: ``ping``
  speaks HTTP/1.1 over raw asyncio streams so httpx is not loaded on that path.
* The **HTTP half** (identity, publish, first-boot config, SQL, log follower)
  runs once the server answers ``/v1/ping``.  It takes an injected
  ``httpx.AsyncClient`` (``base_url`` = ``settings.spacetime_addr.url``) so tests
  can drive it with a mock transport or the stand-in, and imports httpx and
  tenacity lazily.

Safety rules that shape the code (reference/spacetimedb.md §2-§5):

* Never publish with ``clear`` and never delete anything on the volumes: a
  lost identity or a refused publish stops the container with exit 78 and a
  message naming both identities and the way out, instead of "fixing" it by
  destroying data.
* The publisher's identity is only as durable as its token (``cli.toml``) and
  the server's signing keys (``id_ecdsa*``), all on ``POGLY_CONFIG_DIR``.  The
  token is kept in the CLI's own format so ``spacetime sql pogly "…"`` inside
  the container acts as the same identity.
* Tokens are secrets: never logged, masked in ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from entrypoint.config import HostPort, Settings
from entrypoint.errors import EXIT_CONFIG, EXIT_SOFTWARE, EXIT_UNAVAILABLE, Fatal
from entrypoint.fsutil import atomic_write

if TYPE_CHECKING:
    import httpx

    from entrypoint.state import Status

log = structlog.get_logger("spacetime")

CLI_TOML = "cli.toml"
STATE_FILE = "pogly-entrypoint.json"
STATE_VERSION = 1
PRIVATE_KEY = "id_ecdsa"
PUBLIC_KEY = "id_ecdsa.pub"
LOCAL_NICKNAME = "local"
SECRET_MODE = 0o600

# Explicit per-request timeouts (seconds).  Publishing compiles the module on
# the server, which can take a while for a large wasm on a small node.
REQUEST_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 180.0


# ---------------------------------------------------------------------------
# Start path: pure helpers for the supervisor (no httpx here)
# ---------------------------------------------------------------------------

_LOCK_PIDFILE = re.compile(r"spacetime\.pid already exists \(owned by pid (?:Some\((\d+)\)|None)\)")
# 1.12+: replicas/<id>/db.lock is a LockedFile whose content names the holder.
_LOCK_COMMITLOG = re.compile(r"commitlog directory is locked: .*?existing contents: \"(?:pid=(\d+))?")
# 1.7: replicas/<id>/db.lock held (no PID available).
_LOCK_DB_OPENED = re.compile(r"Database is already opened\. Path:")
_LISTENING = re.compile(r"Starting SpacetimeDB listening on (\S+)")


def command(settings: Settings) -> list[str]:
    """argv that starts SpacetimeDB on our volumes.

    ``--jwt-key-dir`` points at the config volume so the signing keys survive
    restarts next to the token they signed; the flags are spelled out even
    where the CLI would prepend defaults, because the last repeated flag wins.
    """
    return [
        settings.spacetime_bin,
        "start",
        "--data-dir",
        str(settings.data_dir),
        "--jwt-key-dir",
        str(settings.config_dir),
        "--listen-addr",
        str(settings.spacetime_addr),
    ]


def parse_lock_error(line: str) -> int | None:
    """The PID holding SpacetimeDB's data-dir lock, from one line of its output.

    ``…spacetime.pid already exists (owned by pid Some(N))`` → ``N``; the
    ``None`` variant (empty or garbled pidfile, holder unknown) → ``0``.  The
    1.12+ commitlog ``db.lock`` message is recognised the same way.  Any other
    line → ``None``.  The lock is an ``flock``: a live process holds it, so the
    answer is "wait", never "delete the file".
    """
    match = _LOCK_PIDFILE.search(line)
    if match:
        return int(match.group(1)) if match.group(1) else 0
    match = _LOCK_COMMITLOG.search(line)
    if match:
        return int(match.group(1)) if match.group(1) else 0
    if _LOCK_DB_OPENED.search(line):
        return 0
    return None


def is_listening_line(line: str) -> bool:
    """True for the line SpacetimeDB logs once its HTTP listener is bound."""
    return _LISTENING.search(line) is not None


def parse_listening_addr(line: str) -> HostPort | None:
    """The bound address from the listening line (the real port when started on port 0)."""
    from entrypoint.config import parse_host_port

    match = _LISTENING.search(line)
    return parse_host_port(match.group(1)) if match else None


async def ping(addr: HostPort, timeout: float) -> bool:
    """``GET /v1/ping`` → True on 200, False on anything else, within ``timeout``.

    Raw asyncio streams on purpose: this is polled during start-up in PID 1,
    where loading httpx would delay readiness for nothing.
    """
    status_line = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            try:
                writer.write(
                    f"GET /v1/ping HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode("ascii")
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass
    parts = status_line.split()
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"


def check_keys(config_dir: Path) -> None:
    """Refuse to start SpacetimeDB when only one of its two signing-key files exists.

    SpacetimeDB creates the key pair only when *both* are missing; with one
    present it exits with "Unable to read … key".  Catching it here lets us
    name the missing file and, above all, steer the operator away from the
    tempting "delete the other one too", which would mint new keys and orphan
    every token signed with the old ones.
    """
    private, public = config_dir / PRIVATE_KEY, config_dir / PUBLIC_KEY
    have_private, have_public = private.exists(), public.exists()
    if have_private == have_public:
        return
    missing, present = (public, private) if have_private else (private, public)
    raise Fatal(
        EXIT_CONFIG,
        f"{missing} is missing but {present} exists. SpacetimeDB signs and verifies tokens with this key "
        f"pair and would refuse to start with only one half. Restore {missing.name} from the same backup as "
        f"{present.name} (POGLY_CONFIG_DIR={config_dir}). Do NOT delete {present.name} to make SpacetimeDB "
        "generate a new pair: the publisher token in cli.toml would stop working and the databases could "
        "no longer be updated.",
        event="identity.keys_incomplete",
        missing=str(missing),
        present=str(present),
    )


def tighten_key_modes(config_dir: Path) -> list[Path]:
    """chmod 0600 the signing keys and cli.toml (SpacetimeDB writes keys with the umask).

    Best effort: a read-only or foreign-owned volume only gets a warning.
    Returns the files whose mode was changed.
    """
    changed: list[Path] = []
    for name in (PRIVATE_KEY, PUBLIC_KEY, CLI_TOML):
        path = config_dir / name
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("identity.key_mode_unchecked", path=str(path), error=str(exc))
            continue
        if mode == SECRET_MODE:
            continue
        try:
            os.chmod(path, SECRET_MODE)
        except OSError as exc:
            log.warning("identity.key_mode_unchanged", path=str(path), mode=oct(mode), error=str(exc),
                        message="could not restrict the file to mode 0600; check the volume's ownership")
            continue
        changed.append(path)
        log.info("identity.key_mode_tightened", path=str(path), old_mode=oct(mode), mode=oct(SECRET_MODE))
    return changed


# ---------------------------------------------------------------------------
# Errors and retry policy
# ---------------------------------------------------------------------------


class SpacetimeError(Exception):
    """SpacetimeDB answered with an error; ``status`` and the server's own ``text``."""

    def __init__(self, message: str, status: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.text = text


class SqlError(SpacetimeError):
    """A SQL statement was refused (400: syntax, unknown table, not owner, …)."""

    def __init__(self, database: str, statement: str, status: int, text: str) -> None:
        super().__init__(f"SQL on {database!r} failed ({status}): {text or '(no message)'}", status, text)
        self.database = database
        self.statement = statement


class SpacetimeUnavailable(SpacetimeError):
    """SpacetimeDB could not be reached, or kept failing, until the retry deadline."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``initial`` doubling up to ``maximum``, for at most ``deadline`` s."""

    initial: float = 0.2
    maximum: float = 5.0
    deadline: float = 60.0


DEFAULT_BACKOFF = Backoff()
LOG_BACKOFF = Backoff(initial=0.2, maximum=10.0, deadline=float("inf"))


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {_body_text(response)}")
        self.response = response


def _body_text(response: httpx.Response, limit: int = 2000) -> str:
    try:
        text = response.text
    except Exception:  # undecodable or not read: the status still tells the story
        return ""
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


def _retryable(response: httpx.Response) -> bool:
    """5xx means "try again", except the 1.7 permission refusal, which is final."""
    return response.status_code >= 500 and parse_ownership_error(response.status_code,
                                                                 _body_text(response)) is None


async def _request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    backoff: Backoff,
    timeout: float = REQUEST_TIMEOUT,
    **kwargs: Any,
) -> httpx.Response:
    """One HTTP call, retried on connection errors and transient 5xx with capped backoff.

    Returns the first non-retryable response (success or a definite error);
    raises ``SpacetimeUnavailable`` once ``backoff.deadline`` has passed.
    """
    import httpx
    import tenacity

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("spacetime.retrying", what=what, attempt=state.attempt_number,
                    error=_describe(exc), next_in_s=round(state.upcoming_sleep, 2))

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type((httpx.TransportError, _RetryableStatus)),
        wait=tenacity.wait_exponential(multiplier=backoff.initial, min=backoff.initial, max=backoff.maximum),
        stop=tenacity.stop_after_delay(backoff.deadline),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                response = await client.request(
                    method, url, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT), **kwargs
                )
                if _retryable(response):
                    raise _RetryableStatus(response)
                return response
    except _RetryableStatus as exc:
        raise SpacetimeUnavailable(
            f"{what}: SpacetimeDB kept failing for {backoff.deadline:g} s: {exc}",
            exc.response.status_code, _body_text(exc.response),
        ) from None
    except httpx.TransportError as exc:
        raise SpacetimeUnavailable(
            f"{what}: SpacetimeDB at {client.base_url} unreachable for {backoff.deadline:g} s: {_describe(exc)}"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover - tenacity either returns or raises


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# Ownership-error shapes (1.7 and 1.9+)
# ---------------------------------------------------------------------------

_HEX = r"(?:0x)?([0-9a-fA-F]{16,64})"
_NOT_OWNER_17_PRE = re.compile(rf"Identity does not own database, expected: {_HEX} got: {_HEX}")
_NOT_OWNER_17_PUT = re.compile(rf"Permission denied: `?{_HEX}`? does not own database `?{_HEX}`?")
_NOT_OWNER_19 = re.compile(rf"{_HEX} is not authorized to perform action(?: on database {_HEX})?: ?(.*)")


@dataclass(frozen=True)
class NotOwner:
    """A refusal because the caller does not own the database, parsed from either version's text."""

    caller: str | None
    owner: str | None
    database: str | None
    action: str | None
    text: str


def parse_ownership_error(status: int, text: str) -> NotOwner | None:
    """Recognise "you do not own this database" in every shape SpacetimeDB has used.

    * 1.7/1.8 ``pre_publish`` (401) and ``logs`` (400): ``Identity does not own
      database, expected: <owner> got: <caller>`` — the only shape naming the owner.
    * 1.7/1.8 ``PUT`` publish (500): ``Permission denied: `<caller>` does not own
      database `<16-hex prefix>```.
    * 1.9+ (403): ``<caller> is not authorized to perform action on database <db>: <action>``.
    """
    text = text.strip()
    if status in (400, 401):
        match = _NOT_OWNER_17_PRE.search(text)
        if match:
            return NotOwner(match.group(2).lower(), match.group(1).lower(), None, None, text)
    if status == 500:
        match = _NOT_OWNER_17_PUT.search(text)
        if match:
            return NotOwner(match.group(1).lower(), None, match.group(2).lower(), None, text)
    if status == 403:
        match = _NOT_OWNER_19.search(text)
        if match:
            database = match.group(2).lower() if match.group(2) else None
            return NotOwner(match.group(1).lower(), None, database, match.group(3) or None, text)
    return None


# ---------------------------------------------------------------------------
# Identity: cli.toml, token verification, ~/.config/spacetime
# ---------------------------------------------------------------------------


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
    from entrypoint import identity

    claims = token_claims(token)
    if isinstance(claims.get("hex_identity"), str):
        return identity.normalize_hex(claims["hex_identity"])
    iss, sub = claims.get("iss"), claims.get("sub")
    if isinstance(iss, str) and isinstance(sub, str):
        return identity.from_claims(iss, sub)
    raise ValueError("JWT has neither hex_identity nor iss/sub")


def _token_sub(token: str) -> str | None:
    try:
        sub = token_claims(token).get("sub")
    except ValueError:
        return None
    return sub if isinstance(sub, str) else None


def _toml_string(value: str) -> str:
    out = ['"']
    for char in value:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(doc: Mapping[str, Any]) -> str:
    """Serialise the subset of TOML ``cli.toml`` uses: scalars, tables, arrays of tables.

    Hand-written because the standard library only reads TOML, and the
    CLI's file is simple enough that a dependency is not worth it.
    """
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        entries = value if isinstance(value, list) else [value]
        header = f"[[{_toml_key(key)}]]" if isinstance(value, list) else f"[{_toml_key(key)}]"
        for entry in entries:
            lines.append("")
            lines.append(header)
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


def read_cli_toml(path: Path) -> dict[str, Any]:
    """The CLI config as a dict; ``{}`` when absent.

    An unreadable or malformed file is fatal rather than replaced: it may hold
    the only copy of the token that owns the databases.
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
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise Fatal(
            EXIT_CONFIG,
            f"{path} is not valid TOML ({exc}). It holds the publisher token that owns the databases, so it "
            "is not overwritten: fix it by hand (or restore it from backup) and restart.",
            event="identity.cli_toml_invalid", path=str(path),
        ) from None


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


def _write_secret_if_changed(path: Path, doc: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    if dict(doc) != dict(old) or not path.exists():
        atomic_write(path, dump_toml(doc), SECRET_MODE)
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


def _token_rejected(stored: str, path: Path, config_dir: Path, status: int, text: str,
                    sub: str | None, owners: Mapping[str, str]) -> Fatal:
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


async def _database_owners(client: httpx.AsyncClient, modules: Iterable[str]) -> dict[str, str]:
    """Owner per existing database, best effort and unauthenticated (for error messages only)."""
    owners: dict[str, str] = {}
    for module in modules:
        with contextlib.suppress(Exception):
            owner = await _info_owner(client, module, None)
            if owner:
                owners[module] = owner
    return owners


async def ensure_identity(
    settings: Settings,
    client: httpx.AsyncClient,
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
    token = existing.get("spacetimedb_token")
    if isinstance(token, str) and token.strip():
        token = token.strip()
        try:
            identity = token_identity(token)
            sub = _token_sub(token)
        except ValueError as exc:
            raise Fatal(
                EXIT_CONFIG,
                f"spacetimedb_token in {path} is not a usable JWT ({exc}). Restore cli.toml from the backup of "
                "this config volume; it is not replaced automatically because the databases belong to the "
                "identity of the original token.",
                event="identity.token_invalid", path=str(path),
            ) from None
        response = await _call(client, "GET", f"/v1/identity/{identity}/verify", what="verify identity",
                               backoff=backoff, headers={"Authorization": f"Bearer {token}"})
        if response.status_code in (401, 400, 403):
            owners = await _database_owners(client, settings.modules)
            raise _token_rejected(identity, path, config_dir, response.status_code, _body_text(response),
                                  sub, owners)
        if not response.is_success:
            raise Fatal(EXIT_UNAVAILABLE,
                        f"SpacetimeDB could not verify the publisher identity {identity}: "
                        f"{response.status_code} {_body_text(response)}",
                        event="identity.verify_failed", stored_identity=identity)
        publisher = Publisher(identity, token)
        log.info("identity.reused", identity=identity, cli_toml=str(path))
    else:
        response = await _call(client, "POST", "/v1/identity", what="create identity", backoff=backoff)
        try:
            data = response.json()
            from entrypoint.identity import normalize_hex

            publisher = Publisher(normalize_hex(data["identity"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            raise Fatal(EXIT_UNAVAILABLE,
                        f"SpacetimeDB did not issue an identity: {response.status_code} {_body_text(response)}",
                        event="identity.create_failed") from None
        log.info("identity.created", identity=publisher.identity, cli_toml=str(path),
                 message="new publisher identity stored on the config volume; back it up with the keys")
    _write_secret_if_changed(path, cli_document(existing, publisher.token, settings.spacetime_addr), existing)
    link_cli_config(config_dir, home)
    return publisher


async def _call(client: httpx.AsyncClient, method: str, url: str, *, what: str, backoff: Backoff,
                **kwargs: Any) -> httpx.Response:
    """``_request`` whose exhaustion is a ``Fatal(69)``: SpacetimeDB is a hard dependency."""
    try:
        return await _request(client, method, url, what=what, backoff=backoff, **kwargs)
    except SpacetimeUnavailable as exc:
        raise Fatal(EXIT_UNAVAILABLE, str(exc), event="spacetime.unavailable", what=what) from None


# ---------------------------------------------------------------------------
# State file: what we published, per module
# ---------------------------------------------------------------------------


def state_path(config_dir: Path) -> Path:
    return config_dir / STATE_FILE


def load_state(config_dir: Path) -> dict[str, Any]:
    """``{"version": 1, "modules": {name: {...}}}``; empty when missing.

    A corrupt file is moved aside (never deleted) and treated as empty: the
    worst outcome is one redundant update publish, while first-boot config is
    only ever applied to a database we create.
    """
    path = state_path(config_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"version": STATE_VERSION, "modules": {}}
    except (OSError, ValueError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("state.unreadable", path=str(path), moved_to=str(aside), error=str(exc))
        return {"version": STATE_VERSION, "modules": {}}
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        log.warning("state.unexpected_shape", path=str(path))
        data = {"version": STATE_VERSION, "modules": {}} if not isinstance(data, dict) else data
        data["modules"] = {}
    return data


def module_state(config_dir: Path, module: str) -> dict[str, Any]:
    entry = load_state(config_dir)["modules"].get(module)
    return dict(entry) if isinstance(entry, dict) else {}


def update_module_state(config_dir: Path, module: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into one module's entry and save atomically (mode 0600).

    Read-modify-write with no ``await`` in between, so concurrent tasks on one
    event loop cannot lose each other's updates.  Keys we do not know (another
    part of the entrypoint may add its own) are preserved.
    """
    data = load_state(config_dir)
    data["version"] = STATE_VERSION
    entry = data["modules"].setdefault(module, {})
    entry.update(fields)
    atomic_write(state_path(config_dir), json.dumps(data, indent=2, sort_keys=True) + "\n", SECRET_MODE)
    return dict(entry)


# ---------------------------------------------------------------------------
# SQL
# ---------------------------------------------------------------------------


def sql_string(value: str) -> str:
    """A SQL string literal: single quotes, embedded quotes doubled.  NUL is refused."""
    if "\x00" in value:
        raise ValueError("SQL string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def sql_bool(value: bool) -> str:
    return "true" if value else "false"


def sql_identity(value: str) -> str:
    """An Identity literal (``0x`` + 64 hex) from any accepted spelling; refuses non-identities."""
    from entrypoint.identity import normalize_hex

    return "0x" + normalize_hex(value)


def sql_literal(value: str | bool | int) -> str:
    """The literal for a Python value; booleans first, since ``bool`` is an ``int``."""
    if isinstance(value, bool):
        return sql_bool(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return sql_string(value)
    raise TypeError(f"no SQL literal for {type(value).__name__}")


_WRAPPED = ("__identity__", "__connection_id__", "__timestamp_micros_since_unix_epoch__",
            "__time_duration_micros__")


def _unwrap_cell(value: Any, kind: str | None) -> Any:
    """SATS-JSON special products → plain values; identities as 64 lowercase hex."""
    inner = value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _WRAPPED:
        kind, inner = next(iter(value)), next(iter(value.values()))
    elif isinstance(value, list) and len(value) == 1 and (
        kind is not None or (isinstance(value[0], str) and value[0][:2] in ("0x", "0X"))
    ):
        inner = value[0]
    else:
        return value
    if isinstance(inner, str) and inner[:2] in ("0x", "0X"):
        hex_digits = inner[2:].lower()
        # Only a known Identity column is padded to 64 digits; a ConnectionId is 32.
        return hex_digits.rjust(64, "0") if kind == "__identity__" else hex_digits
    return inner


def _column_kind(algebraic_type: Any) -> str | None:
    """``__identity__`` etc. when the column's type is one of SATS's special single-field products."""
    if not isinstance(algebraic_type, dict):
        return None
    product = algebraic_type.get("Product")
    if not isinstance(product, dict):
        return None
    elements = product.get("elements")
    if isinstance(elements, list) and len(elements) == 1:
        name = elements[0].get("name") if isinstance(elements[0], dict) else None
        if isinstance(name, dict):
            name = name.get("some")
        if name in _WRAPPED:
            return str(name)
    return None


def parse_sql_result(payload: Any) -> list[dict[str, Any]]:
    """Rows as dicts from the ``/sql`` answer ``[{"schema": …, "rows": […]}, …]``."""
    rows: list[dict[str, Any]] = []
    results = payload if isinstance(payload, list) else [payload]
    for result in results:
        if not isinstance(result, dict):
            continue
        elements = (result.get("schema") or {}).get("elements") or []
        names: list[str] = []
        kinds: list[str | None] = []
        for index, element in enumerate(elements):
            name = element.get("name") if isinstance(element, dict) else None
            if isinstance(name, dict):
                name = name.get("some")
            names.append(name if isinstance(name, str) else f"col{index}")
            kinds.append(_column_kind(element.get("algebraic_type")) if isinstance(element, dict) else None)
        for row in result.get("rows") or []:
            cells = row if isinstance(row, list) else [row]
            rows.append({
                (names[i] if i < len(names) else f"col{i}"): _unwrap_cell(cell, kinds[i] if i < len(kinds) else None)
                for i, cell in enumerate(cells)
            })
    return rows


async def sql(client: httpx.AsyncClient, publisher: Publisher, database: str, statement: str,
              *, timeout: float = REQUEST_TIMEOUT) -> list[dict[str, Any]]:
    """Run one SQL statement as the publisher (the owner: DML and private tables allowed).

    Returns the rows as dicts, Identity cells as 64 lowercase hex.  Any non-2xx
    answer raises ``SqlError`` carrying the server's text; connection errors
    propagate as httpx exceptions (callers poll, they decide about retries).
    """
    import httpx

    response = await client.post(
        f"/v1/database/{database}/sql",
        content=statement.encode("utf-8"),
        headers={**publisher.headers, "Content-Type": "text/plain; charset=utf-8"},
        timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
    )
    if not response.is_success:
        raise SqlError(database, statement, response.status_code, _body_text(response))
    if not response.content.strip():
        return []
    try:
        return parse_sql_result(response.json())
    except ValueError as exc:
        raise SqlError(database, statement, response.status_code, f"unparseable result: {exc}") from None


# ---------------------------------------------------------------------------
# Publish
# ---------------------------------------------------------------------------


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


def _identity_from_json(value: Any) -> str | None:
    """An identity from any JSON shape the API uses: ``"c200…"``, ``"0x…"``, ``{"__identity__": …}``, ``[…]``."""
    from entrypoint.identity import normalize_hex

    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[:2] in ("0x", "0X"):
        text = "0x" + text[2:].rjust(64, "0")
    try:
        return normalize_hex(text)
    except ValueError:
        return None


async def _info_owner(client: httpx.AsyncClient, module: str, publisher: Publisher | None) -> str | None:
    """The owner from ``GET /v1/database/<name>``, or None when the server does not say."""
    import httpx

    response = await client.get(f"/v1/database/{module}", headers=publisher.headers if publisher else None,
                                timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT))
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return _identity_from_json(data.get("owner_identity")) if isinstance(data, dict) else None


async def _check_owner(settings: Settings, client: httpx.AsyncClient, publisher: Publisher, module: str,
                       wasm: bytes, backoff: Backoff) -> None:
    """Stop before touching a database that belongs to someone else.

    The database-info route names the owner; when it does not, the dry-run
    ``pre_publish`` gives the 1.7 (401, names the owner) or 1.9+ (403) refusal.
    Any other answer is inconclusive and the real publish decides.
    """
    try:
        owner = await _info_owner(client, module, publisher)
    except Exception as exc:  # inconclusive; the publish path has its own error handling
        log.debug("publish.owner_lookup_failed", module=module, error=_describe(exc))
        owner = None
    if owner is not None:
        if owner != publisher.identity:
            raise _not_owner_fatal(settings, module, publisher.identity, owner, "")
        return
    try:
        response = await _request(client, "POST", f"/v1/database/{module}/pre_publish",
                                  what=f"pre-publish check of {module}", backoff=backoff,
                                  timeout=PUBLISH_TIMEOUT, params={"host_type": "Wasm"},
                                  content=wasm, headers=publisher.headers)
    except SpacetimeUnavailable as exc:
        log.debug("publish.pre_publish_unavailable", module=module, error=str(exc))
        return
    refusal = parse_ownership_error(response.status_code, _body_text(response))
    if refusal is not None:
        raise _not_owner_fatal(settings, module, publisher.identity, refusal.owner, refusal.text)


async def _database_identity(client: httpx.AsyncClient, publisher: Publisher, module: str,
                             backoff: Backoff) -> str | None:
    """``GET /v1/database/<name>/identity``: the database's identity, None when it does not exist."""
    response = await _call(client, "GET", f"/v1/database/{module}/identity",
                           what=f"look up database {module}", backoff=backoff, headers=publisher.headers)
    if response.status_code == 404:
        return None
    identity = _identity_from_json(_body_text(response).strip('"'))
    if response.status_code != 200 or identity is None:
        raise Fatal(EXIT_UNAVAILABLE,
                    f"could not tell whether database {module!r} exists: {response.status_code} "
                    f"{_body_text(response)}",
                    event="publish.lookup_failed", module=module)
    return identity


def _read_wasm(settings: Settings, module: str) -> tuple[Path, bytes]:
    path = settings.module_wasm(module)
    try:
        return path, path.read_bytes()
    except OSError as exc:
        raise Fatal(
            EXIT_CONFIG,
            f"module {module!r}: cannot read {path} ({exc.strerror or exc}). Put {module}.wasm or pogly.wasm "
            f"in POGLY_MODULE_DIR={settings.module_dir}, or point POGLY_MODULE_DIR at the directory that has it.",
            event="publish.module_missing", module=module, path=str(path),
        ) from None


def _success(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    success = data.get("Success") if isinstance(data, dict) else None
    return success if isinstance(success, dict) else None


async def _publish_one(settings: Settings, status: Status, client: httpx.AsyncClient,
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
            if recorded.get("first_boot_config_applied") is False:
                # created by us, but the first-boot config did not complete (crash in between)
                await apply_first_boot_config(settings, client, publisher, module)
            return

    log.info("publish.start", module=module, path=str(path), sha256=digest, size=len(wasm),
             update=existing is not None)
    failure: str
    try:
        response = await _request(client, "PUT", f"/v1/database/{module}", what=f"publish {module}",
                                  backoff=backoff, timeout=PUBLISH_TIMEOUT, params={"host_type": "Wasm"},
                                  content=wasm,
                                  headers={**publisher.headers, "Content-Type": "application/wasm"})
    except SpacetimeUnavailable as exc:
        response, failure, code = None, str(exc), EXIT_UNAVAILABLE
    else:
        text = _body_text(response)
        refusal = parse_ownership_error(response.status_code, text)
        if refusal is not None:
            raise _not_owner_fatal(settings, module, publisher.identity, refusal.owner, refusal.text)
        if "PermissionDenied" in text:
            raise _not_owner_fatal(settings, module, publisher.identity, None, text)
        if response.status_code == 401:
            owners = {module: existing} if existing else {}
            raise _token_rejected(publisher.identity, settings.config_dir / CLI_TOML, settings.config_dir,
                                  401, text, _token_sub(publisher.token), owners)
        success = _success(response) if response.is_success else None
        if success is not None:
            database_identity = _identity_from_json(success.get("database_identity")) or existing
            op = "created" if success.get("op") == "created" else "updated"
            created = op == "created"
            fields: dict[str, Any] = {"hash": digest, "database_identity": database_identity}
            if created:
                fields["first_boot_config_applied"] = False
            entry = update_module_state(settings.config_dir, module, **fields)
            info.database_identity, info.published_hash = database_identity, digest
            info.publish_result, info.serving = op, True
            log.info(f"publish.{op}", module=module, database_identity=database_identity, sha256=digest)
            if entry.get("first_boot_config_applied") is False and (
                created or recorded.get("database_identity") == database_identity
            ):
                await apply_first_boot_config(settings, client, publisher, module)
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
    info.publish_result, info.serving = f"failed: {failure}", True
    log.error("publish.failed", module=module, database_identity=existing, sha256=digest,
              server_message=failure,
              message=f"update of {module!r} was refused; the previously published module keeps serving. "
                      "Fix the module (or revert the image) and restart to retry.")


async def publish_all(settings: Settings, status: Status, client: httpx.AsyncClient, publisher: Publisher,
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

_NO_TABLE = re.compile(r"not a valid table|no such table|table .* (?:does not exist|not found)", re.I)


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


async def apply_first_boot_config(settings: Settings, client: httpx.AsyncClient, publisher: Publisher,
                                  module: str) -> str:
    """Apply STREAM_*/DEBUG_MODE/STRICT_MODE to a new database's Config row, exactly once.

    Why: Pogly's ``SetConfig`` reducer makes whoever calls it first the owner
    while ``ConfigInit`` is false; setting it here closes that door.  Runs only
    for a database we created (or whose creation we recorded but did not
    finish configuring), and never again once recorded, so later owner changes
    survive restarts.  A row already initialised is left alone.  Returns what
    happened: "applied", "already-initialised", "not-pogly" or "failed: …".
    """
    async def done(outcome: str) -> str:
        update_module_state(settings.config_dir, module, first_boot_config_applied=True,
                            first_boot_config=outcome)
        return outcome

    select = "SELECT * FROM Config WHERE Version = 0"
    try:
        rows = await sql(client, publisher, module, select)
        if not rows:
            log.info("config.first_boot_skipped", module=module, reason="no Config row with Version 0")
            return await done("not-pogly")
        if rows[0].get("ConfigInit") is True:
            log.warning("config.first_boot_skipped", module=module, reason="Config already initialised",
                        message="left untouched: somebody completed onboarding before us")
            return await done("already-initialised")
        await sql(client, publisher, module, first_boot_statement(settings))
        rows = await sql(client, publisher, module, select)
    except SqlError as exc:
        if exc.status == 400 and _NO_TABLE.search(exc.text):
            log.info("config.first_boot_skipped", module=module, reason="no Config table (not a Pogly module)")
            return await done("not-pogly")
        log.error("config.first_boot_failed", module=module, server_message=exc.text, status=exc.status,
                  message="Pogly's onboarding stays open (ConfigInit false) until this succeeds; "
                          "it is retried at the next start")
        return f"failed: {exc.text}"
    except Exception as exc:
        log.error("config.first_boot_failed", module=module, error=_describe(exc),
                  message="retried at the next start")
        return f"failed: {_describe(exc)}"
    if not rows or not _config_matches(rows[0], settings):
        log.error("config.first_boot_failed", module=module, row=rows[0] if rows else None,
                  message="the Config row does not show the values just written; retried at the next start")
        return "failed: read-back mismatch"
    log.info("config.first_boot_applied", module=module, streaming_platform=settings.stream_platform,
             stream_name=settings.stream_name, debug_mode=settings.debug_mode,
             strict_mode=settings.strict_mode)
    return await done("applied")


# ---------------------------------------------------------------------------
# Module logs
# ---------------------------------------------------------------------------

_MODULE_LEVELS = {
    "error": "error", "panic": "error", "warn": "warning", "warning": "warning",
    "info": "info", "debug": "debug", "trace": "debug",
}


def module_log_event(module: str, line: str) -> tuple[str, str, dict[str, Any]]:
    """One NDJSON module-log line → ``(level, message, fields)`` for structlog."""
    service = f"module:{module}"
    fields: dict[str, Any] = {"service": service}
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return "info", line, fields
    level = _MODULE_LEVELS.get(str(data.get("level", "info")).lower(), "info")
    message = data.get("message")
    for ours, theirs in (("function", "function"), ("filename", "filename"), ("line", "line_number"),
                         ("target", "target"), ("module_ts", "ts"), ("trace", "trace")):
        if data.get(theirs) is not None:
            fields[ours] = data[theirs]
    if str(data.get("level", "")).lower() == "panic":
        fields["panic"] = True
    return level, str(message) if message is not None else "", fields


def emit_module_log(module: str, line: str) -> None:
    level, message, fields = module_log_event(module, line)
    getattr(structlog.get_logger(fields["service"]), level)(message, **fields)


async def follow_module_logs(settings: Settings, client: httpx.AsyncClient, publisher: Publisher, module: str,
                             *, stop: asyncio.Event | None = None, backoff: Backoff = LOG_BACKOFF) -> None:
    """Copy a module's own log into ours, as events with ``service=module:<name>``, until stopped.

    Follows ``GET /v1/database/<name>/logs?follow=true`` (owner only) and
    reconnects with capped backoff whenever SpacetimeDB restarts.  Never
    raises except ``CancelledError``; returns when ``stop`` is set.
    """
    del settings  # part of the uniform signature; the client already knows where SpacetimeDB is
    if stop is None:
        await _follow(client, publisher, module, backoff)
        return
    follower = asyncio.create_task(_follow(client, publisher, module, backoff), name=f"logs:{module}")
    stopper = asyncio.create_task(stop.wait(), name=f"logs-stop:{module}")
    try:
        await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        follower.cancel()
        stopper.cancel()
        await asyncio.gather(follower, stopper, return_exceptions=True)


async def _follow(client: httpx.AsyncClient, publisher: Publisher, module: str, backoff: Backoff) -> None:
    import httpx

    delay = backoff.initial
    connected_before = False
    quiet = False  # after the first failure in a row, further ones go to debug
    denied_warned = False
    while True:
        problem: dict[str, Any] | None = None
        try:
            async with client.stream(
                "GET", f"/v1/database/{module}/logs", params={"num_lines": "0", "follow": "true"},
                headers=publisher.headers,
                timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=None),
            ) as response:
                if response.status_code == 200:
                    log.info("module_logs.following", module=module, reconnect=connected_before)
                    connected_before, quiet, denied_warned, delay = True, False, False, backoff.initial
                    async for line in response.aiter_lines():
                        if line.strip():
                            emit_module_log(module, line)
                    problem = {"reason": "stream ended"}
                else:
                    await response.aread()
                    text = _body_text(response)
                    refusal = parse_ownership_error(response.status_code, text)
                    problem = {"status": response.status_code, "server_message": text}
                    if refusal is not None or response.status_code in (401, 403):
                        if not denied_warned:
                            log.warning("module_logs.denied", module=module, **problem,
                                        message="only the database owner may read its logs; retrying")
                        denied_warned = quiet = True
                        problem = None
        except httpx.HTTPError as exc:
            problem = {"error": _describe(exc)}
        except Exception as exc:  # never let a log follower take the supervisor down
            problem = {"error": _describe(exc)}
        if problem is not None:
            (log.debug if quiet else log.info)("module_logs.disconnected", module=module, retry_in_s=delay,
                                               **problem)
            quiet = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff.maximum)


__all__ = [
    "DEFAULT_BACKOFF", "STATE_FILE", "Backoff", "NotOwner", "Publisher", "SpacetimeError",
    "SpacetimeUnavailable", "SqlError", "apply_first_boot_config", "check_keys", "cli_document", "command",
    "dump_toml", "emit_module_log", "ensure_identity", "first_boot_statement", "follow_module_logs",
    "is_listening_line", "link_cli_config", "load_state", "module_log_event", "module_state",
    "parse_listening_addr", "parse_lock_error", "parse_ownership_error", "parse_sql_result", "ping",
    "publish_all", "read_cli_toml", "sql", "sql_bool", "sql_identity", "sql_literal", "sql_string",
    "tighten_key_modes", "token_claims", "token_identity", "update_module_state",
]
