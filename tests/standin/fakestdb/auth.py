"""Identities, the server's ES256 key pair, local tokens and token validation (reference §5, §9).

Why hand-rolled ES256 for local tokens: the payload must serialize in exactly the field order and
compact form the real server emits (``hex_identity, sub, iss, aud, iat, exp``), and the stored
``jwt_payload`` of a connection is that exact string; the ``cryptography`` primitives are enough and
keep start-up fast.  Third-party (OIDC) tokens go through ``joserfc``, imported only when needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import blake3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from .common import CliError, os_error_text

LOCAL_ISSUER = "localhost"
OIDC_REFRESH_SECONDS = 300.0
OIDC_EXPIRY_SECONDS = 7200.0
EXP_LEEWAY_SECONDS = 60


def from_claims(issuer: str, subject: str) -> str:
    """``Identity::from_claims``: ``c200`` + 4-byte checksum + 26-byte hash of ``iss|sub``, as 64 hex."""
    id_hash = blake3.blake3(f"{issuer}|{subject}".encode()).digest()[:26]
    checksum = blake3.blake3(b"\xc2\x00" + id_hash).digest()[:4]
    return (b"\xc2\x00" + checksum + id_hash).hex()


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def compact_json(obj: Any) -> str:
    """serde_json's compact form (no spaces), which is what the real server signs."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class AuthFailure(Exception):
    """A token problem, carried to the HTTP layer with the status and body the real server uses."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


MALFORMED = "Authorization is invalid: malformed token"


@dataclass
class Caller:
    """Who is making a request: identity plus the token and its exact payload string."""

    identity: str
    token: str
    payload_json: str
    claims: dict[str, Any] = field(default_factory=dict)
    anonymous: bool = False


def _load_error(what: str, err: OSError | ValueError) -> CliError:
    cause = os_error_text(err) if isinstance(err, OSError) else str(err)
    return CliError(what, cause)


class ServerKeys:
    """The ES256 (P-256) key pair that signs local tokens; created only if both files are missing."""

    PUB_ERR = "Unable to read public key for JWT token verification"
    PRIV_ERR = "Unable to read private key for JWT token signing"

    def __init__(self, pub_path: str, priv_path: str) -> None:
        self.pub_path = pub_path
        self.priv_path = priv_path
        pub_exists = os.path.exists(pub_path)
        priv_exists = os.path.exists(priv_path)
        if not pub_exists and not priv_exists:
            self._generate()
        try:
            with open(pub_path, "rb") as f:
                self.public_pem = f.read()
            pub = serialization.load_pem_public_key(self.public_pem)
        except (OSError, ValueError) as err:
            raise _load_error(self.PUB_ERR, err) from None
        try:
            with open(priv_path, "rb") as f:
                priv = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise _load_error(self.PRIV_ERR, err if not isinstance(err, TypeError) else ValueError(err)) from None
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(priv, ec.EllipticCurvePrivateKey):
            raise CliError(self.PUB_ERR, "key is not an EC P-256 key")
        self.public_key: ec.EllipticCurvePublicKey = pub
        self.private_key: ec.EllipticCurvePrivateKey = priv

    def _generate(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        priv_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pub_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for path, data in ((self.priv_path, priv_pem), (self.pub_path, pub_pem)):
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(path, "wb") as f:  # default umask, like the real server
                f.write(data)

    # -- signing ---------------------------------------------------------------------------------

    def sign(self, payload: dict[str, Any]) -> str:
        header = b64url_encode(b'{"typ":"JWT","alg":"ES256"}')
        body = b64url_encode(compact_json(payload).encode())
        signing_input = f"{header}.{body}".encode()
        der = self.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{header}.{body}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify_signature(self, signing_input: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            self.public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def mint_local(self) -> tuple[str, str]:
        """A fresh ``localhost`` identity, like ``POST /v1/identity`` and anonymous requests."""
        sub = str(uuid.uuid4())
        ident = from_claims(LOCAL_ISSUER, sub)
        payload = {
            "hex_identity": ident,
            "sub": sub,
            "iss": LOCAL_ISSUER,
            "aud": ["spacetimedb"],
            "iat": int(time.time()),
            "exp": None,
        }
        return ident, self.sign(payload)

    def resign_short_lived(self, caller: Caller, seconds: int = 60) -> str:
        """``re_sign_with_expiry``: same iss/sub (so the same identity), ``aud: []``, other claims dropped."""
        now = int(time.time())
        payload = {
            "hex_identity": caller.identity,
            "sub": caller.claims["sub"],
            "iss": caller.claims["iss"],
            "aud": [],
            "iat": now,
            "exp": now + seconds,
        }
        return self.sign(payload)


@dataclass
class _ParsedToken:
    header: dict[str, Any]
    payload: dict[str, Any]
    payload_json: str
    signing_input: bytes
    signature: bytes


def parse_token(token: str) -> _ParsedToken:
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthFailure(400, MALFORMED)
    try:
        header = json.loads(b64url_decode(parts[0]))
        payload_bytes = b64url_decode(parts[1])
        payload_json = payload_bytes.decode("utf-8")
        payload = json.loads(payload_json)
        signature = b64url_decode(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AuthFailure(400, MALFORMED) from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise AuthFailure(400, MALFORMED)
    return _ParsedToken(header, payload, payload_json, f"{parts[0]}.{parts[1]}".encode(), signature)


def _token_error(kind: str) -> AuthFailure:
    return AuthFailure(401, f"TokenError(Error({kind}))")


def check_claims(payload: dict[str, Any]) -> str:
    """Validate the registered claims the real server checks; return the identity hex."""
    for name in ("sub", "iss"):
        value = payload.get(name)
        if not isinstance(value, str):
            raise _token_error(f'MissingRequiredClaim("{name}")')
        if not value or len(value.encode()) > 128:
            raise AuthFailure(401, f"TokenError(Other(`{name}` must be 1..=128 bytes))")
    if not isinstance(payload.get("iat"), int | float) or isinstance(payload.get("iat"), bool):
        raise AuthFailure(401, 'TokenError(Error(Json(Error("missing field `iat`"))))')
    exp = payload.get("exp")
    if exp is not None:
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthFailure(401, 'TokenError(Error(Json(Error("invalid type for `exp`"))))')
        if time.time() > exp + EXP_LEEWAY_SECONDS:
            raise _token_error("ExpiredSignature")
    ident = from_claims(payload["iss"], payload["sub"])
    claimed = payload.get("hex_identity")
    if claimed is not None and (not isinstance(claimed, str) or claimed.lower() != ident):
        raise AuthFailure(401, f"Identity mismatch: token claims {claimed} but iss/sub give {ident}")
    return ident


class TokenValidator:
    """Local key first (any issuer); then, unless ``iss == localhost``, the issuer's OIDC JWKS."""

    def __init__(self, keys: ServerKeys) -> None:
        self.keys = keys
        self._jwks_cache: dict[str, tuple[float, dict[str, Any]]] = {}

    async def validate(self, token: str) -> Caller:
        parsed = parse_token(token)
        iss = parsed.payload.get("iss")
        local_error: AuthFailure | None = None
        if parsed.header.get("alg") != "ES256":
            local_error = _token_error("InvalidAlgorithm")
        elif not self.keys.verify_signature(parsed.signing_input, parsed.signature):
            local_error = _token_error("InvalidSignature")
        if local_error is None:
            try:
                ident = check_claims(parsed.payload)
            except AuthFailure as err:
                local_error = err
            else:
                return Caller(ident, token, parsed.payload_json, parsed.payload)
        if iss == LOCAL_ISSUER or not isinstance(iss, str) or not iss:
            raise local_error
        await self._verify_oidc(token, parsed, iss)
        ident = check_claims(parsed.payload)
        return Caller(ident, token, parsed.payload_json, parsed.payload)

    async def _fetch_jwks(self, issuer: str, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._jwks_cache.get(issuer)
        if cached and not force and now - cached[0] < OIDC_REFRESH_SECONDS:
            return cached[1]
        import httpx  # lazy: only third-party tokens need it

        base = issuer.rstrip("/")
        try:
            async with httpx.AsyncClient(timeout=10.0, follow_redirects=True) as client:
                disc = await client.get(f"{base}/.well-known/openid-configuration")
                disc.raise_for_status()
                jwks_uri = disc.json()["jwks_uri"]
                resp = await client.get(jwks_uri)
                resp.raise_for_status()
                jwks = resp.json()
            if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                raise ValueError("JWKS document has no `keys` list")
        except Exception as err:
            if cached and now - cached[0] < OIDC_EXPIRY_SECONDS:
                return cached[1]
            raise AuthFailure(
                401, f"TokenError(Other(Error fetching public key for issuer {issuer}: {err}))"
            ) from None
        self._jwks_cache[issuer] = (now, jwks)
        return jwks

    async def _verify_oidc(self, token: str, parsed: _ParsedToken, issuer: str) -> None:
        from joserfc import jws
        from joserfc.errors import JoseError
        from joserfc.jwk import import_key

        alg = parsed.header.get("alg")
        if alg not in ("RS256", "ES256", "HS256"):
            raise _token_error("InvalidAlgorithm")
        kid = parsed.header.get("kid")
        jwks = await self._fetch_jwks(issuer)
        keys = [k for k in jwks["keys"] if isinstance(k, dict)]
        if kid is not None:
            keys = [k for k in keys if k.get("kid") == kid]
            if not keys:
                jwks = await self._fetch_jwks(issuer, force=True)
                keys = [k for k in jwks["keys"] if isinstance(k, dict) and k.get("kid") == kid]
            if not keys:
                raise AuthFailure(401, "TokenError(Other(Specified key ID not found in JWKs))")
        for key_dict in keys:
            try:
                key = import_key(key_dict)
                jws.deserialize_compact(token, key, algorithms=[alg])
            except (JoseError, ValueError, TypeError, KeyError, NotImplementedError):
                continue  # wrong key, or a key type joserfc cannot use: try the next one
            return
        raise _token_error("InvalidSignature")
