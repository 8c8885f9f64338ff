"""``posix_spawn`` with a clean slate, importable before asyncio exists.

Kept apart from ``process.py`` so the entrypoint can start SpacetimeDB within a
few tens of milliseconds of ``exec``, before the event loop and the logging
library are even imported (see ``entrypoint/startup.py``).

``posix_spawn`` resets every signal to its default disposition and clears the
signal mask in the child before ``exec`` (``setsigdef``/``setsigmask``), and
puts it in its own process group (``setpgroup``): Python's handlers and any
blocked signals never leak into SpacetimeDB or Caddy, and there is no
fork-to-exec window in which a stop signal could be swallowed.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_DEFAULT_SIGNALS = {
    s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP) and s < 32
}


def spawn(argv: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[int, int, int]:
    """Start ``argv`` with stdin=/dev/null, own process group, default signals.

    Returns ``(pid, stdout_fd, stderr_fd)``; the fds are non-blocking read ends.
    Raises ``OSError`` when the program cannot be executed.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    old_cwd = None
    try:
        if cwd:
            old_cwd = os.open(".", os.O_RDONLY)
            os.chdir(cwd)
        pid = os.posix_spawn(
            argv[0], argv, env,
            file_actions=actions, setpgroup=0, setsigmask=(), setsigdef=_DEFAULT_SIGNALS,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
        if old_cwd is not None:
            os.fchdir(old_cwd)
            os.close(old_cwd)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    return pid, out_r, err_r


def become_subreaper() -> bool:
    """Adopt orphaned descendants when we are not PID 1 (``PR_SET_CHILD_SUBREAPER``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def is_subreaper() -> bool:
    """Whether orphaned descendants are re-parented to us (``PR_GET_CHILD_SUBREAPER``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0
    except (OSError, AttributeError):
        return False
