"""Bounded HTTP for the provider check: timeouts, a size cap, hand-followed redirects, retries.

Why bounded: the check runs against a URL an operator typed, and whatever
answers there (a login page, a proxy's error page, a video, a server that
never answers) must cost a few seconds and a megabyte at most, then give a
message naming the fix.

Transient failures (connection errors, timeouts, 5xx, 408, 429) are retried by
:func:`retrying` with pauses from the program's one backoff
(``entrypoint.supervision.restart.delays``), at least the server's
``Retry-After``, until the deadline; everything else fails at once as an
``OidcConfigError``, because retrying a 404 or a wrong issuer only delays the
message the operator needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx

from entrypoint.config import Settings
from entrypoint.oidc.errors import OidcConfigError
from entrypoint.oidc.rules import ISSUER_SHAPES, transport_problem
from entrypoint.supervision.restart import delays

T = TypeVar("T")

#: Largest discovery document or JWKS accepted.  Real ones are a few KiB; the
#: cap keeps a misrouted request (a video, a log dump) from eating memory.
MAX_BODY_BYTES = 1024 * 1024
MAX_REDIRECTS = 3
#: Per-request limits, each lowered to what is left before the deadline.  The
#: total is a backstop for a server that drips bytes slower than the read
#: timeout; it fires a little after httpx's own timeouts on purpose, because
#: httpx closes the socket on its timeouts but not always when cancelled
#: mid-TLS-handshake.
REQUEST_TIMEOUT = httpx.Timeout(connect=5.0, read=10.0, write=5.0, pool=5.0)
REQUEST_TOTAL_S = 15.0
BACKSTOP_GRACE_S = 0.5
#: The last attempt before the deadline gets at least this long to run.
MIN_ATTEMPT_S = 0.25
#: Pauses between attempts: 0.5 s, 1 s, 2 s … capped at 10 s, each stretched by up to 50 %.
RETRY_FIRST_S = 0.5
RETRY_CAP_S = 10.0
RETRY_JITTER = 0.5


class Transient(Exception):
    """A failure worth retrying, with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Exhausted(Exception):
    """Transient failures until the deadline: ``attempts`` made, ``last`` the final one."""

    def __init__(self, attempts: int, last: Transient) -> None:
        super().__init__(str(last))
        self.attempts = attempts
        self.last = last


OnRetry = Callable[[int, Transient, float], None]  # (attempt that failed, its failure, pause before the next)


async def retrying(
    attempt: Callable[[int], Awaitable[T]],
    *,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[Any]],
    on_retry: OnRetry,
) -> T:
    """``attempt(1)``, ``attempt(2)`` … until one returns; ``Transient`` failures are retried.

    Another attempt starts only while at least ``MIN_ATTEMPT_S`` remains before
    ``deadline`` (on ``clock``); then ``Exhausted`` is raised.  Any other
    exception ends the retries at once.
    """
    pauses = delays(RETRY_FIRST_S, RETRY_CAP_S, jitter=RETRY_JITTER)
    number = 0
    while True:
        number += 1
        try:
            return await attempt(number)
        except Transient as exc:
            left = deadline - clock() - MIN_ATTEMPT_S
            if left <= 0:
                raise Exhausted(number, exc) from exc
            pause = next(pauses)
            if exc.retry_after is not None:
                pause = max(pause, exc.retry_after)
            pause = min(pause, left)
            on_retry(number, exc, pause)
            await sleep(pause)


