"""Structured logs for us and our children, with secrets redacted.

Everything the container prints goes through here so that one redaction pass
covers our own events and every line a child writes: a JWT in a SpacetimeDB
debug line or a bearer token in a Caddy access log must never reach the log
collector.

Two kinds of lines, one shape (``ts``, ``level``, ``event``, ``service`` first):

- **Our events** have our names (``child.started``, ``entrypoint.ready``…) and
  are filtered by ``LOG_LEVEL`` (unset: ``debug`` with ``DEBUG_MODE``, else
  ``info``).
- **A child's line** is always ``event="child.output"`` (``CHILD_OUTPUT``) with
  the child's text in ``message``, ``service`` (``spacetimedb``, ``caddy``) and
  ``stream``; a JSON line's own fields are kept under ``child_fields``.  One
  stable name, not ``<service>.output``: ``caddy.*`` is a namespace of our own
  events (``caddy.startup_failed``), and one name lets a query take every
  child line (``event="child.output"``) or none (``event!="child.output"``).
  Children's lines are not filtered by ``LOG_LEVEL``: a child has its own
  verbosity settings, and a line it chose to print is evidence.

``LOG_FORMAT=json`` writes one JSON object per line; ``console`` writes
``<time> <level> <service> <event or child's text> key=value…``, a multi-line
value as indented continuation lines, colour only on a terminal.

Three rules keep the log trustworthy when a child (or whoever talks to it)
is hostile:

- **Children cannot write our keys.**  The top level of a child's event holds
  only keys we set (``ts``, ``level``, ``event``, ``service``, ``stream``,
  ``pid``, ``message``); a child's own JSON fields are kept under
  ``child_fields``, and its text is only ever a ``message``, so no child line
  can pass for one of our events.
- **Redaction never hides later lines for long.**  A multi-line private key is
  hidden line by line, but the block ends at its END marker, at the first line
  that cannot be key material, or after ``MAX_KEY_LINES``; a ``BEGIN`` marker
  inside a JSON line (say, a request header in Caddy's access log) starts no
  block at all.
- **Logging never blocks or kills PID 1.**  Lines go to stdout through
  ``LogSink``: a full pipe buffers a bounded amount, a reader that is gone
  (EPIPE), a closed descriptor (EBADF) or a full disk drops lines and counts
  them, and the first loss is reported once on stderr.  A log call never
  raises.

Speed (issue 15: a child's burst must not cost PID 1 its event loop): a child
line does not go through structlog's processor chain; ``emit`` builds the
line itself, each regex runs only when a cheap substring test says it could
match, the timestamp's seconds are formatted once per second, and lines
written within one event-loop callback go out in ``PIPE_BUF`` chunks rather
than one ``write()`` each.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import re
import select
import stat
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

MAX_LINE = 16 * 1024
TRUNCATED = "…[truncated]"

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# A JWT's header is base64url of compact JSON starting with '{"', hence "eyJ".  No word boundary
# before it (``session_eyJ…``, ``%22eyJ…`` are tokens too), and every further dot-separated
# segment is taken (JWE has five; a run of tokens glued together is one match).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){2,}")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_KV_SECRET = re.compile(
    r"(?i)((?:access_|id_|refresh_|spacetimedb_|web_session_)?token|secret|password|client_secret)"
    r"([\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;]{6,})"
)
# A field whose *name* says it holds a secret: its string values are redacted whatever they look like.
_SECRET_KEY = re.compile(
    r"(?i)(?:^|[_-])(?:token|secret|password|passwd|authorization|cookie|api[_-]?key)$"
)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
# From a BEGIN marker to its END marker, or to the end of the text when there is none.
_PEM_BLOCK = re.compile(rf"{_PEM_BEGIN.pattern}.*?(?:{_PEM_END.pattern}|\Z)", re.S)
PEM_REDACTED = "-----BEGIN PRIVATE KEY----- [REDACTED]"
REDACTED = "[REDACTED]"
UNRENDERABLE = "[fields nested too deeply to show]"

# What a line inside a PEM block can be: base64 (64 columns in PEM, 70 in OpenSSH keys), the two
# RFC 1421 headers of an encrypted legacy key, or the blank line after them.
_KEY_LINE = re.compile(r"[A-Za-z0-9+/=]{1,100}|Proc-Type: [ -~]*|DEK-Info: [ -~]*|")
MAX_KEY_LINES = 400  # an RSA-16384 key is ~200 lines of 64; beyond this it is not a key we print
MAX_KEY_BYTES = 32 * 1024

_LEVELS = {
    "trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
    "error": "error", "dpanic": "critical", "panic": "critical", "fatal": "critical", "critical": "critical",
}
OUR_SERVICE = "entrypoint"
CHILD_FIELDS = "child_fields"
# Services that are our own helper processes (``python -m entrypoint oidc-check``): their JSON lines
# are our events (``oidc.verified``…), relayed with their names and fields kept as they are.
OWN_HELPERS = frozenset({"oidc"})
# Keys only we set at the top level of any event: a child's (or helper's) field with one of these
# names goes under ``child_fields``.  ``exc_info``/``stack_info`` would make structlog format an
# exception of ours.
RESERVED_KEYS = frozenset({"ts", "level", "event", "service", "stream", "pid", "exc_info", "stack_info",
                           "exception", CHILD_FIELDS})
# The one event name of every line a child prints (its text is the ``message``): children's words
# never become event names, so ``event`` in a query always means one of ours or this.
CHILD_OUTPUT = "child.output"
# LOG_LEVEL's values, as structlog's numbers; "" (unset) means info, or debug with DEBUG_MODE.
LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def redact(text: str) -> str:
    """Mask JWTs, bearer tokens, ``token=…`` pairs and private keys within ``text``.

    A private key is masked from its BEGIN marker to its END marker, or to the
    end of ``text`` when there is no END (the rest of the key follows on later
    lines, which ``LineRedactor`` hides).

    Each pattern runs only when a substring it cannot match without is
    present (most lines have none, and the regexes are most of a line's cost).
    The case-insensitive ones are pre-checked on the lower-cased text only
    when the text is ASCII: there, ``(?i)`` matching is exactly lower-case
    comparison, while in Unicode ``ſ`` matches ``s`` and ``K`` (Kelvin)
    matches ``k``, so other text always takes both regexes.
    """
    if "PRIVATE KEY-----" in text:
        text = _PEM_BLOCK.sub(PEM_REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if text.isascii():
        low = text.lower()
        bearer = "bearer" in low
        pair = "token" in low or "secret" in low or "password" in low
    else:
        bearer = pair = True
    if bearer:
        text = _BEARER.sub(_bearer_redacted, text)
    if pair:
        text = _KV_SECRET.sub(_pair_redacted, text)
    return text


def _bearer_redacted(m: re.Match[str]) -> str:
    return f"{m.group(1)} {REDACTED}"


def _pair_redacted(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2)}{REDACTED}"


def _classify_field_name(key: str) -> tuple[str, bool]:
    return redact(key), _SECRET_KEY.search(key) is not None


_cached_field_name = functools.lru_cache(maxsize=1024)(_classify_field_name)


def _field_name(key: str) -> tuple[str, bool]:
    """``key`` redacted, and whether its values are secrets.

    Memoized for short names: the same few dozen (ours, Caddy's) come back on
    every line, and each costs three regex passes; long ones (a child could
    send a new one per line) are not kept.
    """
    return _cached_field_name(key) if len(key) <= 64 else _classify_field_name(key)


def _redact_secret(value: Any) -> Any:
    if isinstance(value, str):
        return REDACTED if value else value
    if isinstance(value, list | tuple):
        return [_redact_secret(v) for v in value]
    return _redact_value(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name, secret = _field_name(key) if isinstance(key, str) else (key, False)
            out[name] = _redact_secret(item) if secret else _redact_value(item)
        return out
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = _redact_secret(value) if _field_name(key)[1] else _redact_value(value)
    return event


def _default_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("service", OUR_SERVICE)
    return event


_FIRST = ("ts", "level", "event", "service")


def _order_keys(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Put ts, level, event, service first so a human scanning JSON lines reads them in order."""
    ordered = {k: event[k] for k in _FIRST if k in event}
    ordered.update((k, v) for k, v in event.items() if k not in ordered and k != CHILD_FIELDS)
    if CHILD_FIELDS in event:  # the child's own fields last, after everything we say about the line
        ordered[CHILD_FIELDS] = event[CHILD_FIELDS]
    return ordered


def _add_ts(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["ts"] = _now_iso()
    return event


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def _now_iso() -> str:
    """Now in UTC, ``2026-12-02T21:03:04.123456Z``; the part up to the seconds is formatted once a second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    # now - whole is exact and below 1 - 2**-22 (the spacing of floats near 2**31), so below 999_999.8 µs
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


# ---------------------------------------------------------------------------
# The console format: for a person at a terminal or reading `kubectl logs`
# ---------------------------------------------------------------------------

_LEVEL_WIDTH = 7  # "warning"
_SERVICE_WIDTH = 12  # "module:pogly"
_INDENT = " " * (24 + 1 + _LEVEL_WIDTH + 1 + _SERVICE_WIDTH + 1)  # continuation lines, under the text
_RESET = "\x1b[0m"
_COLOURS = {"debug": "\x1b[2m", "info": "\x1b[32m", "warning": "\x1b[33m", "error": "\x1b[31m",
            "critical": "\x1b[1;31m"}
_DIM, _BOLD = "\x1b[2m", "\x1b[1m"
_SHOWN_ELSEWHERE = frozenset({"ts", "level", "event", "service", "message", "stream", CHILD_FIELDS})
_CHILD_HIDDEN = _SHOWN_ELSEWHERE | {"pid"}  # the child's PID is in `status`; on every line it is noise


def console_line(fields: MutableMapping[str, Any], colors: bool = False) -> str:
    """One event as a person reads it, redacted values in, newline-terminated text out.

    ``2026-12-02T21:03:04.123Z info    spacetimedb  <text>  key=value…``: time
    first (milliseconds), then level, service, and our event name (with its
    ``message``, if any) or, for a child's line, the child's text; then the
    other fields, a child's own under their names.  A value spanning lines is
    printed as lines, each continuation indented under the text column, so a
    multi-line message never looks like a line of its own.  ANSI colour only
    when ``colors`` (a terminal): levels in colour, names bold, keys dim.
    """
    ts = str(fields.get("ts", ""))
    if len(ts) == 27 and ts.endswith("Z"):  # microseconds → milliseconds
        ts = ts[:23] + "Z"
    level = str(fields.get("level", "info"))
    service = str(fields.get("service", OUR_SERVICE))
    event = str(fields.get("event", ""))
    message = fields.get("message")
    if event == CHILD_OUTPUT:
        head = str(message) if message is not None else ""
    elif message is not None and message != "":
        head = f"{_BOLD}{event}{_RESET}  {message}" if colors else f"{event}  {message}"
    else:
        head = f"{_BOLD}{event}{_RESET}" if colors else event
    parts = [head]
    hidden = _CHILD_HIDDEN if event == CHILD_OUTPUT else _SHOWN_ELSEWHERE
    for key, value in fields.items():
        if key not in hidden:
            parts.append(_pair(key, value, colors))
    children = fields.get(CHILD_FIELDS)
    if isinstance(children, dict):
        parts.extend(_pair(key, value, colors) for key, value in children.items())
    elif children is not None:
        parts.append(_pair(CHILD_FIELDS, children, colors))
    text = "  ".join(parts)
    if colors:
        lvl = f"{_COLOURS.get(level, '')}{level:<{_LEVEL_WIDTH}}{_RESET}"
        svc = f"{_DIM}{service:<{_SERVICE_WIDTH}}{_RESET}"
    else:
        lvl, svc = f"{level:<{_LEVEL_WIDTH}}", f"{service:<{_SERVICE_WIDTH}}"
    line = f"{ts} {lvl} {svc} {text}"
    lines = line.splitlines()  # every character a terminal or a viewer may break at, not only \n
    if len(lines) > 1:
        line = f"\n{_INDENT}".join(lines)
    return line + "\n"


def _pair(key: Any, value: Any, colors: bool) -> str:
    if isinstance(value, str):
        shown = value if value and ("\n" in value or not any(c in value for c in ' "=')) else _dumps(value)
    else:
        shown = _dumps(value)
    return f"{_DIM}{key}={_RESET}{shown}" if colors else f"{key}={shown}"


class _ConsoleRenderer:
    """structlog's last processor for ``LOG_FORMAT=console``: ``console_line`` without the newline."""

    def __init__(self, colors: bool) -> None:
        self.colors = colors

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> str:
        return console_line(event, self.colors)[:-1]


# ---------------------------------------------------------------------------
# The writer: never blocks, never raises
# ---------------------------------------------------------------------------

PENDING_LIMIT = 256 * 1024  # bytes held back while the reader is slow; past this, lines are dropped
BATCH_BYTES = 16 * 1024  # lines wait for the end of a loop callback until this much is pending
_PERMANENT = {errno.EPIPE, errno.EBADF, errno.EIO, errno.EINVAL, errno.ENXIO, errno.ECONNRESET}


class LogSink:
    """The file structlog writes to: whole lines, written without ever blocking or raising.

    On a pipe, FIFO, socket or terminal each write is preceded by a zero-timeout
    ``poll`` and is at most ``PIPE_BUF`` bytes, so ``write()`` cannot block even
    though the descriptor stays in blocking mode (it is shared: switching it to
    O_NONBLOCK would change it for whoever else holds it, a terminal's shell
    included).  What the reader does not take at once waits in a buffer of at
    most ``PENDING_LIMIT`` bytes and goes out with the next line; when that is
    full, new lines are dropped and counted.  A reader that is gone (EPIPE), a
    closed descriptor (EBADF) or an I/O error ends writing for good; a full
    disk drops that line.  The first loss is reported once on stderr (when
    stderr can take it), and once lines flow again a ``logs.dropped`` line
    says how many were lost.
    """

    def __init__(self, stream: TextIO, *, fmt: str = "json", pending_limit: int = PENDING_LIMIT,
                 notice_fd: int | None = 2) -> None:
        self._stream = stream
        self._fmt = fmt
        self._colors = fmt == "console" and self.isatty_of(stream)
        self._limit = pending_limit
        self._notice_fd = notice_fd
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._chunk = sys.maxsize
        self._poll: Any = None
        self.dead: str | None = None  # why writing stopped for good
        self.dropped = 0  # lines lost, in total
        self._unannounced = 0  # lines lost since the last logs.dropped line
        self._told_stderr = False
        self._scheduled: object = None  # the loop whose current callback a drain waits for
        self.fd: int | None
        try:
            self.fd = stream.fileno()
            mode = os.fstat(self.fd).st_mode
        except (AttributeError, OSError, ValueError):
            self.fd = None
            return
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # whatever the text layer buffered goes first
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
            self._chunk = select.PIPE_BUF
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLOUT)

    # -- the file interface structlog uses ---------------------------------------
    def write(self, text: str) -> int:
        try:
            self._write(text)
        except Exception:  # a log line must never take the program down
            self._lose(1, "unexpected error")
        return len(text)

    def flush(self) -> None:
        """Called by structlog after every line: nothing is buffered beyond ``pending``."""

    def isatty(self) -> bool:
        return self.isatty_of(self._stream)

    @staticmethod
    def isatty_of(stream: Any) -> bool:
        with contextlib.suppress(Exception):
            return bool(stream.isatty())
        return False

    # -- writing ------------------------------------------------------------------
    def _write(self, text: str) -> None:
        if self.fd is None:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                self._lose(1, "the log stream is closed")
            return
        data = text.encode("utf-8", errors="replace")
        with self._lock:
            if self.dead is not None:
                self._lose(1, self.dead)
                return
            if self._unannounced or len(self._pending) + len(data) > self._limit:
                self._drain()  # room for this line, or a chance to say what was lost
                if self.dead is not None:
                    self._lose(1, self.dead)
                    return
            if len(self._pending) + len(data) > self._limit:
                self._lose(1, "stdout is not being read fast enough")
                return
            if self._unannounced and not self._pending:  # lines flow again: say how many were lost
                notice = self._dropped_line()
                if len(notice) + len(data) <= self._limit:
                    self._unannounced = 0
                    data = notice + data
            self._pending += data
            if len(self._pending) >= BATCH_BYTES or not self._defer():
                self._drain()

    def _defer(self) -> bool:
        """Write what is pending when the event loop's current callback is done, if this thread runs one.

        A child's burst arrives as 64 KiB reads, hundreds of lines per
        callback: written at the end of it, they take one ``poll`` and one
        ``write()`` per ``PIPE_BUF`` instead of per line.  Without a running
        loop (the CLI, another thread) lines are written at once.
        """
        aio = sys.modules.get("asyncio")  # not imported: no loop runs (and importing it costs ~20 ms)
        if aio is None:
            return False
        try:
            loop = aio.get_running_loop()
        except RuntimeError:
            return False
        if self._scheduled is not loop:  # (a loop that closed before running our drain does not count)
            loop.call_soon(self._deferred_drain)
            self._scheduled = loop
        return True

    def _deferred_drain(self) -> None:
        try:
            with self._lock:
                self._scheduled = None
                if self.dead is None:
                    self._drain()
        except Exception:  # a log line must never take the program down
            self._lose(1, "unexpected error")

    def _drain(self, timeout: float = 0.0) -> None:
        """Write as much of ``pending`` as the reader takes now (or within ``timeout`` seconds)."""
        assert self.fd is not None
        deadline = time.monotonic() + timeout
        while self._pending and self.dead is None:
            if self._poll is not None:
                wait = max(deadline - time.monotonic(), 0.0)
                try:
                    events = self._poll.poll(int(wait * 1000))
                except InterruptedError:  # pragma: no cover - PEP 475 retries this
                    continue
                if not events:
                    return  # the reader is not taking more now
            end = self._chunk
            if len(self._pending) > end:
                # Whole lines in each write: one write() of at most PIPE_BUF bytes to a pipe is atomic, so a
                # line `owner set` writes into our stdout (containerlog.py) lands between two of ours, never
                # inside one.  Only a single line longer than PIPE_BUF is cut.
                last = self._pending.rfind(b"\n", 0, end)
                if last >= 0:
                    end = last + 1
            try:
                written = os.write(self.fd, self._pending[:end])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PERMANENT:
                    self._die(exc)
                    return
                # ENOSPC, EDQUOT, EFBIG…: the line is lost, later ones may fit
                self._lose(max(self._pending.count(b"\n"), 1), os.strerror(exc.errno or 0))
                self._pending.clear()
                return
            del self._pending[:written]

    def _die(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.dead = {errno.EPIPE: "its reader is gone (EPIPE)",
                     errno.EBADF: "it is closed (EBADF)"}.get(exc.errno or 0, f"{exc.strerror} ({name})")
        lines = max(self._pending.count(b"\n"), 1)
        self._pending.clear()
        self._lose(lines, self.dead)

    def _lose(self, lines: int, reason: str) -> None:
        self.dropped += lines
        self._unannounced += lines
        if not self._told_stderr:
            self._told_stderr = True
            self._tell_stderr(f"pogly-entrypoint: stdout does not take log lines ({reason}); dropping them and "
                              "counting them. Supervision goes on; `pogly-entrypoint status` still works.\n")

    def _tell_stderr(self, message: str) -> None:
        """One short line on stderr if it can take it right now; silent otherwise."""
        fd = self._notice_fd
        if fd is None or fd == self.fd:
            return
        data = message.encode("utf-8", "replace")[: select.PIPE_BUF]
        with contextlib.suppress(Exception):
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            events = poller.poll(0)
            if events and events[0][1] & select.POLLOUT:
                os.write(fd, data)

    def _dropped_line(self) -> bytes:
        fields = {"ts": _now_iso(), "level": "warning", "event": "logs.dropped", "service": OUR_SERVICE,
                  "lines": self._unannounced, "dropped_total": self.dropped,
                  "message": "stdout did not take these log lines (its reader was slow or gone); they are lost"}
        if self._fmt == "json":
            return (_dumps(fields) + "\n").encode()
        return console_line(fields, self._colors).encode()

    def close(self, timeout: float = 1.0) -> None:
        """Write what is still pending, waiting at most ``timeout`` seconds for the reader."""
        if self.fd is None:
            with contextlib.suppress(Exception):
                self._stream.flush()
            return
        with self._lock:
            if self.dead is None and self._pending:
                with contextlib.suppress(Exception):
                    self._drain(timeout)


_sinks: list[LogSink] = []
EXIT_FLUSH_TIMEOUT = 2.0


def flush(timeout: float = EXIT_FLUSH_TIMEOUT) -> None:
    """Before exiting: write the lines a slow reader has not taken yet, for at most ``timeout`` seconds.

    Runs at interpreter exit by itself (``atexit``); a process that leaves
    through ``os._exit`` calls it first.
    """
    deadline = time.monotonic() + timeout
    for sink in _sinks:
        sink.close(max(deadline - time.monotonic(), 0.0))


atexit.register(flush)


def resolve_level(level: str = "", debug: bool = False) -> str:
    """Our verbosity: ``LOG_LEVEL`` when set (it wins over ``DEBUG_MODE``), else debug with DEBUG_MODE, else info."""
    level = level.strip().lower()
    if level in LEVEL_NUMBERS:
        return level
    return "debug" if debug else "info"


class _Output:
    """Where and how child lines are written: what ``configure`` chose, for ``emit``'s direct path."""

    def __init__(self, fmt: str, sink: LogSink, colors: bool) -> None:
        self.fmt = fmt
        self.sink = sink
        self.colors = colors


_output: _Output | None = None


def configure(fmt: str = "auto", debug: bool = False, stream: TextIO | None = None, *, level: str = "") -> None:
    """Set up logging: JSON lines unless ``fmt`` asks for console (or ``auto`` on a TTY).

    ``level`` is ``LOG_LEVEL`` (``settings.log_level``); "" keeps the seed's
    meaning of ``debug`` (``DEBUG_MODE``): debug when true, info otherwise.
    Only our own events are filtered; children's lines never are.
    """
    global _output
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if LogSink.isatty_of(stream) else "json"
    colors = fmt == "console" and LogSink.isatty_of(stream)
    renderer: Any = structlog.processors.JSONRenderer(serializer=_dumps) if fmt == "json" else _ConsoleRenderer(colors)
    sink = LogSink(stream, fmt=fmt)
    _sinks[:] = [sink]
    _output = _Output(fmt, sink, colors)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_ts,
            _default_service,
            structlog.processors.format_exc_info,
            _redact_processor,
            _order_keys,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVEL_NUMBERS[resolve_level(level, debug)]),
        # One write() per line, newline included: print() writes the text and the newline
        # separately, which PYTHONUNBUFFERED (set in the image) turns into two syscalls, so a
        # line `pogly-entrypoint owner set` writes into our stdout could split one of ours.
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode  # built once: json.dumps builds one a call


def _dumps(obj: Any, **kwargs: Any) -> str:
    if not kwargs:
        return _encode(obj)
    kwargs.setdefault("default", str)
    return json.dumps(obj, ensure_ascii=False, **kwargs)


def get(name: str = "entrypoint") -> Any:
    return structlog.get_logger(name)


# ---------------------------------------------------------------------------
# Children's lines
# ---------------------------------------------------------------------------


class LineRedactor:
    """Per-stream redaction state: hides the lines of a multi-line private key.

    Only the state that spans lines lives here; tokens within a line are masked
    when the line is written (``emit`` for a child's, ``_redact_processor`` for ours).

    A block starts at a line with a ``BEGIN … PRIVATE KEY`` marker and no END
    (unless the line is a JSON object: a key inside JSON is on one line, and a
    marker there is more likely a request header someone sent to Caddy).  It
    ends at the END marker, at the first line that cannot be part of a PEM key
    (that line is shown), or after ``max_lines``/``max_bytes``; when lines were
    hidden, a ``logs.key_redacted`` event says how many and why the block ended.
    """

    def __init__(self, child: str | None = None, stream: str | None = None, *,
                 max_lines: int = MAX_KEY_LINES, max_bytes: int = MAX_KEY_BYTES) -> None:
        self.child = child
        self.stream = stream
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.in_key = False
        self._lines = 0
        self._bytes = 0

    def __call__(self, line: str) -> str | None:
        if self.in_key:
            end = _PEM_END.search(line)
            if end is not None:
                self._leave("end marker")
                rest = line[end.end():]
                return rest if rest.strip() else None
            stripped = line.strip()
            if _KEY_LINE.fullmatch(stripped):
                if self._lines < self.max_lines and self._bytes + len(stripped) <= self.max_bytes:
                    self._lines += 1
                    self._bytes += len(stripped)
                    return None
                self._leave(f"limit of {self.max_lines} lines / {self.max_bytes} bytes")
            else:
                self._leave("a line that is not key material")
        if "PRIVATE KEY-----" not in line:  # what _PEM_BEGIN needs, found without a regex
            return line
        begin = _PEM_BEGIN.search(line)
        if begin is None or _is_json_object(line):
            return line  # a JSON line's values are redacted one by one once it is parsed
        if _PEM_END.search(line, begin.end()) is None:
            self.in_key = True
            self._lines = self._bytes = 0
        return redact(line)

    def _leave(self, why: str) -> None:
        self.in_key = False
        if self._lines:
            (get("logs").info if why == "end marker" else get("logs").warning)(
                "logs.key_redacted", child=self.child, stream=self.stream, lines=self._lines, ended_by=why,
                message=f"{self._lines} lines of a private key printed by a child were hidden",
            )
        self._lines = self._bytes = 0


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def decode_line(raw: bytes, truncated: bool = False) -> str:
    """Bytes from a child → printable text: UTF-8 with replacement, no ANSI, bounded."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    if "\x1b" in text:  # every escape sequence starts with ESC
        text = _ANSI.sub("", text)
    if len(text) > MAX_LINE:
        text, truncated = text[:MAX_LINE], True
    return text + TRUNCATED if truncated else text


def child_event(service: str, stream: str, text: str) -> tuple[str, dict[str, Any]]:
    """Turn one child line into ``(level, fields)`` for the log.

    A child's line is ``event="child.output"`` with its text in ``message``,
    whatever the text says, so a child can never log under one of our event
    names.  JSON lines (Caddy) give the text and level: their ``msg`` (else
    ``event``/``message``) is the message, their level is mapped, and every
    other field of theirs is kept under ``child_fields`` (their ``ts`` too), so
    a child can never set a key of ours.  Plain lines (SpacetimeDB's tracing
    output) get a level guessed from the usual ``INFO``/``WARN``/``ERROR``
    markers.  Our own helper processes (``OWN_HELPERS``) are the exception:
    their JSON lines are our events, relayed with their names, their fields at
    the top level except the reserved ones.
    """
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses: plain text
            data = None
        if isinstance(data, dict):
            level = _LEVELS.get(str(data.pop("level", "info")).lower(), "info")
            # Caddy says "msg"; our own helper processes "event" (their "message" is a field).
            message = data.pop("msg", None) or data.pop("event", None) or data.pop("message", None) or ""
            if service in OWN_HELPERS:
                fields: dict[str, Any] = {"service": service, "stream": stream, "event": str(message)}
                if data.get("service") == OUR_SERVICE:  # how our helper names itself
                    data.pop("service")
                reserved = {k: data.pop(k) for k in list(data) if k in RESERVED_KEYS}
                fields.update(data)
                if reserved:
                    fields[CHILD_FIELDS] = reserved
                return level, fields
            fields = {"service": service, "stream": stream, "event": CHILD_OUTPUT, "message": str(message)}
            if data:
                fields[CHILD_FIELDS] = data
            return level, fields
    return _guess_level(text), {"service": service, "stream": stream, "event": CHILD_OUTPUT, "message": text}


_LEVEL_WORD = re.compile(r"\b(TRACE|DEBUG|INFO|WARN|WARNING|ERROR|PANIC|FATAL)\b")


# The same words without the leading \b: a pattern that starts with literals lets the regex engine skip
# ahead to their first letters, about 4x faster; each candidate is then checked with the full pattern.
_LEVEL_CANDIDATE = re.compile(r"(?:TRACE|DEBUG|INFO|WARN|WARNING|ERROR|PANIC|FATAL)\b")


def _guess_level(text: str) -> str:
    """``error`` for ``Error: …``, else the first ``INFO``/``WARN``/… word in the first 80 characters, else info.

    Exactly ``_LEVEL_WORD.search(text[:80])``: a match of it starts where a
    candidate does and ``_LEVEL_WORD`` matches there.
    """
    if text.startswith("Error:"):
        return "error"
    head = text[:80]
    pos = 0
    while (candidate := _LEVEL_CANDIDATE.search(head, pos)) is not None:
        match = _LEVEL_WORD.match(head, candidate.start())
        if match is not None:
            return _LEVELS.get(match.group(1).lower(), "info")
        pos = candidate.start() + 1
    return "info"


def emit(level: str, fields: dict[str, Any]) -> None:
    """Log a child event produced by ``child_event``; never raises.

    A child's line (``child.output``) is built and written here, not by
    structlog's processor chain: the same keys in the same order, the same
    redaction (``message`` and every field by ``_redact_value``, a field
    named like a secret by ``_redact_secret``), at a fraction of the cost,
    and not filtered by ``LOG_LEVEL``.  Our helpers' events go through
    structlog like ours.
    """
    output = _output
    if fields.get("event") != CHILD_OUTPUT or output is None:
        fields = dict(fields)
        event = fields.pop("event")
        getattr(structlog.get_logger(fields.get("service", "child")), level)(event, **fields)
        return
    try:
        text = _plain_child_json(level, fields) if output.fmt == "json" else None
        if text is None:
            line = _child_line(level, fields)
            text = _child_json(line) if output.fmt == "json" else console_line(line, output.colors)
    except Exception:  # nested too deeply to redact or render: the line without its fields, never an exception
        line = {"ts": _now_iso(), "level": level, "event": CHILD_OUTPUT, "service": str(fields.get("service")),
                "stream": str(fields.get("stream")), "message": redact(str(fields.get("message", ""))),
                CHILD_FIELDS: UNRENDERABLE}
        text = _dumps(line) + "\n" if output.fmt == "json" else console_line(line, output.colors)
    output.sink.write(text)


def _child_line(level: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A child's line as the dict we write: our keys in our order, every value of the child's redacted."""
    line: dict[str, Any] = {"ts": _now_iso(), "level": level, "event": CHILD_OUTPUT,
                            "service": fields.get("service", "child")}
    known = 2  # "event", "service"
    for key in _OUR_VALUES:  # values we set ourselves: the stream's name, the child's PID
        if key in fields:
            line[key] = fields[key]
            known += 1
    message = fields.get("message")
    if isinstance(message, str):
        line["message"] = redact(message)
        known += 1
    children = fields.get(CHILD_FIELDS)
    if len(fields) > known + (CHILD_FIELDS in fields):  # anything else someone added: redacted by its name
        for key, value in fields.items():
            if key in _RELAY_KEYS or key in _OUR_VALUES or (key == "message" and isinstance(value, str)):
                continue
            name, secret = _field_name(key)
            line[name] = _redact_secret(value) if secret else _redact_value(value)
    if children is not None:
        line[CHILD_FIELDS] = _redact_value(children)
    return line


def _plain_child_json(level: str, fields: dict[str, Any]) -> str | None:
    """``_child_json(_child_line(level, fields))`` for the usual plain line (``service``, ``stream``, ``pid``,
    ``message`` and nothing else), written straight into one f-string; None for any other line."""
    if len(fields) != 5:  # the four and "event"
        return None
    service, stream = fields.get("service"), fields.get("stream")
    pid, message = fields.get("pid"), fields.get("message")
    if type(service) is not str or type(stream) is not str or type(pid) is not int or type(message) is not str:
        return None
    return (f'{{"ts": "{_now_iso()}", "level": {_encode_str(level)}, "event": "{CHILD_OUTPUT}", '
            f'"service": {_encode_str(service)}, "stream": {_encode_str(stream)}, "pid": {pid}, '
            f'"message": {_encode_str(redact(message))}}}\n')


def _child_json(line: dict[str, Any]) -> str:
    """``_dumps(line) + "\\n"``, the same text, a few µs sooner: strings and ints written directly.

    ``encode_basestring`` is the C function ``json.dumps(ensure_ascii=False)``
    itself uses for every string; anything else goes through ``_dumps``.
    """
    parts = []
    for key, value in line.items():
        kind = type(value)
        shown = _encode_str(value) if kind is str else str(value) if kind is int else _dumps(value)
        parts.append(f"{_encode_str(key)}: {shown}")
    return "{" + ", ".join(parts) + "}\n"


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
_RELAY_KEYS = frozenset({"ts", "level", "event", "service", CHILD_FIELDS})
_OUR_VALUES = ("stream", "pid")
