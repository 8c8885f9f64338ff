"""Structured logs for us and our children, with secrets redacted.

Everything the container prints goes through here so that one redaction pass
covers our own events and every line a child writes: a JWT in a SpacetimeDB
debug line or a bearer token in a Caddy access log must never reach the log
collector.  Child output becomes events with ``service`` and ``stream`` so a
log query can select one child, as supervisord and circus never allowed.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

MAX_LINE = 16 * 1024
TRUNCATED = "…[truncated]"

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_KV_SECRET = re.compile(
    r"(?i)((?:access_|id_|refresh_|spacetimedb_|web_session_)?token|secret|password|client_secret)"
    r"(\"?\s*[:=]\s*\"?)([^\s\"&,;]{6,})"
)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")
REDACTED = "[REDACTED]"

_LEVELS = {
    "trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
    "error": "error", "dpanic": "critical", "panic": "critical", "fatal": "critical", "critical": "critical",
}
_OUR_KEYS = {"ts", "level", "event", "service", "stream", "pid"}


def redact(text: str) -> str:
    """Mask JWTs, bearer tokens, ``token=…`` pairs and single-line private keys."""
    if _PEM_BEGIN.search(text):
        text = _PEM_BEGIN.sub("-----BEGIN PRIVATE KEY----- " + REDACTED, text.split("-----END")[0])
    text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _KV_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        event[key] = _redact_value(value)
    return event


def _default_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("service", "entrypoint")
    return event


_FIRST = ("ts", "level", "event", "service")


def _order_keys(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Put ts, level, event, service first so a human scanning JSON lines reads them in order."""
    ordered = {k: event[k] for k in _FIRST if k in event}
    ordered.update((k, v) for k, v in event.items() if k not in ordered)
    return ordered


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
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _dumps(obj: Any, **kwargs: Any) -> str:
    kwargs.setdefault("default", str)
    return json.dumps(obj, ensure_ascii=False, **kwargs)


def get(name: str = "entrypoint") -> Any:
    return structlog.get_logger(name)


class LineRedactor:
    """Per-stream redaction state: hides every line of a multi-line private key.

    Only the state that spans lines lives here; tokens within a line are masked
    by ``_redact_processor``, which every event (ours and children's) passes.
    """

    def __init__(self) -> None:
        self.in_key = False

    def __call__(self, line: str) -> str | None:
        if self.in_key:
            if _PEM_END.search(line):
                self.in_key = False
            return None
        if _PEM_BEGIN.search(line) and not _PEM_END.search(line):
            self.in_key = True
            return f"-----BEGIN PRIVATE KEY----- {REDACTED} (multi-line key hidden)"
        return line


def decode_line(raw: bytes, truncated: bool = False) -> str:
    """Bytes from a child → printable text: UTF-8 with replacement, no ANSI, bounded."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    text = _ANSI.sub("", text)
    if len(text) > MAX_LINE:
        text, truncated = text[:MAX_LINE], True
    return text + TRUNCATED if truncated else text


def child_event(service: str, stream: str, text: str) -> tuple[str, dict[str, Any]]:
    """Turn one child line into ``(level, fields)`` for the log.

    JSON lines (Caddy) are merged: their ``msg`` becomes the event, their level
    is mapped, and their own fields are kept unless they collide with ours.
    Plain lines (SpacetimeDB's tracing output) get a level guessed from the
    usual ``INFO``/``WARN``/``ERROR`` markers.
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
            if data.get("service") == "entrypoint":  # one of our own helper processes
                data.pop("service")
            if "ts" in data:
                fields["child_ts"] = data.pop("ts")
            for key, value in data.items():
                fields[f"{service}_{key}" if key in _OUR_KEYS else key] = value
            fields["event"] = str(message)
            return level, fields
    fields["event"] = text
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
