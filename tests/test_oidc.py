"""Provider validation against the real oidc-provider and against canned failures."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import structlog
from joserfc import jwt
from joserfc.jwk import KeySet

from entrypoint.config import Settings
from entrypoint.errors import EXIT_UNAVAILABLE
from entrypoint.oidc import fetch
from entrypoint.oidc.check import ProviderReport, check_provider, redirect_uris, redirect_uris_note
from entrypoint.oidc.errors import OidcConfigError, OidcUnavailable
from entrypoint.oidc.rules import describe_issuer_difference, transport_problem
from tests.oidc.canned import (
    REQUIRED_FIELDS,
    CannedServer,
    Reply,
    discovery_doc,
    ec_public_jwk,
    oct_jwk,
    rsa_private_jwk,
    rsa_public_jwk,
    silent_listener,
)
from tests.oidc.fixtures import NodeProvider, node_provider, stop_provider
from tests.oidc.signin import APP_ORIGIN, follow_to_app, pkce

WELL_KNOWN = "/.well-known/openid-configuration"


def settings_for(issuer: str, **kw: Any) -> Settings:
    kw.setdefault("oidc_discovery_timeout", 10.0)
    return Settings(oidc_issuer=issuer, oidc_client_id="pogly", **kw)


def check(settings: Settings, **kw: Any) -> ProviderReport:
    return asyncio.run(check_provider(settings, **kw))


async def _no_wait(seconds: float) -> None:
    """A ``sleep`` for backoff tests: the retry logic runs, the test does not wait."""
    await asyncio.sleep(0)


class FakeClock:
    """``clock`` + ``sleep`` pair: sleeping advances time instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- real oidc-provider


@pytest.fixture(scope="module")
def authentik() -> Iterator[NodeProvider]:
    with node_provider("--shape", "authentik") as provider:
        yield provider


@pytest.fixture(scope="module")
def keycloak() -> Iterator[NodeProvider]:
    with node_provider("--shape", "keycloak") as provider:
        yield provider


def test_real_provider_issuer_shapes(authentik: NodeProvider, keycloak: NodeProvider) -> None:
    assert authentik.issuer.endswith("/application/o/pogly/")
    assert keycloak.issuer.endswith("/realms/pogly")


@pytest.mark.parametrize("shape", ["authentik", "keycloak"])
def test_real_provider_validates(shape: str, request: pytest.FixtureRequest) -> None:
    provider: NodeProvider = request.getfixturevalue(shape)
    report = check(settings_for(provider.issuer))
    assert report.issuer == provider.issuer
    assert report.signing_algs == ("RS256",)
    assert len(report.key_ids) == 1 and report.key_ids[0].startswith("rs256-")
    prefix = provider.issuer.rstrip("/")
    assert report.jwks_uri == f"{prefix}/jwks"
    assert report.discovery_url == f"{prefix}{WELL_KNOWN}"
    assert report.authorization_endpoint.startswith(prefix + "/")
    assert report.notes == ()


@pytest.mark.parametrize("shape", ["authentik", "keycloak"])
def test_real_provider_wrong_trailing_slash(shape: str, request: pytest.FixtureRequest) -> None:
    provider: NodeProvider = request.getfixturevalue(shape)
    wrong = provider.issuer[:-1] if provider.issuer.endswith("/") else provider.issuer + "/"
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(wrong))
    err = caught.value
    assert err.reason == "issuer_mismatch"
    assert err.variable == "OIDC_ISSUER" and err.value == wrong
    assert err.suggested_value == provider.issuer
    assert "differ only by a trailing slash" in str(err)
    assert f"set OIDC_ISSUER={provider.issuer} exactly" in str(err)


def test_real_provider_es256_only_is_accepted_with_note() -> None:
    with node_provider("--shape", "keycloak", "--keys", "es256") as provider:
        report = check(settings_for(provider.issuer))
    assert report.signing_algs == ("ES256",)
    assert report.key_ids[0].startswith("es256-")
    assert any("no RS256 key; ES256 accepted" in note for note in report.notes)


@pytest.mark.parametrize("sig", [15, 2])  # SIGTERM, SIGINT
def test_real_provider_exits_zero_on_signal(sig: int) -> None:
    with node_provider("--shape", "root") as provider:
        provider.process.send_signal(sig)
        assert stop_provider(provider.process) == 0


