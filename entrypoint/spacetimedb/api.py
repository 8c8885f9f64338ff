"""Talking to SpacetimeDB's HTTP API: timeouts, retries with capped backoff, errors, refusals.

Shared by everything that runs once the server answers ``/v1/ping``
(identity, publish, SQL, module logs).  Each takes an injected
``localhttp.AsyncClient`` (``base_url`` = ``settings.spacetime_addr.url``) so
tests can drive it with a scripted transport or the stand-in; it is our own
small client on h11, not httpx, so PID 1 carries no TLS stack (issue 15,
``entrypoint/localhttp.py``).  Retries draw their pauses from the one backoff,
``supervision.restart.delays``.

Also here, because more than one caller must recognise it: "you do not own
this database" in every shape SpacetimeDB has used (a 1.7 publish refusal is
a 500, which must *not* be retried like other 5xx), and who owns a database
according to the database-info route.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from entrypoint import logs
from entrypoint.errors import EXIT_UNAVAILABLE, Fatal
from entrypoint.localhttp import Timeout, TransportError
from entrypoint.supervision.restart import delays

if TYPE_CHECKING:
    from entrypoint.localhttp import AsyncClient, Response

log = logs.get("stdbhttp")

# Explicit per-request timeouts (seconds).  Publishing compiles the module on
# the server, which can take a while for a large wasm on a small node.
REQUEST_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 180.0


# ---------------------------------------------------------------------------
# Errors and retry policy
# ---------------------------------------------------------------------------


class SpacetimeError(Exception):
    """SpacetimeDB answered with an error; ``status`` and the server's own ``text``."""

    def __init__(self, message: str, status: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.text = text


class SpacetimeUnavailable(SpacetimeError):
    """SpacetimeDB could not be reached, or kept failing, until the retry deadline."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``initial`` doubling up to ``maximum``, for at most ``deadline`` s."""

    initial: float = 0.2
    maximum: float = 5.0
    deadline: float = 60.0

    def pauses(self) -> Iterator[float]:
        """The pauses between attempts, from the one backoff."""
        return delays(self.initial, self.maximum)


DEFAULT_BACKOFF = Backoff()
LOG_BACKOFF = Backoff(initial=0.2, maximum=10.0, deadline=float("inf"))


def body_text(response: Response, limit: int = 2000) -> str:
    """The server's own words, trimmed and capped: they go into logs and operator messages."""
    try:
        text = response.text
    except Exception:  # undecodable or not read: the status still tells the story
        return ""
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


def _retryable(response: Response) -> bool:
    """5xx means "try again", except the 1.7 permission refusal, which is final."""
    return response.status_code >= 500 and parse_ownership_error(response.status_code,
                                                                 body_text(response)) is None


async def request_with_retry(
    client: AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    backoff: Backoff,
    timeout: float = REQUEST_TIMEOUT,
    **kwargs: Any,
) -> Response:
    """One HTTP call, retried on connection errors and transient 5xx with capped backoff.

    Returns the first non-retryable response (success or a definite error);
    raises ``SpacetimeUnavailable`` once an attempt fails after
    ``backoff.deadline`` has passed.
    """
    started = time.monotonic()
    pauses = backoff.pauses()
    for attempt in itertools.count(1):
        try:
            response = await client.request(
                method, url, timeout=Timeout(timeout, connect=CONNECT_TIMEOUT), **kwargs
            )
        except TransportError as exc:
            failure, status, text = describe_error(exc), None, ""
        else:
            if not _retryable(response):
                return response
            failure, status, text = f"HTTP {response.status_code}", response.status_code, body_text(response)
        if time.monotonic() - started >= backoff.deadline:
            if status is None:
                raise SpacetimeUnavailable(f"{what}: SpacetimeDB at {client.base_url} unreachable for "
                                           f"{backoff.deadline:g} s: {failure}")
            raise SpacetimeUnavailable(f"{what}: SpacetimeDB kept failing for {backoff.deadline:g} s: "
                                       f"{failure}: {text}", status, text)
        pause = next(pauses)
        log.warning("spacetime.retrying", what=what, attempt=attempt, error=f"{failure} {text}".strip(),
                    next_in_s=round(pause, 2))
        await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover: count() never ends


def describe_error(exc: BaseException | None) -> str:
    """``Type: message`` (or just ``Type``): an exception's ``str()`` may be empty."""
    if exc is None:
        return ""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def request_or_fatal(client: AsyncClient, method: str, url: str, *, what: str, backoff: Backoff,
                           **kwargs: Any) -> Response:
    """``request_with_retry`` whose exhaustion is a ``Fatal(69)``: SpacetimeDB is a hard dependency."""
    try:
        return await request_with_retry(client, method, url, what=what, backoff=backoff, **kwargs)
    except SpacetimeUnavailable as exc:
        raise Fatal(EXIT_UNAVAILABLE, str(exc), event="spacetime.unavailable", what=what) from None


# ---------------------------------------------------------------------------
# Ownership-error shapes (1.7 and 1.9+)
# ---------------------------------------------------------------------------

_HEX = r"(?:0x)?([0-9a-fA-F]{16,64})"
_NOT_OWNER_17_PRE = re.compile(rf"Identity does not own database, expected: {_HEX} got: {_HEX}")
_NOT_OWNER_17_PUT = re.compile(rf"Permission denied: `?{_HEX}`? does not own database `?{_HEX}`?")
_NOT_OWNER_19 = re.compile(rf"{_HEX} is not authorized to perform action(?: on database {_HEX})?: ?(.*)")


@dataclass(frozen=True)
class NotOwner:
    """A refusal because the caller does not own the database, parsed from either version's text."""

    caller: str | None
    owner: str | None
    database: str | None
    action: str | None
    text: str


def parse_ownership_error(status: int, text: str) -> NotOwner | None:
    """Recognise "you do not own this database" in every shape SpacetimeDB has used.

    * 1.7/1.8 ``pre_publish`` (401) and ``logs`` (400): ``Identity does not own
      database, expected: <owner> got: <caller>`` — the only shape naming the owner.
    * 1.7/1.8 ``PUT`` publish (500): ``Permission denied: `<caller>` does not own
      database `<16-hex prefix>```.
    * 1.9+ (403): ``<caller> is not authorized to perform action on database <db>: <action>``.
    """
    text = text.strip()
    if status in (400, 401):
        match = _NOT_OWNER_17_PRE.search(text)
        if match:
            return NotOwner(match.group(2).lower(), match.group(1).lower(), None, None, text)
    if status == 500:
        match = _NOT_OWNER_17_PUT.search(text)
        if match:
            return NotOwner(match.group(1).lower(), None, match.group(2).lower(), None, text)
    if status == 403:
        match = _NOT_OWNER_19.search(text)
        if match:
            database = match.group(2).lower() if match.group(2) else None
            return NotOwner(match.group(1).lower(), None, database, match.group(3) or None, text)
    return None


# ---------------------------------------------------------------------------
# Who owns a database
# ---------------------------------------------------------------------------


def identity_from_json(value: Any) -> str | None:
    """An identity from any JSON shape the API uses: ``"c200…"``, ``"0x…"``, ``{"__identity__": …}``, ``[…]``."""
    from entrypoint.spacetimedb.identity import normalize_hex

    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[:2] in ("0x", "0X"):
        text = "0x" + text[2:].rjust(64, "0")
    try:
        return normalize_hex(text)
    except ValueError:
        return None


async def database_owner(client: AsyncClient, module: str,
                         headers: Mapping[str, str] | None = None) -> str | None:
    """The owner from ``GET /v1/database/<name>``, or None when the server does not say.

    ``headers`` carry the caller's token when there is one; the route also
    answers anonymous callers, which is all an error message needs.
    """
    response = await client.get(f"/v1/database/{module}", headers=headers,
                                timeout=Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT))
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return identity_from_json(data.get("owner_identity")) if isinstance(data, dict) else None


__all__ = [
    "CONNECT_TIMEOUT", "DEFAULT_BACKOFF", "LOG_BACKOFF", "PUBLISH_TIMEOUT", "REQUEST_TIMEOUT", "Backoff",
    "NotOwner", "SpacetimeError", "SpacetimeUnavailable", "body_text", "database_owner", "describe_error",
    "identity_from_json", "parse_ownership_error", "request_or_fatal", "request_with_retry",
]
