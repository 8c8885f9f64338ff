"""Structured logs for us and our children, with secrets redacted.

Everything the container prints goes through here so that one redaction pass
covers our own events and every line a child writes: a JWT in a SpacetimeDB
debug line or a bearer token in a Caddy access log must never reach the log
collector.  Child output becomes events with ``service`` and ``stream`` so a
log query can select one child, as supervisord and circus never allowed.

Three rules keep the log trustworthy when a child (or whoever talks to it)
is hostile:

- **Children cannot write our keys.**  The top level of a child's event holds
  only keys we set (``ts``, ``level``, ``event``, ``service``, ``stream``,
  ``pid``); a child's own JSON fields are kept under ``child_fields``, and an
  event name shaped like ours (``entrypoint.exit``) is prefixed with the
  child's service, so no child line can pass for one of our events.
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
# The shape of our event names (``entrypoint.exit``, ``child.started``): a child's message with
# this shape is prefixed with its service, so it can never be taken for one of ours.
_EVENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+")


def redact(text: str) -> str:
    """Mask JWTs, bearer tokens, ``token=…`` pairs and private keys within ``text``.

    A private key is masked from its BEGIN marker to its END marker, or to the
    end of ``text`` when there is no END (the rest of the key follows on later
    lines, which ``LineRedactor`` hides).
    """
    if "PRIVATE KEY-----" in text:
        text = _PEM_BLOCK.sub(PEM_REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _KV_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


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


# ---------------------------------------------------------------------------
# The writer: never blocks, never raises
# ---------------------------------------------------------------------------

PENDING_LIMIT = 256 * 1024  # bytes held back while the reader is slow; past this, lines are dropped
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
        with contextlib.suppress(Exception):
            return bool(self._stream.isatty())
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
            self._drain()
            if self.dead is not None:
                self._lose(1, self.dead)
                return
            if self._pending:
                if len(self._pending) + len(data) > self._limit:
                    self._lose(1, "stdout is not being read fast enough")
                else:
                    self._pending += data
                return
            if self._unannounced:
                notice = self._dropped_line()
                if len(notice) + len(data) <= self._limit:
                    self._unannounced = 0
                    data = notice + data
            self._pending += data
            self._drain()

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
            try:
                written = os.write(self.fd, self._pending[: self._chunk])
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
        return f"{fields['ts']} [warning  ] logs.dropped lines={self._unannounced}\n".encode()

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


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


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


def configure(fmt: str = "auto", debug: bool = False, stream: TextIO | None = None) -> None:
    """Set up structlog: JSON lines unless ``fmt`` asks for console (or auto on a TTY)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    sink = LogSink(stream, fmt=fmt)
    _sinks[:] = [sink]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _default_service,
            structlog.processors.format_exc_info,
            _redact_processor,
            _order_keys,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10 if debug else 20),
        # One write() per line, newline included: print() writes the text and the newline
        # separately, which PYTHONUNBUFFERED (set in the image) turns into two syscalls, so a
        # line `pogly-entrypoint owner set` writes into our stdout could split one of ours.
        logger_factory=structlog.WriteLoggerFactory(file=sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _dumps(obj: Any, **kwargs: Any) -> str:
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
    by ``_redact_processor``, which every event (ours and children's) passes.

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
    except ValueError:
        return False


def decode_line(raw: bytes, truncated: bool = False) -> str:
    """Bytes from a child → printable text: UTF-8 with replacement, no ANSI, bounded."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    text = _ANSI.sub("", text)
    if len(text) > MAX_LINE:
        text, truncated = text[:MAX_LINE], True
    return text + TRUNCATED if truncated else text


def _child_event_name(service: str, message: str) -> str:
    """A child's message as an event name that can never be one of ours."""
    if service in OWN_HELPERS or not _EVENT_NAME.fullmatch(message):
        return message
    return f"{service}: {message}"


def child_event(service: str, stream: str, text: str) -> tuple[str, dict[str, Any]]:
    """Turn one child line into ``(level, fields)`` for the log.

    JSON lines (Caddy) give the event and level: their ``msg`` (else
    ``event``/``message``) becomes the event, their level is mapped, and every
    other field of theirs is kept under ``child_fields`` (their ``ts`` too), so
    a child can never set a key of ours.  Our own helper processes
    (``OWN_HELPERS``) are relayed as our events: their fields stay at the top
    level, except the reserved ones.  Plain lines (SpacetimeDB's tracing
    output) get a level guessed from the usual ``INFO``/``WARN``/``ERROR``
    markers.  Either way, a message shaped like one of our event names is
    prefixed with the service (``caddy: entrypoint.exit``).
    """
    fields: dict[str, Any] = {"service": service, "stream": stream}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            level = _LEVELS.get(str(data.pop("level", "info")).lower(), "info")
            # Caddy says "msg"; our own helper processes "event" (their "message" is a field).
            message = data.pop("msg", None) or data.pop("event", None) or data.pop("message", None) or ""
            if service in OWN_HELPERS:
                if data.get("service") == OUR_SERVICE:  # how our helper names itself
                    data.pop("service")
                reserved = {k: data.pop(k) for k in list(data) if k in RESERVED_KEYS}
                fields.update(data)
                if reserved:
                    fields[CHILD_FIELDS] = reserved
            elif data:
                fields[CHILD_FIELDS] = data
            fields["event"] = _child_event_name(service, str(message))
            return level, fields
    fields["event"] = _child_event_name(service, text)
    return _guess_level(text), fields


_LEVEL_WORD = re.compile(r"\b(TRACE|DEBUG|INFO|WARN|WARNING|ERROR|PANIC|FATAL)\b")


def _guess_level(text: str) -> str:
    if text.startswith("Error:"):
        return "error"
    match = _LEVEL_WORD.search(text[:80])
    return _LEVELS.get(match.group(1).lower(), "info") if match else "info"


def emit(level: str, fields: dict[str, Any]) -> None:
    """Log a child event produced by ``child_event``."""
    fields = dict(fields)
    event = fields.pop("event")
    getattr(structlog.get_logger(fields.get("service", "child")), level)(event, **fields)