def test_real_provider_sign_in_with_dev_interactions(authentik: NodeProvider) -> None:
    """What the browser test will do, over plain HTTP: code flow + PKCE, any login works."""
    report = check(settings_for(authentik.issuer))
    verifier, challenge = pkce()
    redirect_uri = f"{APP_ORIGIN}/callback"
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        response = client.get(report.authorization_endpoint, params={
            "client_id": "pogly", "response_type": "code", "scope": "openid profile",
            "redirect_uri": redirect_uri, "code_challenge": challenge, "code_challenge_method": "S256",
            "state": "s1", "nonce": "n1",
        })
        response = follow_to_app(client, response)
        assert response.status_code == 200 and 'name="login"' in response.text  # the login form
        login_url = str(response.url)
        assert login_url.startswith(authentik.issuer), "interaction must stay under the prefix"
        response = client.post(login_url, data={"prompt": "login", "login": "alice", "password": "anything"})
        response = follow_to_app(client, response)
        if not response.is_redirect:  # first sign-in: consent page
            assert 'name="prompt" value="consent"' in response.text
            response = client.post(str(response.url), data={"prompt": "consent"})
            response = follow_to_app(client, response)
        callback = urlsplit(response.headers["location"])
        query = parse_qs(callback.query)
        assert f"{callback.scheme}://{callback.netloc}{callback.path}" == redirect_uri
        assert query["state"] == ["s1"] and query["iss"] == [authentik.issuer]
        token = client.post(report.token_endpoint, headers={"Origin": APP_ORIGIN}, data={
            "grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": redirect_uri,
            "client_id": "pogly", "code_verifier": verifier,
        })
        assert token.status_code == 200, token.text
        assert token.headers["access-control-allow-origin"] == APP_ORIGIN
        keys = KeySet.import_key_set(client.get(report.jwks_uri).json())
    id_token = jwt.decode(token.json()["id_token"], keys, algorithms=["RS256"])
    assert id_token.header["alg"] == "RS256"
    assert id_token.claims["iss"] == authentik.issuer
    assert id_token.claims["sub"] == "alice"
    assert id_token.claims["aud"] == "pogly"
    assert isinstance(id_token.claims["iat"], int)  # SpacetimeDB requires iat


# --------------------------------------------------------------------------- canned documents


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    with CannedServer() as server:
        yield server


def serve(server: CannedServer, doc: dict[str, Any] | None = None, jwks: dict[str, Any] | None = None,
          path: str = "") -> str:
    """Serve a discovery document (default: valid) and JWKS; return the issuer."""
    issuer = server.base + path
    server.set(path + WELL_KNOWN, Reply(body=doc if doc is not None else discovery_doc(issuer, server.base)))
    server.set("/jwks", Reply(body=jwks if jwks is not None else {"keys": [rsa_public_jwk()]}))
    return issuer


def test_canned_valid_document(canned: CannedServer) -> None:
    issuer = serve(canned)
    report = check(settings_for(issuer))
    assert report.signing_algs == ("RS256",) and report.key_ids == ("rsa-1",)
    assert report.attempts == 1
    assert report.to_json()["signing_algs"] == ["RS256"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.issuer = "x"  # type: ignore[misc]


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_each_required_field_missing(canned: CannedServer, field: str) -> None:
    issuer = canned.base
    serve(canned, discovery_doc(issuer, canned.base, **{field: None}))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "invalid_metadata"
    assert f'"{field}"' in str(caught.value)
    assert canned.count("/jwks") == 0


def test_issuer_with_query_in_document(canned: CannedServer) -> None:
    issuer = canned.base + "/tenant"
    serve(canned, discovery_doc(issuer + "?x=1", canned.base), path="/tenant")
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert "query or fragment" in str(caught.value)


def test_configured_issuer_with_query_is_refused_before_any_request(canned: CannedServer) -> None:
    issuer = serve(canned) + "/?tenant=1"
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "issuer_invalid"
    assert canned.hits == []


def test_http_issuer_refused_under_strict_mode(canned: CannedServer) -> None:
    issuer = serve(canned)
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer, strict_mode=True))
    err = caught.value
    assert err.reason == "insecure_transport" and err.exit_code == 78
    assert "STRICT_MODE" in str(err) and issuer in str(err)
    assert canned.hits == []


def test_http_endpoint_on_other_host_needs_allowance(canned: CannedServer) -> None:
    issuer = canned.base
    serve(canned, discovery_doc(issuer, canned.base, jwks_uri="http://auth.example.test/jwks"))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "insecure_transport"
    assert "OIDC_ALLOW_HTTP=true" in str(caught.value)


