"""Small shared helpers: the emulated version, clocks, hex forms and the stdout logger.

Everything here is import-light on purpose: ``spacetime start`` must print its listening line
quickly (the supervisor's readiness logic is timed against it), so heavy modules are only imported
where they are needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass

DEFAULT_VERSION = "1.7.0"
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class Version:
    """The SpacetimeDB release being imitated (``STANDIN_VERSION``, default 1.7.0).

    Several observable behaviours changed between releases (owner errors became 403 in 1.9.0,
    ``--non-interactive`` appeared in 1.12.0, ...); tests pick the release they want to exercise.
    """

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION_RE.match(text.strip())
        if not m:
            raise ValueError(f"invalid STANDIN_VERSION {text!r}: expected MAJOR.MINOR.PATCH")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    @classmethod
    def from_env(cls) -> Version:
        return cls.parse(os.environ.get("STANDIN_VERSION") or DEFAULT_VERSION)

    def at_least(self, major: int, minor: int, patch: int = 0) -> bool:
        return (self.major, self.minor, self.patch) >= (major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class CliError(Exception):
    """An error the real binaries report as ``Error: {err:?}`` (+ ``Caused by:``) and exit code 1."""

    def __init__(self, message: str, cause: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.code = code

    def render(self) -> str:
        text = f"Error: {self.message}"
        if self.cause:
            text += f"\n\nCaused by:\n    {self.cause}"
        return text


class UsageError(Exception):
    """A clap-style usage error: printed on stderr, exit code 2."""


def now_micros() -> int:
    return time.time_ns() // 1000


def os_error_text(err: OSError) -> str:
    """Format an OSError the way Rust's ``io::Error`` Debug/Display chain shows it."""
    return f"{err.strerror} (os error {err.errno})"


def norm_hex(text: str, nbytes: int) -> str | None:
    """Accept ``abcd…``, ``0xabcd…`` or ``X'abcd…'`` of exactly ``nbytes`` bytes; return lowercase hex."""
    t = text.strip()
    if len(t) >= 3 and t[0] in "xX" and t[1] == "'" and t.endswith("'"):
        t = t[2:-1]
    elif t[:2] in ("0x", "0X"):
        t = t[2:]
    if len(t) != nbytes * 2:
        return None
    try:
        bytes.fromhex(t)
    except ValueError:
        return None
    return t.lower()


class StdoutLog:
    """The server's tracing output: compact lines on stdout, optionally mirrored to a log file.

    The real server filters its log lines with the ``[logs]`` table of ``<data-dir>/config.toml``;
    the generated file enables the standalone crate's info lines (e.g. ``Starting SpacetimeDB
    listening on …``), a user-written file without ``[logs]`` hides them.  ``enabled`` models that.
    """

    def __init__(self) -> None:
        self.enabled = True
        self._file_fd: int | None = None

    def open_file(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._file_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            self._file_fd = None

    def info(self, source: str, message: str) -> None:
        self.emit("INFO", source, message)

    def emit(self, level: str, source: str, message: str) -> None:
        if not self.enabled:
            return
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        frac = f"{time.time_ns() // 1000 % 1_000_000:06d}"
        line = f"{ts}.{frac}Z {level:>5} {source}: {message}\n"
        try:  # like tracing's writer: a reader that went away must not take the server down
            sys.stdout.write(line)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        if self._file_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._file_fd, line.encode())


def println(text: str = "") -> None:
    """Write one line to stdout and flush (stdout is a pipe under the supervisor)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def eprintln(text: str = "") -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
