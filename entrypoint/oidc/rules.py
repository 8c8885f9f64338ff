"""The rules a provider's answers must follow: pure checks, no I/O.

What is checked (OpenID Connect Discovery 1.0 §3, §4, §4.3 and RFC 7517):

* the configured issuer is an http(s) URL without query, fragment or
  credentials, over an allowed transport (:func:`check_configured_issuer`);
* the discovery document's ``issuer`` is *identical* to ``OIDC_ISSUER``
  (SpacetimeDB derives each user's identity from the raw ``iss`` string, so
  ``…/pogly`` and ``…/pogly/`` are different users: never normalise, tell the
  operator the exact value instead, :func:`describe_issuer_difference`);
* the required metadata is present and well formed (Authlib's
  ``OpenIDProviderMetadata``), with our own transport rule instead of
  Authlib's (:func:`transport_problem`): https, or http on a loopback host, or
  anywhere with ``OIDC_ALLOW_HTTP=true``; under ``STRICT_MODE`` https everywhere;
* the JWKS holds at least one public RS256 or ES256 signing key (what
  SpacetimeDB can verify from a JWKS) and no private or symmetric key
  (:func:`check_jwks`).

Every failure is an ``OidcConfigError`` naming the fix; what passes with a
caveat comes back as notes for ``check`` and the ``oidc.verified`` event.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from entrypoint.config import Settings
from entrypoint.oidc.errors import OidcConfigError

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
ISSUER_SHAPES = (
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


def check_configured_issuer(settings: Settings) -> None:
    issuer = settings.oidc_issuer
    try:
        parts = urlsplit(issuer)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise OidcConfigError(
            "is not an http(s) URL", reason="issuer_invalid", value=issuer,
            fix=f"set it to the issuer your provider reports ({ISSUER_SHAPES})",
        )
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise OidcConfigError(
            "must not have a query or fragment (OpenID Discovery §3)", reason="issuer_invalid",
            value=issuer, fix=f"remove everything from '?' or '#' on ({ISSUER_SHAPES})",
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


# --------------------------------------------------------------------------- document checks


class _Metadata(OpenIDProviderMetadata):
    """Authlib's Discovery checks, minus the two rules we decide ourselves.

    Authlib insists on RS256 being listed, but SpacetimeDB verifies ES256 too
    and an ES256-only Authentik is a working setup: the algorithm rule lives in
    :func:`check_jwks`.  (The https rule is ours as well: :func:`check_document`
    applies :func:`transport_problem` first.)
    """

    def validate_id_token_signing_alg_values_supported(self) -> None:
        values = self.get("id_token_signing_alg_values_supported")
        if values is None:
            raise ValueError('"id_token_signing_alg_values_supported" is required')
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(
                '"id_token_signing_alg_values_supported" MUST be a non-empty JSON array of strings'
            )


def check_document(doc: Mapping[str, Any], url: str, settings: Settings) -> list[str]:
    """Validate the discovery document; return notes worth showing on success."""
    configured = settings.oidc_issuer

    def invalid(detail: str, reason: str = "invalid_metadata", **kw: Any) -> OidcConfigError:
        kw.setdefault("fix", "this is the provider's answer, not a setting here: check OIDC_ISSUER points "
                      f"at an OpenID Connect provider ({ISSUER_SHAPES}) and the provider's configuration")
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
                 f"OIDC_ISSUER at your provider ({ISSUER_SHAPES})"),
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


def check_jwks(
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