def test_transport_rules() -> None:
    plain = settings_for("https://x")
    assert transport_problem("https://auth.example.com/x", plain) is None
    assert transport_problem("http://127.0.0.1:9/x", plain) is None
    assert transport_problem("http://[::1]:9/x", plain) is None
    assert transport_problem("http://localhost:9/x", plain) is None
    assert "OIDC_ALLOW_HTTP" in (transport_problem("http://auth.lan/x", plain) or "")
    assert transport_problem("http://auth.lan/x", dataclasses.replace(plain, oidc_allow_http=True)) is None
    strict = dataclasses.replace(plain, strict_mode=True)
    assert "STRICT_MODE" in (transport_problem("http://127.0.0.1:9/x", strict) or "")
    assert transport_problem("ftp://auth.example.com/x", plain) == "must be an https URL"


def test_hs256_only_provider_is_explained(canned: CannedServer) -> None:
    issuer = canned.base
    serve(canned, discovery_doc(issuer, canned.base, id_token_signing_alg_values_supported=["HS256"]),
          {"keys": []})
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    err = caught.value
    text = str(err)
    assert err.reason == "hs256_only"
    assert "HS256" in text and "SpacetimeDB" in text and "401" in text and "public client" in text
    assert "Authentik" in text and "Signing Key" in text and "ES256" in text


def test_jwks_with_private_key_is_refused(canned: CannedServer) -> None:
    issuer = serve(canned, jwks={"keys": [rsa_public_jwk(), rsa_private_jwk("leaky")]})
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "jwks_private_key"
    assert "'leaky'" in str(caught.value) and "rotate" in str(caught.value)


def test_jwks_with_symmetric_key_is_refused(canned: CannedServer) -> None:
    issuer = serve(canned, jwks={"keys": [rsa_public_jwk(), oct_jwk()]})
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "jwks_symmetric_key"


def test_es256_only_canned_is_accepted(canned: CannedServer) -> None:
    issuer = canned.base
    serve(canned, discovery_doc(issuer, canned.base, id_token_signing_alg_values_supported=["ES256"]),
          {"keys": [ec_public_jwk("ec-a", alg=None), ec_public_jwk("ec-384", curve="P-384", alg=None)]})
    report = check(settings_for(issuer))
    assert report.signing_algs == ("ES256",) and report.key_ids == ("ec-a",)
    assert any("ES256 accepted" in note for note in report.notes)


def test_no_key_for_the_advertised_algorithm(canned: CannedServer) -> None:
    issuer = serve(canned, jwks={"keys": [ec_public_jwk("ec-384", curve="P-384", alg="ES384")]})
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "no_usable_key"


def test_encryption_keys_and_unknown_types_are_skipped(canned: CannedServer) -> None:
    enc = rsa_public_jwk("enc-1") | {"use": "enc", "alg": "RSA-OAEP"}
    issuer = serve(canned, jwks={"keys": [enc, {"kty": "AKP", "kid": "pq"}, rsa_public_jwk("sig-1")]})
    report = check(settings_for(issuer))
    assert report.key_ids == ("sig-1",)
    assert any("unsupported type 'AKP'" in note for note in report.notes)


def test_500_then_200_retries_and_succeeds(canned: CannedServer) -> None:
    issuer = serve(canned)
    canned.set(WELL_KNOWN, Reply(500), Reply(503), Reply(body=discovery_doc(issuer, canned.base)))
    clock = FakeClock()
    with structlog.testing.capture_logs() as events:
        report = check(settings_for(issuer), clock=clock, sleep=clock.sleep)
    assert report.attempts == 3 and canned.count(WELL_KNOWN) == 3
    assert len(clock.sleeps) == 2 and clock.sleeps[0] < clock.sleeps[1] <= 10
    retries = [e for e in events if e["event"] == "oidc.retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "HTTP 500" in retries[0]["error"]
    assert [e["event"] for e in events][-1] == "oidc.verified"


def test_429_retry_after_is_honoured(canned: CannedServer) -> None:
    issuer = serve(canned)
    canned.set(WELL_KNOWN, Reply(429, headers={"Retry-After": "3"}), Reply(body=discovery_doc(issuer, canned.base)))
    clock = FakeClock()
    report = check(settings_for(issuer), clock=clock, sleep=clock.sleep)
    assert report.attempts == 2 and clock.sleeps[0] >= 3


def test_transient_jwks_failure_is_retried(canned: CannedServer) -> None:
    issuer = serve(canned)
    canned.set("/jwks", Reply(502), Reply(body={"keys": [rsa_public_jwk()]}))
    clock = FakeClock()
    assert check(settings_for(issuer), clock=clock, sleep=clock.sleep).attempts == 2


def test_404_fails_at_once(canned: CannedServer) -> None:
    issuer = canned.base + "/application/o/typo/"
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer), sleep=_no_wait)
    assert caught.value.reason == "http_status" and "HTTP 404" in str(caught.value)
    assert canned.count("/application/o/typo" + WELL_KNOWN) == 1


