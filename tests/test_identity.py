"""Identity derivation must match SpacetimeDB bit for bit, or ownership checks compare wrong values."""

from __future__ import annotations

import pytest

from entrypoint.spacetimedb import identity

VECTOR_ISS = "localhost"
VECTOR_SUB = "c609bdb5-0025-4c6d-b2e9-8f28103b35e3"
VECTOR_ID = "c2001574a028244c76a5152554c3cfc1bb6b376e668be5b86314002adf932aee"


def test_reference_test_vector() -> None:
    assert identity.from_claims(VECTOR_ISS, VECTOR_SUB) == VECTOR_ID


def test_shape_and_tag() -> None:
    value = identity.from_claims("https://auth.example.com/application/o/pogly/", "user-1")
    assert len(value) == 64
    assert value == value.lower()
    assert value.startswith("c200")


def test_issuer_is_compared_exactly() -> None:
    with_slash = identity.from_claims("https://auth.example.com/realms/pogly/", "u")
    without = identity.from_claims("https://auth.example.com/realms/pogly", "u")
    assert with_slash != without


def test_separator_is_part_of_the_hash() -> None:
    # "a|b" + "c" and "a" + "b|c" hash the same input: the derivation is what it is, document it.
    assert identity.from_claims("a|b", "c") == identity.from_claims("a", "b|c")
    assert identity.from_claims("a", "bc") != identity.from_claims("ab", "c")


def test_checksum_bytes() -> None:
    from blake3 import blake3

    raw = bytes.fromhex(VECTOR_ID)
    assert raw[:2] == b"\xc2\x00"
    assert blake3(raw[:2] + raw[6:]).digest()[:4] == raw[2:6]


@pytest.mark.parametrize(
    "spelling",
    [
        VECTOR_ID,
        VECTOR_ID.upper(),
        "0x" + VECTOR_ID,
        "0X" + VECTOR_ID.upper(),
        f"X'{VECTOR_ID}'",
        f"x'{VECTOR_ID}'",
        f"  0x{VECTOR_ID}\n",
    ],
)
def test_normalize_hex_accepts_every_spelling(spelling: str) -> None:
    assert identity.normalize_hex(spelling) == VECTOR_ID


@pytest.mark.parametrize(
    "bad",
    ["", "0x", VECTOR_ID[:-1], VECTOR_ID + "0", "g" * 64, f"X'{VECTOR_ID}", "0x0x" + VECTOR_ID[4:]],
)
def test_normalize_hex_rejects_non_identities(bad: str) -> None:
    with pytest.raises(ValueError):
        identity.normalize_hex(bad)
