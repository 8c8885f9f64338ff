"""Atomic file writes: a reader (Caddy, a browser, the CLI) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

SECRET_MODE = 0o600  # tokens, signing keys, the state file: readable by their owner only


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename.

    The mode is applied to the temp file before any byte is written, so a
    secret is never readable by others, not even for an instant.
    """
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