def test_retries_stop_at_the_deadline(canned: CannedServer) -> None:
    issuer = serve(canned)
    canned.set(WELL_KNOWN, Reply(503))
    clock = FakeClock()
    with pytest.raises(OidcUnavailable) as caught:
        check(settings_for(issuer, oidc_discovery_timeout=30), clock=clock, sleep=clock.sleep)
    err = caught.value
    assert err.exit_code == EXIT_UNAVAILABLE and err.reason == "unreachable"
    assert err.attempts == canned.count(WELL_KNOWN) >= 4
    assert max(clock.sleeps) <= 10.0  # the backoff cap
    assert 29 <= clock.now - 1000.0 <= 30.0
    assert "HTTP 503" in err.last_error and "OIDC_DISCOVERY_TIMEOUT" in str(err)


@pytest.mark.parametrize("strict", [False, True])
def test_server_that_never_answers(strict: bool) -> None:
    """The deadline holds with and without STRICT_MODE; the caller maps the error to 69 or 'unverified'.

    Under STRICT_MODE only https is allowed, so that variant speaks TLS to the
    silent port: the handshake never gets an answer either.
    """
    with silent_listener() as base:
        issuer = base.replace("http://", "https://") if strict else base
        settings = settings_for(issuer, oidc_discovery_timeout=2.0, strict_mode=strict)
        started = time.monotonic()
        with pytest.raises(OidcUnavailable) as caught:
            check(settings)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 3.0
    assert caught.value.attempts >= 1 and caught.value.exit_code == EXIT_UNAVAILABLE
    assert "no complete answer" in caught.value.last_error or "Timeout" in caught.value.last_error


@pytest.mark.parametrize("declare_length", [True, False])
def test_50_mb_body_is_refused(canned: CannedServer, declare_length: bool) -> None:
    issuer = canned.base
    canned.set(WELL_KNOWN, Reply(huge=50 * 1024 * 1024, declare_length=declare_length))
    started = time.monotonic()
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "too_large"
    assert time.monotonic() - started < 5


def test_redirect_loop_is_refused(canned: CannedServer) -> None:
    issuer = canned.base
    canned.set(WELL_KNOWN, Reply(302, headers={"Location": "/a"}))
    canned.set("/a", Reply(302, headers={"Location": canned.base + WELL_KNOWN}))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "too_many_redirects"
    assert "redirect loop" in str(caught.value)
    assert len(canned.hits) == 4  # the first request + 3 redirects, then stop


def test_up_to_three_redirects_are_followed(canned: CannedServer) -> None:
    issuer = canned.base
    canned.set(WELL_KNOWN, Reply(301, headers={"Location": "/r1"}))
    canned.set("/r1", Reply(302, headers={"Location": "/r2"}))
    canned.set("/r2", Reply(307, headers={"Location": "/doc"}))
    canned.set("/doc", Reply(body=discovery_doc(issuer, canned.base)))
    canned.set("/jwks", Reply(body={"keys": [rsa_public_jwk()]}))
    assert check(settings_for(issuer)).issuer == issuer


def test_redirect_to_plain_http_elsewhere_is_refused(canned: CannedServer) -> None:
    issuer = canned.base
    canned.set(WELL_KNOWN, Reply(302, headers={"Location": "http://auth.example.test/x"}))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "insecure_transport"


def test_html_answer_is_not_json(canned: CannedServer) -> None:
    issuer = canned.base
    canned.set(WELL_KNOWN, Reply(body="<html>Sign in</html>", headers={"Content-Type": "text/html"}))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(issuer))
    assert caught.value.reason == "not_json" and "text/html" in str(caught.value)


def test_case_difference_names_the_value_to_set(canned: CannedServer) -> None:
    configured = canned.base + "/Realms/Pogly"
    reported = canned.base + "/realms/pogly"
    serve(canned, discovery_doc(reported, canned.base), path="/Realms/Pogly")
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(configured))
    assert "differ only by letter case" in str(caught.value)
    assert caught.value.suggested_value == reported