@asynccontextmanager
async def client_scope(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client (a shared pool), or one of our own for this check, closed after it."""
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT,
        follow_redirects=False,
        headers={"User-Agent": "pogly-entrypoint (OIDC discovery check)"},
    ) as own:
        yield own


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    return None


async def get_json(
    http: httpx.AsyncClient,
    url: str,
    what: str,
    settings: Settings,
    deadline: float,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """GET ``url`` and return its JSON object, enforcing every request limit.

    Redirects are followed by hand so each hop gets the same https rule and the
    hop count is ours; the body is streamed and abandoned past the size cap, so
    a huge answer costs at most ``MAX_BODY_BYTES`` of memory.
    """
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        remaining = max(MIN_ATTEMPT_S, min(REQUEST_TOTAL_S, deadline - clock()))
        timeout = httpx.Timeout(
            connect=min(REQUEST_TIMEOUT.connect or remaining, remaining),
            read=min(REQUEST_TIMEOUT.read or remaining, remaining),
            write=min(REQUEST_TIMEOUT.write or remaining, remaining),
            pool=min(REQUEST_TIMEOUT.pool or remaining, remaining),
        )
        try:
            async with asyncio.timeout(remaining + BACKSTOP_GRACE_S):
                request = http.build_request(
                    "GET", current, headers={"Accept": "application/json"}, timeout=timeout
                )
                response = await http.send(request, stream=True, follow_redirects=False)
                try:
                    if response.is_redirect:  # a 3xx with a Location; one without is an error below
                        target = str(httpx.URL(current).join(response.headers["location"]))
                        problem = transport_problem(target, settings)
                        if problem:
                            raise OidcConfigError(
                                f"the {what} at {current} redirects to {target}, which {problem}",
                                reason="insecure_transport", value=settings.oidc_issuer, url=current,
                            )
                        current = target
                        continue
                    _check_status(response, current, what, settings)
                    body = await _read_capped(response, current, what, settings)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise Transient(f"the {what} at {current}: no complete answer within {remaining:.1f} s") from exc
        except httpx.TransportError as exc:
            reason = str(exc) or "connection failed"
            raise Transient(f"the {what} at {current}: {type(exc).__name__}: {reason}") from exc
        except (httpx.InvalidURL, httpx.DecodingError) as exc:
            raise OidcConfigError(
                f"the {what} at {current} cannot be fetched: {exc}", reason="http_status",
                value=settings.oidc_issuer, url=current,
            ) from None
        return _parse_object(body, response, current, what, settings)
    raise OidcConfigError(
        f"the {what} at {url}: more than {MAX_REDIRECTS} redirects (a redirect loop?), last to {current}",
        reason="too_many_redirects", value=settings.oidc_issuer, url=url,
        fix="point OIDC_ISSUER at the provider's real issuer, not at a URL that redirects",
    )


def _check_status(response: httpx.Response, url: str, what: str, settings: Settings) -> None:
    status = response.status_code
    if status == 200:
        return
    if status >= 500 or status in (408, 429):
        raise Transient(f"the {what} at {url}: HTTP {status}", retry_after=_retry_after(response))
    fix = None
    if status == 404 and what == "discovery document":
        fix = f"check the issuer's path; it must be exactly what the provider reports ({ISSUER_SHAPES})"
    elif status in (401, 403):
        fix = "discovery must be public: check the provider's or a proxy's access rules"
    raise OidcConfigError(
        f"the {what} at {url} answered HTTP {status} (expected 200)",
        reason="http_status", value=settings.oidc_issuer, url=url, fix=fix,
    )


async def _read_capped(response: httpx.Response, url: str, what: str, settings: Settings) -> bytes:
    def too_large(size: str) -> OidcConfigError:
        return OidcConfigError(
            f"the {what} at {url} is {size}, over the {MAX_BODY_BYTES // 1024} KiB limit; this is not an "
            "OpenID Provider's answer", reason="too_large", value=settings.oidc_issuer, url=url,
            fix=f"check OIDC_ISSUER points at the provider ({ISSUER_SHAPES})",
        )

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large(f"{int(declared)} bytes (Content-Length)")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise too_large(f"more than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_object(body: bytes, response: httpx.Response, url: str, what: str, settings: Settings) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        ctype = response.headers.get("content-type", "no Content-Type")
        raise OidcConfigError(
            f"the {what} at {url} is not JSON ({ctype}); a login page or a proxy's error page answered "
            "instead of the provider", reason="not_json", value=settings.oidc_issuer, url=url,
            fix=f"check OIDC_ISSUER ({ISSUER_SHAPES})",
        ) from None
    if not isinstance(data, dict):
        raise OidcConfigError(
            f"the {what} at {url} is JSON but not an object", reason="not_json",
            value=settings.oidc_issuer, url=url,
        )
    return data
