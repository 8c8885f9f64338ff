"""The state file on the config volume: what we published, per module, across restarts.

``pogly-entrypoint.json`` remembers each module's wasm hash and database
identity (so an unchanged module is not published again) and one-time facts
such as "first-boot config applied" or an ownership claim in progress.  It
lives next to ``cli.toml`` because it is only meaningful with that identity.

Two processes write it: the supervisor and ``pogly-entrypoint owner set``
(run with ``kubectl exec`` beside it), so every read-modify-write holds an
``flock`` on a sidecar ``.lock`` file; otherwise one could silently drop the
other's update (a claim in progress, a published hash).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from entrypoint import logs
from entrypoint.fsutil import SECRET_MODE, atomic_write

log = logs.get("statefile")

STATE_FILE = "pogly-entrypoint.json"
STATE_VERSION = 1


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
    """A copy of one module's entry (``{}`` when unknown): callers change it via ``update_module_state``."""
    entry = load_state(config_dir)["modules"].get(module)
    return dict(entry) if isinstance(entry, dict) else {}


def update_module_state(config_dir: Path, module: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into one module's entry and save atomically (mode 0600).

    Read-modify-write with no ``await`` in between, so concurrent tasks on one
    event loop cannot lose each other's updates.  Keys we do not know (another
    part of the entrypoint may add its own) are preserved.
    """
    with _locked(config_dir):
        data = load_state(config_dir)
        data["version"] = STATE_VERSION
        entry = data["modules"].setdefault(module, {})
        entry.update(fields)
        atomic_write(state_path(config_dir), json.dumps(data, indent=2, sort_keys=True) + "\n", SECRET_MODE)
    return dict(entry)


@contextlib.contextmanager
def _locked(config_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``pogly-entrypoint.json.lock`` (held for milliseconds).

    The lock file is never deleted (deleting a lock file others may hold is
    how two writers end up unserialised).  When it cannot be created the write
    below fails with the real reason, so no lock is taken and none is faked.
    """
    try:
        fd = os.open(config_dir / f"{STATE_FILE}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SECRET_MODE)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


__all__ = ["STATE_FILE", "STATE_VERSION", "load_state", "module_state", "state_path", "update_module_state"]