def test_unrelated_issuer(canned: CannedServer) -> None:
    serve(canned, discovery_doc("https://other.example.com/", canned.base))
    with pytest.raises(OidcConfigError) as caught:
        check(settings_for(canned.base))
    assert caught.value.reason == "issuer_mismatch" and "differ only" not in str(caught.value)


@pytest.mark.parametrize(("configured", "reported", "expected"), [
    ("https://a.example/x", "https://a.example/x/", ["a trailing slash"]),
    ("https://a.example/x/", "https://a.example/x", ["a trailing slash"]),
    ("https://A.example/x", "https://a.example/x", ["letter case"]),
    ("https://a.example:443/x", "https://a.example/x", ["an explicit default port"]),
    ("http://a.example:80", "http://a.example/", ["a trailing slash", "an explicit default port"]),
    ("https://a.example:8443/x", "https://a.example/x", None),
    ("https://a.example/x", "https://b.example/x", None),
])
def test_describe_issuer_difference(configured: str, reported: str, expected: list[str] | None) -> None:
    assert describe_issuer_difference(configured, reported) == expected


def test_logs_only_issuer_and_client_id_from_the_environment(canned: CannedServer) -> None:
    issuer = serve(canned)
    canned.set(WELL_KNOWN, Reply(500), Reply(body=discovery_doc(issuer, canned.base)))
    settings = settings_for(issuer, stream_name="secretstream", owner_subjects=("owner-sub",),
                            public_url="https://overlay.example.com")
    with structlog.testing.capture_logs() as events:
        check(settings, sleep=_no_wait)
    assert {e["event"] for e in events} == {"oidc.check", "oidc.retry", "oidc.verified"}
    for event in events:
        assert event["issuer"] == issuer and event["client_id"] == "pogly"
        text = repr(event)
        assert "secretstream" not in text and "owner-sub" not in text and "overlay.example" not in text


# --------------------------------------------------------------------------- redirect URIs


def test_redirect_uris_with_public_url() -> None:
    settings = settings_for("https://x", public_url="https://overlay.example.com")
    assert redirect_uris(settings) == [
        "https://overlay.example.com/callback",
        "https://overlay.example.com/",
        "https://overlay.example.com/silent-oidc-renew.html",
    ]
    assert redirect_uris_note(settings) is None


def test_redirect_uris_without_public_url() -> None:
    settings = settings_for("https://x")
    assert redirect_uris(settings) == ["/callback", "/", "/silent-oidc-renew.html"]
    assert "POGLY_PUBLIC_URL" in (redirect_uris_note(settings) or "")


# --------------------------------------------------------------------------- fetch.retrying


def test_retrying_draws_pauses_from_the_one_backoff_until_the_deadline() -> None:
    clock = FakeClock()
    retries: list[tuple[int, float]] = []

    async def always_503(attempt: int) -> None:
        raise fetch.Transient(f"HTTP 503 #{attempt}", retry_after=4.0 if attempt == 3 else None)

    with pytest.raises(fetch.Exhausted) as caught:
        asyncio.run(fetch.retrying(always_503, deadline=clock.now + 12.0, clock=clock, sleep=clock.sleep,
                                   on_retry=lambda n, exc, pause: retries.append((n, pause))))
    pauses = [pause for _, pause in retries]
    assert [n for n, _ in retries] == list(range(1, len(retries) + 1)) and len(retries) >= 4
    assert 0.5 <= pauses[0] <= 0.75 and 1.0 <= pauses[1] <= 1.5  # delays(0.5, 10, jitter=0.5)
    assert pauses[2] >= 4.0  # Retry-After wins over a shorter pause
    # The pauses fill the time to the deadline, the last one cut to leave the final attempt its moment.
    assert clock.sleeps == pauses and sum(pauses) == pytest.approx(12.0 - fetch.MIN_ATTEMPT_S)
    attempts = len(retries) + 1
    assert caught.value.attempts == attempts and str(caught.value.last) == f"HTTP 503 #{attempts}"


def test_retrying_stops_at_a_permanent_failure() -> None:
    calls: list[int] = []

    async def wrong(attempt: int) -> None:
        calls.append(attempt)
        raise OidcConfigError("nope", reason="http_status")

    with pytest.raises(OidcConfigError):
        asyncio.run(fetch.retrying(wrong, deadline=time.monotonic() + 60, clock=time.monotonic,
                                   sleep=_no_wait, on_retry=lambda *_: None))
    assert calls == [1]
