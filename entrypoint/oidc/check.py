"""Validate the OpenID provider before anyone tries to sign in: the check and its report.

Why at startup: a wrong ``OIDC_ISSUER`` (a missing trailing slash, a provider
that only signs with HS256, a typo in the realm) otherwise shows up much later
as a browser stuck in a redirect loop or as SpacetimeDB answering 401 to every
signed-in user, with nothing in the container logs pointing at the cause.
Checking Discovery and the JWKS once, the way the browser and SpacetimeDB will
use them, turns that into one clear message naming the variable and the fix.

One check (:func:`check_provider`) fetches the discovery document at
``OIDC_ISSUER`` without its final ``/`` + ``/.well-known/openid-configuration``
and then its JWKS (``fetch``: bounded, retried until
``OIDC_DISCOVERY_TIMEOUT``), applies ``rules`` to both, and returns a
:class:`ProviderReport`.  Two callers: the ``oidc-check`` helper process that
``run`` starts (``verdict.py``), which prints the report as JSON on stdout,
and the ``check`` command, which prints the issuer, the notes and the
redirect URIs to register (:func:`redirect_uris`, :func:`redirect_uris_note`).

Logging: only ``issuer`` and ``client_id`` come from the settings; no other
setting is ever logged here.  Events: ``oidc.check`` (a check starts),
``oidc.retry`` (a transient failure, with the wait before the next attempt),
``oidc.verified`` (success).  Permanent and deadline failures are *raised*,
not logged, so the caller logs them once next to the exit code or the status
change it decides on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import structlog
from authlib.oidc.discovery import get_well_known_url

from entrypoint.config import Settings
from entrypoint.oidc import fetch, rules
from entrypoint.oidc.errors import OidcUnavailable

log = structlog.get_logger("oidc")


@dataclass(frozen=True)
class ProviderReport:
    """What a successful check established: logged with ``oidc.verified``, printed by ``check``.

    ``signing_algs`` are the ID-token algorithms the provider advertises *and*
    can be verified by SpacetimeDB with a key from the JWKS (RS256 first, then
    ES256); ``key_ids`` are the ``kid`` values of those keys.
    """

    issuer: str
    client_id: str
    discovery_url: str
    jwks_uri: str
    authorization_endpoint: str
    token_endpoint: str
    signing_algs: tuple[str, ...]
    key_ids: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    attempts: int = 1

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: the ``report`` of the ``oidc-check`` helper's answer on stdout."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data


# --------------------------------------------------------------------------- redirect URIs

REDIRECT_PATHS = ("/callback", "/", "/silent-oidc-renew.html")


def redirect_uris(settings: Settings) -> list[str]:
    """The URIs to register at the provider for Pogly's browser client (printed by ``check``).

    Pogly's front end uses ``<origin>/callback`` as ``redirect_uri``,
    ``<origin>/`` as ``post_logout_redirect_uri`` and
    ``<origin>/silent-oidc-renew.html`` as ``silent_redirect_uri``.  With
    ``POGLY_PUBLIC_URL`` set they are absolute; without it only the paths are
    known, and :func:`redirect_uris_note` says so.
    """
    base = (settings.public_url or "").rstrip("/")
    return [f"{base}{path}" for path in REDIRECT_PATHS]


def redirect_uris_note(settings: Settings) -> str | None:
    """The line ``check`` prints under the URIs when they could only be given as paths."""
    if settings.public_url:
        return None
    return (
        "POGLY_PUBLIC_URL is not set, so these are paths only: register them on the origin your "
        "browser uses for Pogly, e.g. https://overlay.example.com/callback (set POGLY_PUBLIC_URL "
        "to print them in full)"
    )


# --------------------------------------------------------------------------- the check


async def _check_once(
    settings: Settings, http: httpx.AsyncClient, deadline: float, clock: Callable[[], float], attempt: int
) -> ProviderReport:
    url = get_well_known_url(settings.oidc_issuer, external=True)
    doc = await fetch.get_json(http, url, "discovery document", settings, deadline, clock)
    notes = rules.check_document(doc, url, settings)
    jwks_uri = doc["jwks_uri"]
    jwks = await fetch.get_json(http, jwks_uri, "JWKS", settings, deadline, clock)
    algs, kids, key_notes = rules.check_jwks(jwks, doc, jwks_uri, settings)
    return ProviderReport(
        issuer=doc["issuer"],
        client_id=settings.oidc_client_id,
        discovery_url=url,
        jwks_uri=jwks_uri,
        authorization_endpoint=doc["authorization_endpoint"],
        token_endpoint=doc["token_endpoint"],
        signing_algs=algs,
        key_ids=kids,
        notes=tuple(notes + key_notes),
        attempts=attempt,
    )


async def check_provider(
    settings: Settings,
    client: httpx.AsyncClient | None = None,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> ProviderReport:
    """Validate the provider once, retrying transient failures until the deadline.

    ``deadline`` is an absolute time on ``clock`` (default: now +
    ``settings.oidc_discovery_timeout``).  ``client`` lets the caller share a
    connection pool; its redirect setting is ignored (hops are followed by
    ``fetch``, at most three).  ``clock`` and ``sleep`` exist so tests can run
    the backoff without waiting; the per-request timeouts use the event loop's
    clock.

    Raises ``OidcConfigError`` at the first permanent problem and
    ``OidcUnavailable`` when transient failures last until the deadline.  The
    call may end up to ``fetch.MIN_ATTEMPT_S + fetch.BACKSTOP_GRACE_S`` after
    the deadline: the last attempt always gets a moment to run, and a stuck
    request is cut by httpx's own timeouts first (see ``fetch.REQUEST_TOTAL_S``).
    """
    rules.check_configured_issuer(settings)
    start = clock()
    if deadline is None:
        deadline = start + settings.oidc_discovery_timeout
    bound = log.bind(issuer=settings.oidc_issuer, client_id=settings.oidc_client_id)
    bound.info("oidc.check", timeout_s=round(deadline - start, 1))

    def on_retry(attempt: int, exc: fetch.Transient, pause: float) -> None:
        bound.warning("oidc.retry", attempt=attempt, error=str(exc), retry_in_s=round(pause, 2))

    async with fetch.client_scope(client) as http:
        try:
            report = await fetch.retrying(
                lambda attempt: _check_once(settings, http, deadline, clock, attempt),
                deadline=deadline, clock=clock, sleep=sleep, on_retry=on_retry,
            )
        except fetch.Exhausted as exc:
            elapsed = clock() - start
            raise OidcUnavailable(
                f"the provider gave no usable answer within {elapsed:.1f} s ({exc.attempts} attempt"
                f"{'s' if exc.attempts != 1 else ''}); last error: {exc.last}",
                attempts=exc.attempts, elapsed=elapsed, last_error=str(exc.last), value=settings.oidc_issuer,
                url=get_well_known_url(settings.oidc_issuer, external=True),
                fix=("check the provider is up and reachable from this container (DNS, firewall, proxy, TLS "
                     "certificate); raise OIDC_DISCOVERY_TIMEOUT if it starts slowly"),
            ) from exc.last
    bound.info("oidc.verified", signing_algs=list(report.signing_algs), key_ids=list(report.key_ids),
               notes=list(report.notes), attempts=report.attempts)
    return report
