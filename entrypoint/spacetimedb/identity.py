"""SpacetimeDB identities: derive them from token claims and parse their spellings.

Why we compute identities ourselves: SpacetimeDB derives a caller's identity
from the token's ``iss`` and ``sub`` only (not from the signing key), so the
entrypoint can name the identity an OIDC user *will* have before they ever
connect, and can check that a connection's ``hex_identity`` really belongs to
the issuer/subject it claims.  The derivation (reference §5) is:

* ``id_hash``  = first 26 bytes of BLAKE3(``"<issuer>|<subject>"``)
* ``checksum`` = first 4 bytes of BLAKE3(``0xc2 0x00`` + ``id_hash``)
* identity     = ``0xc2 0x00`` + ``checksum`` + ``id_hash`` (32 bytes, big-endian)

Identities travel as 64 lowercase hex digits without prefix in URLs and JSON,
but SQL results and the CLI show ``0x…`` and SQL literals may be ``X'…'``;
:func:`normalize_hex` accepts all of them so comparisons never depend on the
spelling.
"""

from __future__ import annotations

import re

from blake3 import blake3

IDENTITY_TAG = b"\xc2\x00"
_ID_HASH_LEN = 26
_CHECKSUM_LEN = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")


def from_claims(issuer: str, subject: str) -> str:
    """The identity SpacetimeDB assigns to a token with these ``iss`` and ``sub``.

    Returns 64 lowercase hex digits (no ``0x``), the form used in URLs and in
    the ``hex_identity`` claim.  The strings are used exactly as given: an
    issuer with and without a trailing slash are two different identities.
    """
    id_hash = blake3(f"{issuer}|{subject}".encode()).digest()[:_ID_HASH_LEN]
    checksum = blake3(IDENTITY_TAG + id_hash).digest()[:_CHECKSUM_LEN]
    return (IDENTITY_TAG + checksum + id_hash).hex()


def normalize_hex(value: str) -> str:
    """``0xC200…``, ``X'c200…'``, ``"c200…"`` → ``c200…`` (64 lowercase hex).

    Raises ``ValueError`` for anything that is not exactly 32 bytes of hex, so
    a truncated or garbled identity is never compared as if it were valid.
    """
    text = value.strip()
    if len(text) >= 3 and text[0] in "xX" and text[1] == "'" and text[-1] == "'":
        text = text[2:-1]
    elif text[:2] in ("0x", "0X"):
        text = text[2:]
    text = text.lower()
    if not _HEX64.fullmatch(text):
        raise ValueError(f"not a SpacetimeDB identity (64 hex digits): {value!r}")
    return text
