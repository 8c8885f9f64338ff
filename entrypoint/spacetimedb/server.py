"""SpacetimeDB the process: its command line, what its output means, readiness, its key files.

This is the **start path**: it runs before anything is ready, in PID 1, right
after the signal handlers are installed, so it imports nothing heavy.  ``ping``
speaks HTTP/1.1 over raw asyncio streams so no HTTP client is loaded here; the
HTTP side (identity, publish, SQL, module logs) lives in the modules that run
once the server answers, on ``entrypoint/localhttp.py``.

The config volume (``POGLY_CONFIG_DIR``) holds the server's signing keys
(``id_ecdsa*``) next to the publisher token they signed (``cli.toml``): the
file names are defined here because this is the first place that needs them.
Safety rule that shapes ``check_keys``: never "repair" a half-missing key pair
by letting SpacetimeDB mint a new one, which would orphan the token that owns
the databases (reference/spacetimedb.md §2-§5).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from pathlib import Path

from entrypoint.config import HostPort, Settings
from entrypoint.errors import EXIT_CONFIG, Fatal
from entrypoint.fsutil import SECRET_MODE
from entrypoint.supervision.spawn import spawn

CLI_TOML = "cli.toml"
PRIVATE_KEY = "id_ecdsa"
PUBLIC_KEY = "id_ecdsa.pub"

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


def prespawn(settings: Settings) -> tuple[int, int, int, float] | None:
    """Start SpacetimeDB before the event loop and the logging library are imported.

    SpacetimeDB takes longest to become ready, so it goes first: this runs right
    after the configuration is read (about 40 ms after ``exec``) instead of
    after ~80 ms of imports.  Only when its volumes are plainly usable; on any
    doubt return None and let the supervisor start it, check and report.
    Returns ``(pid, stdout_fd, stderr_fd, wall-clock spawn time)``.
    """
    try:  # OSError too: ``is_dir()`` raises ENAMETOOLONG/EACCES (the in-loop start reports those properly)
        for path in (settings.data_dir, settings.config_dir):
            if not (path.is_dir() and os.access(path, os.W_OK | os.X_OK)):
                return None
        check_keys(settings.config_dir)
        return (*spawn(command(settings), dict(os.environ)), time.time())
    except (Fatal, OSError):
        return None


async def ping(addr: HostPort, timeout: float) -> bool:
    """``GET /v1/ping`` → True on 200, False on anything else, within ``timeout``.

    Raw asyncio streams on purpose: this is polled during start-up in PID 1,
    where loading an HTTP client would delay readiness for nothing.
    """
    import asyncio  # only once the event loop runs: this module is imported before it exists

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
    import structlog

    log = structlog.get_logger("spacetime")
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


__all__ = [
    "CLI_TOML", "PRIVATE_KEY", "PUBLIC_KEY", "check_keys", "command", "is_listening_line",
    "parse_lock_error", "ping", "tighten_key_modes",
]
