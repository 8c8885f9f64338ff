"""Validate the OpenID provider before anyone tries to sign in.

Why at startup: a wrong ``OIDC_ISSUER`` (a missing trailing slash, a provider
that only signs with HS256, a typo in the realm) otherwise shows up much later
as a browser stuck in a redirect loop or as SpacetimeDB answering 401 to every
signed-in user, with nothing in the container logs pointing at the cause.
Checking Discovery and the JWKS once, the way the browser and SpacetimeDB will
use them, turns that into one clear message naming the variable and the fix.

What is checked (OpenID Connect Discovery 1.0 §3, §4, §4.3 and RFC 7517):

* the document at ``OIDC_ISSUER`` without its final ``/`` +
  ``/.well-known/openid-configuration`` is a JSON object whose ``issuer`` is
  *identical* to ``OIDC_ISSUER`` (SpacetimeDB derives each user's identity
  from the raw ``iss`` string, so ``…/pogly`` and ``…/pogly/`` are different
  users: never normalise, tell the operator the exact value instead);
* the required metadata is present and well formed (Authlib's
  ``OpenIDProviderMetadata``), with our own transport rule instead of
  Authlib's: https, or http on a loopback host, or anywhere with
  ``OIDC_ALLOW_HTTP=true``; under ``STRICT_MODE`` https everywhere;
* the JWKS holds at least one public RS256 or ES256 signing key (what
  SpacetimeDB can verify from a JWKS) and no private or symmetric key.

Transient failures (connection errors, timeouts, 5xx, 408, 429) are retried
with capped, jittered exponential backoff until ``OIDC_DISCOVERY_TIMEOUT``;
everything else fails at once, because retrying a 404 or a wrong issuer only
delays the message the operator needs.

Logging: only ``issuer`` and ``client_id`` come from the environment; no other
setting is ever logged here.  Events: ``oidc.check`` (a check starts),
``oidc.retry`` (a transient failure, with the wait before the next attempt),
``oidc.verified`` (success).  Permanent and
deadline failures are *raised*, not logged, so the caller logs them once next
to the exit code or the status change it decides on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from authlib.oidc.discovery import OpenIDProviderMetadata, get_well_known_url
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from entrypoint.config import EXIT_CONFIG, Settings

log = structlog.get_logger("oidc")

# EX_UNAVAILABLE from sysexits.h: the caller exits with it under STRICT_MODE.
EXIT_UNAVAILABLE = 69

#: Largest discovery document or JWKS accepted.  Real ones are a few KiB; the
#: cap keeps a misrouted request (a video, a log dump) from eating PID 1's memory.
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
#: Backoff between attempts of one check: 0.5 s, 1 s, 2 s … capped, plus jitter.
RETRY_MULTIPLIER_S = 0.5
RETRY_CAP_S = 10.0
RETRY_JITTER_S = 0.5
#: Background re-checks in non-strict mode: slower, capped at a minute.

#: Algorithms SpacetimeDB verifies with a key from the provider's JWKS, in the
#: order we prefer them.  HS256 is also accepted by SpacetimeDB, but only with a
#: shared secret, which a JWKS must never publish and a browser never has.
SPACETIMEDB_ALGS = ("RS256", "ES256")
_PRIVATE_PARAMS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_KNOWN_KTY = ("RSA", "EC", "OKP")
_URL_FIELDS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "jwks_uri",
    "userinfo_endpoint",
    "registration_endpoint",
    "end_session_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
)
_ISSUER_SHAPES = (
    "Authentik: https://HOST/application/o/<slug>/ (with the slash); "
    "Keycloak: https://HOST/realms/<realm> (without)"
)
_HS256_FIX = (
    "give the application an asymmetric signing key at the provider. Authentik: Applications → "
    "Providers → (this provider) → Edit → Advanced protocol settings → Signing Key: select a "
    "certificate-key pair, e.g. 'authentik Self-signed Certificate' (an RSA key → RS256), or generate "
    "an ECDSA P-256 pair under System → Certificates first (→ ES256); save and restart this container. "
    "Keycloak: Realm settings → Keys: keep an active rsa-generated (RS256) or ecdsa-generated (ES256) "
    "key and set the client's ID token signature algorithm to it"
)


class OidcError(Exception):
    """A provider check failed; ``str()`` is the full message for the operator.

    Attributes:
        reason: a short stable code for tests, status output and metrics
            (e.g. ``issuer_mismatch``, ``hs256_only``, ``unreachable``).
        variable: the setting to look at (usually ``OIDC_ISSUER``).
        value: its current value.
        detail: what is wrong, in one sentence.
        fix: what to do about it, or ``None``.
        suggested_value: the exact value to set ``variable`` to, when we know it.
        url: the URL whose answer was wrong, when there is one.
        exit_code: what the entrypoint exits with for this error.
    """

    exit_code: int = EXIT_CONFIG

    def __init__(
        self,
        detail: str,
        *,
        reason: str,
        variable: str = "OIDC_ISSUER",
        value: str | None = None,
        fix: str | None = None,
        suggested_value: str | None = None,
        url: str | None = None,
    ) -> None:
        self.detail = detail
        self.reason = reason
        self.variable = variable
        self.value = value
        self.fix = fix
        self.suggested_value = suggested_value
        self.url = url
        shown = "(unset)" if value is None else repr(value)
        message = f"{variable}={shown}: {detail}"
        if fix:
            message += f". Fix: {fix}"
        super().__init__(message)


class OidcConfigError(OidcError):
    """Permanent: retrying cannot help; the entrypoint exits 78 (EX_CONFIG) before serving."""

    exit_code = EXIT_CONFIG


class OidcUnavailable(OidcError):
    """The provider could not be reached (or kept failing transiently) until the deadline.

    Under ``STRICT_MODE`` the entrypoint exits 69 (EX_UNAVAILABLE); otherwise it
    keeps serving the overlay, reports ``oidc: unverified`` and re-checks in the
    background (``Supervisor._oidc``, each check an ``oidc-check`` process).

    Extra attributes: ``attempts`` (requests rounds made), ``elapsed`` (seconds),
    ``last_error`` (the last transient failure, as text).
    """

    exit_code = EXIT_UNAVAILABLE

    def __init__(self, detail: str, *, attempts: int, elapsed: float, last_error: str, **kwargs: Any) -> None:
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        super().__init__(detail, reason="unreachable", **kwargs)


class _Transient(Exception):
    """Internal: a failure worth retrying, with the server's Retry-After if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ProviderReport:
    """What a successful check established, for logs, ``status`` and ``check``.

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
        """Plain JSON types, for ``/status`` and ``check --json``."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data


