"""The pieces of a browser's code flow + PKCE sign-in, for tests that drive the provider over HTTP.

Shared by the provider's own tests (which assert every step) and the
ownership tests (which only need the id token at the end).  ``APP_ORIGIN`` is
the redirect origin ``oidc_server.mjs`` registers by default; nothing serves
it, so following redirects stops there and the callback URL is read instead.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

import httpx

APP_ORIGIN = "http://127.0.0.1:8080"


def pkce() -> tuple[str, str]:
    """A PKCE ``(code_verifier, code_challenge)`` pair (S256)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def follow_to_app(client: httpx.Client, response: httpx.Response) -> httpx.Response:
    """Follow the provider's redirects by hand, stopping at the app's (unserved) origin."""
    for _ in range(10):
        if not response.is_redirect:
            return response
        target = str(response.url.join(response.headers["location"]))
        if target.startswith(APP_ORIGIN):
            return response
        response = client.get(target)
    raise AssertionError("too many redirects")
