"""Atomic file writes: a reader (Caddy, a browser, the CLI) never sees half a file."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from entrypoint.errors import EXIT_CONFIG, Fatal

SECRET_MODE = 0o600  # tokens, signing keys, the state file: readable by their owner only

_NOT_ALLOWED = ("this user may not write there: fix the volume's owner/permissions (fsGroup) or point "
                "the variable elsewhere")
_FIXES = {
    errno.ENOSPC: "the volume is full: free space on it or give it a larger volume",
    errno.EDQUOT: "the disk quota is used up: free space or raise the quota",
    errno.EROFS: "it is read-only: mount a writable volume there or point the variable elsewhere",
    errno.EACCES: _NOT_ALLOWED,
    errno.EPERM: _NOT_ALLOWED,
}


class WriteFailed(Fatal, OSError):
    """Writing ``path`` failed: an ``OSError`` that names the file (not just "[Errno 28]") and a ``Fatal``.

    An ``OSError`` (``errno``, ``strerror`` and ``filename`` are set), so code
    that handles ``OSError`` keeps working.  A ``Fatal`` (exit 78,
    ``config.dir_unwritable``), so one that nobody handles ends the supervisor
    with a message naming the file, the reason and the fix instead of exit 70
    and a traceback.  A caller that knows which variable names the directory
    raises ``fatal(variable, directory)`` instead, which names it too.
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        code = cause.errno or 0
        OSError.__init__(self, code, cause.strerror or (os.strerror(code) if code else str(cause)), str(path))
        self.path = path
        self.exit_code = EXIT_CONFIG
        self.event = "config.dir_unwritable"
        self.message = f"{self}; {self.fix}"
        self.fields = {"path": str(path), "errno": self.errno_name}

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno or 0, str(self.errno))

    @property
    def fix(self) -> str:
        return _FIXES.get(self.errno or 0, "make it writable or point the variable that names it elsewhere")

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror} ({self.errno_name})"

    def fatal(self, variable: str, directory: Path) -> Fatal:
        """Exit 78 naming ``variable=directory``, the file, the reason and the fix."""
        return Fatal(EXIT_CONFIG, f"{variable}={directory} is not writable: {self}; {self.fix}",
                     event="config.dir_unwritable", variable=variable, **self.fields)


def read_small_file(path: Path, limit: int = 64 * 1024) -> bytes | None:
    """The bytes of a small regular file we wrote ourselves; None for anything else.

    For our own bookkeeping files (stamps, memos): whatever sits there instead
    (a FIFO, a device, a directory, a huge file) must neither block the start
    (a FIFO's open waits for a writer, hence ``O_NONBLOCK``) nor fill memory;
    the caller then acts as if there were none.  Raises nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename.

    The mode is applied to the temp file before any byte is written, so a
    secret is never readable by others, not even for an instant.  Any failure
    raises ``WriteFailed`` (naming ``path``); the old file, if any, is untouched
    and no temp file is left behind.
    """
    if isinstance(data, str):
        data = data.encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteFailed(path, exc) from exc
    try:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise WriteFailed(path, exc) from exc
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