# --------------------------------------------------------------------------- redirect URIs

REDIRECT_PATHS = ("/callback", "/", "/silent-oidc-renew.html")


def redirect_uris(settings: Settings) -> list[str]:
    """The URIs to register at the provider for Pogly's browser client.

    Pogly's front end uses ``<origin>/callback`` as ``redirect_uri``,
    ``<origin>/`` as ``post_logout_redirect_uri`` and
    ``<origin>/silent-oidc-renew.html`` as ``silent_redirect_uri``.  With
    ``POGLY_PUBLIC_URL`` set they are absolute; without it only the paths are
    known (see :func:`redirect_uris_note` for the line to print with them).
    """
    base = (settings.public_url or "").rstrip("/")
    return [f"{base}{path}" for path in REDIRECT_PATHS]


def redirect_uris_note(settings: Settings) -> str | None:
    """A hint for ``check`` when the URIs could only be given as paths."""
    if settings.public_url:
        return None
    return (
        "POGLY_PUBLIC_URL is not set, so these are paths only: register them on the origin your "
        "browser uses for Pogly, e.g. https://overlay.example.com/callback (set POGLY_PUBLIC_URL "
        "to print them in full)"
    )


# --------------------------------------------------------------------------- URL rules


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_problem(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be used to talk to the provider, or ``None`` if it may.

    https is required because the discovery document and JWKS decide which
    signatures are trusted: over plain http anyone on the path could swap the
    keys.  Loopback http is harmless and is what local providers use, unless
    ``STRICT_MODE`` asks for production rules everywhere.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "is not a valid URL"
    if not host or parts.scheme not in ("http", "https"):
        return "must be an https URL"
    if parts.scheme == "https":
        return None
    if settings.strict_mode:
        return ("uses plain http, which STRICT_MODE=true refuses everywhere, loopback included: "
                "serve the provider over https, or turn STRICT_MODE off for local use")
    if _is_loopback(host) or settings.oidc_allow_http:
        return None
    return (f"uses plain http on a non-loopback host ({host}): serve the provider over https, or "
            "set OIDC_ALLOW_HTTP=true for local use only (refused under STRICT_MODE)")


def _check_configured_issuer(settings: Settings) -> None:
    issuer = settings.oidc_issuer
    try:
        parts = urlsplit(issuer)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise OidcConfigError(
            "is not an http(s) URL", reason="issuer_invalid", value=issuer,
            fix=f"set it to the issuer your provider reports ({_ISSUER_SHAPES})",
        )
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise OidcConfigError(
            "must not have a query or fragment (OpenID Discovery §3)", reason="issuer_invalid",
            value=issuer, fix=f"remove everything from '?' or '#' on ({_ISSUER_SHAPES})",
        )
    if parts.username is not None or parts.password is not None:
        raise OidcConfigError(
            "must not contain credentials (user:password@)", reason="issuer_invalid", value=issuer,
            fix="remove them: discovery needs no authentication",
        )
    problem = transport_problem(issuer, settings)
    if problem:
        raise OidcConfigError(problem, reason="insecure_transport", value=issuer)


_DEFAULT_PORT = re.compile(r"^(?:(?P<s>https)://(?P<h>[^/?#]*?):443|(?P<s2>http)://(?P<h2>[^/?#]*?):80)(?=[/?#]|$)",
                           re.IGNORECASE)


def _plain(url: str) -> str:
    """``url`` without an explicit default port and without trailing slashes."""
    def drop(match: re.Match[str]) -> str:
        scheme = match.group("s") or match.group("s2")
        host = match.group("h") if match.group("s") else match.group("h2")
        return f"{scheme}://{host}"

    return _DEFAULT_PORT.sub(drop, url, count=1).rstrip("/")


def describe_issuer_difference(configured: str, reported: str) -> list[str] | None:
    """The harmless-looking ways two issuers differ, or ``None`` if they differ in substance.

    Returns some of ``"a trailing slash"``, ``"letter case"`` and ``"an explicit
    default port"`` when the issuers are equal once those are ignored, so the
    message can say exactly that instead of a generic mismatch.
    """
    a, b = _plain(configured), _plain(reported)
    if configured == reported or a.lower() != b.lower():
        return None
    diffs = []
    if configured.endswith("/") != reported.endswith("/"):
        diffs.append("a trailing slash")
    if a != b:
        diffs.append("letter case")
    if (configured.rstrip("/") != a) != (reported.rstrip("/") != b):
        diffs.append("an explicit default port")
    return diffs or ["trailing slashes"]


# --------------------------------------------------------------------------- HTTP


@asynccontextmanager
async def _client_scope(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
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


async def _get_json(
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
            raise _Transient(f"the {what} at {current}: no complete answer within {remaining:.1f} s") from exc
        except httpx.TransportError as exc:
            reason = str(exc) or "connection failed"
            raise _Transient(f"the {what} at {current}: {type(exc).__name__}: {reason}") from exc
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
        raise _Transient(f"the {what} at {url}: HTTP {status}", retry_after=_retry_after(response))
    fix = None
    if status == 404 and what == "discovery document":
        fix = f"check the issuer's path; it must be exactly what the provider reports ({_ISSUER_SHAPES})"
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
            fix=f"check OIDC_ISSUER points at the provider ({_ISSUER_SHAPES})",
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
            fix=f"check OIDC_ISSUER ({_ISSUER_SHAPES})",
        ) from None
    if not isinstance(data, dict):
        raise OidcConfigError(
            f"the {what} at {url} is JSON but not an object", reason="not_json",
            value=settings.oidc_issuer, url=url,
        )
    return data


# --------------------------------------------------------------------------- document checks


class _Metadata(OpenIDProviderMetadata):
    """Authlib's Discovery checks, minus the two rules we decide ourselves.

    Authlib insists on RS256 being listed, but SpacetimeDB verifies ES256 too
    and an ES256-only Authentik is a working setup: the algorithm rule lives in
    :func:`_check_jwks`.  (The https rule is ours as well; see ``_validate``.)
    """

    def validate_id_token_signing_alg_values_supported(self) -> None:
        values = self.get("id_token_signing_alg_values_supported")
        if values is None:
            raise ValueError('"id_token_signing_alg_values_supported" is required')
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(
                '"id_token_signing_alg_values_supported" MUST be a non-empty JSON array of strings'
            )


def _check_document(doc: Mapping[str, Any], url: str, settings: Settings) -> list[str]:
    """Validate the discovery document; return notes worth showing on success."""
    configured = settings.oidc_issuer

    def invalid(detail: str, reason: str = "invalid_metadata", **kw: Any) -> OidcConfigError:
        kw.setdefault("fix", "this is the provider's answer, not a setting here: check OIDC_ISSUER points "
                      f"at an OpenID Connect provider ({_ISSUER_SHAPES}) and the provider's configuration")
        return OidcConfigError(f"the discovery document at {url} {detail}", reason=reason, value=configured,
                               url=url, **kw)

    reported = doc.get("issuer")
    if not isinstance(reported, str) or not reported:
        raise invalid('has no "issuer" (required by OpenID Discovery §3)')
    parts = urlsplit(reported)
    if parts.query or parts.fragment or "?" in reported or "#" in reported:
        raise invalid(f"reports issuer {reported!r}, which has a query or fragment (forbidden by OpenID "
                      "Discovery §3)")
    if reported != configured:
        diffs = describe_issuer_difference(configured, reported)
        if diffs:
            raise OidcConfigError(
                f"the provider reports issuer {reported!r}; the two differ only by {' and '.join(diffs)}, "
                "but OpenID Connect compares issuers as exact strings (the browser checks it, and "
                "SpacetimeDB derives every user's identity from it)",
                reason="issuer_mismatch", value=configured, url=url, suggested_value=reported,
                fix=f"set OIDC_ISSUER={reported} exactly as the provider reports it",
            )
        raise OidcConfigError(
            f"the document at {url} reports issuer {reported!r}, a different issuer",
            reason="issuer_mismatch", value=configured, url=url, suggested_value=reported,
            fix=(f"if that provider is the right one, set OIDC_ISSUER={reported}; otherwise point "
                 f"OIDC_ISSUER at your provider ({_ISSUER_SHAPES})"),
        )

    for key in _URL_FIELDS:
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise invalid(f'has a "{key}" that is not a URL string')
        problem = transport_problem(value, settings)
        if problem:
            raise invalid(f'has "{key}" {value!r}, which {problem}', reason="insecure_transport", fix=None)

    # Our transport rule has run; give Authlib a copy where allowed http URLs
    # read as https, so its own (loopback-only) https rule does not overrule
    # OIDC_ALLOW_HTTP and its shape checks still run on every field.
    copy = dict(doc)
    for key in _URL_FIELDS:
        if isinstance(copy.get(key), str) and copy[key].startswith("http://"):
            copy[key] = "https://" + copy[key][len("http://"):]
    try:
        _Metadata(copy).validate()
    except ValueError as exc:
        raise invalid(f"is invalid: {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise invalid(f"is malformed ({exc})") from None

    for key in ("authorization_endpoint", "token_endpoint"):
        if not doc.get(key):
            raise invalid(f'has no "{key}", which the browser needs for the authorization code flow')
    response_types = doc["response_types_supported"]
    if "code" not in response_types:
        raise invalid(f"does not offer the authorization code flow Pogly uses (response_types_supported: "
                      f"{response_types})")
    notes = []
    methods = doc.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        notes.append(f"code_challenge_methods_supported {methods} lacks S256, which the browser uses (PKCE)")
    return notes


def _key_algs(raw: Mapping[str, Any]) -> set[str]:
    """Which of SpacetimeDB's algorithms this public key can verify (its ``alg`` if it names one)."""
    fits = set()
    if raw.get("kty") == "RSA":
        fits.add("RS256")
    if raw.get("kty") == "EC" and raw.get("crv") == "P-256":
        fits.add("ES256")
    alg = raw.get("alg")
    return fits if alg is None else fits & {alg}


def _check_jwks(
    jwks: Mapping[str, Any], doc: Mapping[str, Any], jwks_uri: str, settings: Settings
) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
    """Return (usable algs, their key ids, notes) or raise ``OidcConfigError``."""
    configured = settings.oidc_issuer
    advertised = list(doc["id_token_signing_alg_values_supported"])

    def bad(detail: str, reason: str = "jwks_invalid", fix: str | None = None) -> OidcConfigError:
        return OidcConfigError(f"the JWKS at {jwks_uri} {detail}", reason=reason, value=configured,
                               url=jwks_uri, fix=fix)

    keys = jwks.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise bad('is not a JWK Set (RFC 7517 §5 needs a "keys" array of objects)')
    notes: list[str] = []
    usable: dict[str, list[str]] = {alg: [] for alg in SPACETIMEDB_ALGS}
    for index, raw in enumerate(keys):
        kid = raw.get("kid")
        name = f"key {kid!r}" if kid else f"key #{index + 1}"
        kty = raw.get("kty")
        if kty == "oct":
            raise bad(
                f"publishes a symmetric (kty 'oct') {name}: that is a shared secret made public, so anyone "
                "could sign tokens", reason="jwks_symmetric_key",
                fix="remove it from the provider's published keys and rotate that secret now",
            )
        leaked = [p for p in _PRIVATE_PARAMS if p in raw]
        if leaked:
            raise bad(
                f"publishes the PRIVATE part of {name} (parameters {', '.join(leaked)}): anyone can sign "
                "tokens that SpacetimeDB would accept", reason="jwks_private_key",
                fix="rotate that key at the provider immediately and make it publish public keys only",
            )
        if kty not in _KNOWN_KTY:
            notes.append(f"ignored {name} of unsupported type {kty!r}")
            continue
        try:
            imported = KeySet.import_key_set({"keys": [raw]}).keys[0]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise bad(f"has an unusable {name}: {exc}", fix="check the key at the provider") from None
        if imported.is_private:  # belt and braces: joserfc saw private material we did not
            raise bad(f"publishes the private part of {name}", reason="jwks_private_key",
                      fix="rotate that key at the provider immediately")
        if raw.get("use", "sig") != "sig":
            continue
        ops = raw.get("key_ops")
        if isinstance(ops, list) and "verify" not in ops:
            continue
        for alg in _key_algs(raw):
            usable[alg].append(str(kid) if kid else f"(no kid, #{index + 1})")

    algs = tuple(a for a in SPACETIMEDB_ALGS if a in advertised and usable[a])
    if not algs:
        if all(a.startswith("HS") for a in advertised):
            raise bad(
                "cannot help: the provider signs ID tokens only with "
                f"{'/'.join(advertised)} "
                "(a shared secret, normally the client secret). SpacetimeDB verifies every browser's token "
                "with a public key from this JWKS, and a browser (a public client) has no secret, so every "
                "sign-in would be rejected by SpacetimeDB with 401",
                reason="hs256_only", fix=_HS256_FIX,
            )
        have = sorted({a for a, kids in usable.items() if kids}) or ["none"]
        raise bad(
            f"has no public key for the algorithms the provider signs ID tokens with "
            f"(id_token_signing_alg_values_supported {advertised}; usable keys for {', '.join(have)}); "
            "SpacetimeDB verifies RS256 (RSA) or ES256 (EC P-256) signatures from the JWKS",
            reason="no_usable_key",
            fix="configure an RSA (RS256) or EC P-256 (ES256) signing key at the provider; " + _HS256_FIX,
        )
    if "RS256" not in algs:
        notes.append("no RS256 key; ES256 accepted (SpacetimeDB verifies ES256; OpenID Discovery asks "
                     "providers to list RS256, so stricter clients might refuse this provider)")
    others = [a for a in advertised if a not in algs]
    if others:
        notes.append(f"ID tokens signed with {', '.join(others)} would be rejected by SpacetimeDB: keep the "
                     f"client on {' or '.join(algs)}")
    kids = tuple(dict.fromkeys(k for a in algs for k in usable[a]))
    return algs, kids, notes


async def _check_once(
    settings: Settings, http: httpx.AsyncClient, deadline: float, clock: Callable[[], float], attempt: int
) -> ProviderReport:
    url = get_well_known_url(settings.oidc_issuer, external=True)
    doc = await _get_json(http, url, "discovery document", settings, deadline, clock)
    notes = _check_document(doc, url, settings)
    jwks_uri = doc["jwks_uri"]
    jwks = await _get_json(http, jwks_uri, "JWKS", settings, deadline, clock)
    algs, kids, key_notes = _check_jwks(jwks, doc, jwks_uri, settings)
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


# --------------------------------------------------------------------------- public entry points


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
    connection pool; its redirect setting is ignored (hops are followed here, at
    most three).  ``clock`` and ``sleep`` exist so tests can run the backoff
    without waiting; the per-request timeouts use the event loop's clock.

    Raises ``OidcConfigError`` at the first permanent problem and
    ``OidcUnavailable`` when transient failures last until the deadline.  The
    call may end up to ``MIN_ATTEMPT_S + BACKSTOP_GRACE_S`` after the deadline:
    the last attempt always gets a moment to run, and a stuck request is cut
    by httpx's own timeouts first (see ``REQUEST_TOTAL_S``).
    """
    _check_configured_issuer(settings)
    start = clock()
    if deadline is None:
        deadline = start + settings.oidc_discovery_timeout
    bound = log.bind(issuer=settings.oidc_issuer, client_id=settings.oidc_client_id)
    bound.info("oidc.check", timeout_s=round(deadline - start, 1))
    backoff = wait_exponential_jitter(multiplier=RETRY_MULTIPLIER_S, max=RETRY_CAP_S, jitter=RETRY_JITTER_S)

    def wait(state: RetryCallState) -> float:
        delay = backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return max(0.0, min(delay, deadline - clock() - MIN_ATTEMPT_S))

    def stop(state: RetryCallState) -> bool:
        return deadline - clock() <= MIN_ATTEMPT_S

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        bound.warning("oidc.retry", attempt=state.attempt_number, error=str(exc),
                      retry_in_s=round(state.upcoming_sleep, 2))

    retrying = AsyncRetrying(
        sleep=sleep, stop=stop, wait=wait, retry=retry_if_exception_type(_Transient),
        before_sleep=before_sleep, reraise=True,
    )
    attempt = 0
    async with _client_scope(client) as http:
        try:
            async for attempt_manager in retrying:
                with attempt_manager:
                    attempt = attempt_manager.retry_state.attempt_number
                    report = await _check_once(settings, http, deadline, clock, attempt)
        except _Transient as exc:
            elapsed = clock() - start
            raise OidcUnavailable(
                f"the provider gave no usable answer within {elapsed:.1f} s ({attempt} attempt"
                f"{'s' if attempt != 1 else ''}); last error: {exc}",
                attempts=attempt, elapsed=elapsed, last_error=str(exc), value=settings.oidc_issuer,
                url=get_well_known_url(settings.oidc_issuer, external=True),
                fix=("check the provider is up and reachable from this container (DNS, firewall, proxy, TLS "
                     "certificate); raise OIDC_DISCOVERY_TIMEOUT if it starts slowly"),
            ) from exc
    bound.info("oidc.verified", signing_algs=list(report.signing_algs), key_ids=list(report.key_ids),
               notes=list(report.notes), attempts=report.attempts)
    return report


