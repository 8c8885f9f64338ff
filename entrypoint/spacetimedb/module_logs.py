"""A module's own log, copied into ours: one event per line, ``service=module:<name>``.

Follows ``GET /v1/database/<name>/logs?follow=true`` (owner only) for as long
as the container runs, so ``kubectl logs`` shows what the Pogly module says
next to what SpacetimeDB and Caddy say.  SpacetimeDB restarts cut the stream;
the follower reconnects with pauses from the one backoff (``delays()``) and
never takes the supervisor down with it.

A ``LogListener`` hears every line too (and each time the stream is
(re)opened): the ownership watcher uses that to look for a new owner when
someone connects instead of polling SQL every few seconds.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Protocol

from entrypoint import logs
from entrypoint.localhttp import HTTPError, Timeout
from entrypoint.spacetimedb.api import (
    CONNECT_TIMEOUT,
    LOG_BACKOFF,
    REQUEST_TIMEOUT,
    Backoff,
    body_text,
    describe_error,
    parse_ownership_error,
)

if TYPE_CHECKING:
    from entrypoint.config import Settings
    from entrypoint.localhttp import AsyncClient
    from entrypoint.spacetimedb.credentials import Publisher

log = logs.get("modulelogs")

_MODULE_LEVELS = {
    "error": "error", "panic": "error", "warn": "warning", "warning": "warning",
    "info": "info", "debug": "debug", "trace": "debug",
}


class LogListener(Protocol):
    """Told what the follower sees (``ownership.ConnectionBell`` is the one in use)."""

    def following(self) -> None:
        """The stream is open (again): lines written while it was not are never replayed."""

    def line(self, message: str, fields: dict[str, Any]) -> None:
        """One module-log line, as ``module_log_event`` parsed it (after it was logged)."""


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


def emit_module_log(module: str, line: str, listener: LogListener | None = None) -> None:
    """Log one module line at the module's own level, under its own ``service``; then tell ``listener``."""
    level, message, fields = module_log_event(module, line)
    getattr(logs.get(fields["service"]), level)(message, **fields)
    if listener is not None:
        listener.line(message, fields)


async def follow_module_logs(settings: Settings, client: AsyncClient, publisher: Publisher, module: str,
                             *, stop: asyncio.Event | None = None, backoff: Backoff = LOG_BACKOFF,
                             listener: LogListener | None = None) -> None:
    """Copy a module's own log into ours, as events with ``service=module:<name>``, until stopped.

    Follows ``GET /v1/database/<name>/logs?follow=true`` (owner only) and
    reconnects with capped backoff whenever SpacetimeDB restarts.  Never
    raises except ``CancelledError``; returns when ``stop`` is set.
    ``listener`` hears each line and each (re)connection.
    """
    del settings  # part of the uniform signature; the client already knows where SpacetimeDB is
    if stop is None:
        await _follow(client, publisher, module, backoff, listener)
        return
    follower = asyncio.create_task(_follow(client, publisher, module, backoff, listener), name=f"logs:{module}")
    stopper = asyncio.create_task(stop.wait(), name=f"logs-stop:{module}")
    try:
        await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        follower.cancel()
        stopper.cancel()
        await asyncio.gather(follower, stopper, return_exceptions=True)


async def _follow(client: AsyncClient, publisher: Publisher, module: str, backoff: Backoff,
                  listener: LogListener | None) -> None:
    pauses = backoff.pauses()
    connected_before = False
    quiet = False  # after the first failure in a row, further ones go to debug
    denied_warned = False
    while True:
        problem: dict[str, Any] | None = None
        try:
            async with client.stream(
                "GET", f"/v1/database/{module}/logs", params={"num_lines": "0", "follow": "true"},
                headers=publisher.headers,
                # REQUEST_TIMEOUT bounds the exchange up to the response head; the body (the log) has no deadline.
                timeout=Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            ) as response:
                if response.status_code == 200:
                    log.info("module_logs.following", module=module, reconnect=connected_before)
                    connected_before, quiet, denied_warned = True, False, False
                    pauses = backoff.pauses()  # connected: the next outage starts again from the first pause
                    if listener is not None:
                        listener.following()
                    async for line in response.aiter_lines():
                        if line.strip():
                            emit_module_log(module, line, listener)
                    problem = {"reason": "stream ended"}
                else:
                    await response.aread()
                    text = body_text(response)
                    refusal = parse_ownership_error(response.status_code, text)
                    problem = {"status": response.status_code, "server_message": text}
                    if refusal is not None or response.status_code in (401, 403):
                        if not denied_warned:
                            log.warning("module_logs.denied", module=module, **problem,
                                        message="only the database owner may read its logs; retrying")
                        denied_warned = quiet = True
                        problem = None
        except HTTPError as exc:
            problem = {"error": describe_error(exc)}
        except Exception as exc:  # never let a log follower take the supervisor down
            problem = {"error": describe_error(exc)}
        pause = next(pauses)
        if problem is not None:
            (log.debug if quiet else log.info)("module_logs.disconnected", module=module, retry_in_s=pause,
                                               **problem)
            quiet = True
        await asyncio.sleep(pause)


__all__ = ["LogListener", "emit_module_log", "follow_module_logs", "module_log_event"]
