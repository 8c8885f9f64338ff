"""Hostile log content: what a client or a child prints cannot blind, forge or leak through our log.

Issue 13, faults 1 and 5.  The whole-program test runs the entrypoint with the
SpacetimeDB stand-in and real Caddy; the rest drive ``entrypoint.logs`` the way
``Service`` does (redactor → decode → child_event → emit) into a JSON or a
console stream.  Issue 14: a child's line is always ``event="child.output"``
with its text in ``message``, so a child cannot log under one of our names.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import string
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrypoint import logs
from tests.harness import Running, base_env
from tests.reliability.support import get

KEY_HEADER = "-----BEGIN EC PRIVATE KEY-----"


def _access(run: Running, uri: str) -> list[dict[str, Any]]:
    return run.find(lambda e: e.get("service") == "caddy" and e.get("event") == "child.output"
                    and e.get("message") == "handled request"
                    and e.get("child_fields", {}).get("request", {}).get("uri") == uri)


def test_key_marker_in_a_request_header_does_not_blind_the_caddy_log(tmp_path: Path) -> None:
    """An anonymous ``User-Agent: -----BEGIN EC PRIVATE KEY-----`` used to hide every later Caddy line."""
    env = base_env(tmp_path)
    port = int(env["POGLY_HTTP_PORT"])
    with Running(env) as run:
        run.wait_event("entrypoint.ready", timeout=60)
        status, _ = asyncio.run(get(port, "/hostile", headers={"User-Agent": KEY_HEADER}))
        assert status == 200
        run.wait_event("child.output", timeout=20, service="caddy", message="handled request")
        for n in range(3):
            assert asyncio.run(get(port, f"/after-{n}"))[0] == 200
        for n in range(3):
            assert _wait(lambda n=n: _access(run, f"/after-{n}")), f"access log line for /after-{n} missing"
        hostile = _access(run, "/hostile")
        assert len(hostile) == 1
        agent = hostile[0]["child_fields"]["request"]["headers"]["User-Agent"]
        assert agent == [logs.PEM_REDACTED]  # the header itself is redacted, nothing else is hidden
        assert not run.find(lambda e: e.get("event") == "logs.key_redacted")
        run.signal(signal.SIGTERM)
        assert run.wait() == 0
    shutdown = [e for e in run.events if e.get("service") == "caddy" and "shut" in str(e.get("message")).lower()]
    assert shutdown, "Caddy's own shutdown lines are missing from the log"
    assert KEY_HEADER not in "\n".join(run.raw)


def _wait(predicate: Any, timeout: float = 20.0) -> Any:
    from tests.harness import wait_for

    return wait_for(predicate, timeout, "a log line")


# -- the pipeline a child line goes through, into a JSON stream ------------------------------------

JWT = ("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhYmMiLCJpc3MiOiJsb2NhbGhvc3QifQ."
       "MEUCIQDx3y2vP5u7bKq0zFZ")


def _through_a_child(lines: list[str], service: str = "caddy", fmt: str = "json") -> str:
    """Every line as a child's stdout, then one of our own events carrying the same text."""
    out = io.StringIO()
    logs.configure(fmt, stream=out)
    redactor = logs.LineRedactor(service, "stdout")
    for line in lines:
        text = redactor(logs.decode_line(line.encode("utf-8", "surrogatepass")))
        if text is None:
            continue
        level, fields = logs.child_event(service, "stdout", text)
        fields["pid"] = 42
        logs.emit(level, fields)
    logs.get().info("thing.happened", detail="\n".join(lines))
    return out.getvalue()


def test_jwt_after_a_word_character_is_redacted() -> None:
    for text in (f"session_{JWT}", f"GET /?q=%22{JWT}%22", f"X-Session: sid_{JWT}", f"a{JWT}b"):
        out = _through_a_child([text])
        assert JWT not in out and JWT.split(".")[2] not in out, text


def test_jwt_as_a_json_key_and_token_in_a_python_dict_are_redacted() -> None:
    out = _through_a_child([json.dumps({"msg": "hello", JWT: "value", "nested": {JWT: 1}}),
                            "{'token': 's3cr3tvalue', 'password': 'hunter22'}",
                            json.dumps({"msg": "x", "token": "opaque-secret-1",
                                        "headers": {"Cookie": ["session-cookie-1"]}})])
    for secret in (JWT, "s3cr3tvalue", "hunter22", "opaque-secret-1"):
        assert secret not in out, secret
    child = [json.loads(x) for x in out.splitlines() if '"service": "caddy"' in x]
    assert child[2]["child_fields"]["headers"]["Cookie"] == [logs.REDACTED]  # a secret by its field name


OUR_CHILD_KEYS = {"ts", "level", "event", "service", "stream", "pid", "message", "child_fields"}


def test_child_cannot_forge_our_events_or_keys() -> None:
    forged = json.dumps({"level": "info", "msg": "entrypoint.exit", "exit_code": 0, "service": "entrypoint",
                         "ts": "2020-01-01T00:00:00Z", "stream": "x", "pid": 1, "exc_info": True,
                         "event": "entrypoint.exit", "child_fields": {"x": 1}})
    lines = [json.loads(x) for x in _through_a_child(
        [forged, "child.started", forged.replace('"msg"', '"message"'), json.dumps({"event": "child.ready"})])
        .splitlines()]
    children = [e for e in lines if e["event"] != "thing.happened"]
    assert len(children) == 4
    for e in children:
        assert e["event"] == "child.output"  # whatever the child said, never one of our event names
        assert e["service"] == "caddy" and e["stream"] == "stdout" and e["pid"] == 42
        assert set(e) <= OUR_CHILD_KEYS, set(e) - OUR_CHILD_KEYS
        assert e["ts"] != "2020-01-01T00:00:00Z"
    assert [e["message"] for e in children] == ["entrypoint.exit", "child.started", "entrypoint.exit", "child.ready"]
    assert children[0]["child_fields"]["exit_code"] == 0
    assert children[0]["child_fields"]["service"] == "entrypoint"
    assert children[0]["child_fields"]["child_fields"] == {"x": 1}


CONSOLE_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\w+) +(\S+) +(.*)")


def test_child_cannot_forge_a_console_line_of_ours() -> None:
    """A child's text is a line's text column only; a carriage return or form feed in it cannot start a line."""
    fake = "2020-01-01T00:00:00.000Z info    entrypoint   entrypoint.exit  exit_code=0"
    out = _through_a_child([f"x\r{fake}", f"y\x0c{fake}", f"z\u2028{fake}", json.dumps({"msg": f"w\n{fake}"})],
                           fmt="console").splitlines()
    heads = [m.groups()[:2] for line in out if (m := CONSOLE_LINE.match(line))]
    assert heads == [("info", "caddy")] * 4 + [("info", "entrypoint")]  # the last: our thing.happened
    assert all(line.startswith(" ") for line in out if not CONSOLE_LINE.match(line))
    assert not [line for line in out if line.lstrip().startswith("2020-") and not line.startswith(" ")]


def test_a_key_block_ends_at_a_line_that_cannot_be_key_material() -> None:
    out = [json.loads(x) for x in _through_a_child(
        ["2025 INFO printing -----BEGIN PRIVATE KEY-----", "MIGHAgEAMBMGByqGSM49AgEG", "2025 INFO next line",
         "still shown"]).splitlines()]
    messages = [e.get("message") for e in out if e["event"] == "child.output"]
    assert "2025 INFO next line" in messages and "still shown" in messages
    assert "MIGHAgEAMBMGByqGSM49AgEG" not in json.dumps(out)
    marker = [e for e in out if e["event"] == "logs.key_redacted"]
    assert marker and marker[0]["lines"] == 1 and marker[0]["child"] == "caddy"


def test_a_key_block_is_bounded() -> None:
    body = ["QUJD" * 16] * 50
    redactor = logs.LineRedactor(max_lines=10)
    shown = [redactor(line) for line in ["-----BEGIN PRIVATE KEY-----", *body, "later"]]
    assert shown[-1] == "later" and shown[1:11] == [None] * 10 and shown[11] == body[0]


# -- property: whatever surrounds it, a token or key never reaches the output ----------------------

_b64url = st.binary(min_size=1, max_size=48).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="))
_claims = st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8),
                          st.one_of(st.text(max_size=12), st.integers()), min_size=1, max_size=4)


@st.composite
def jwts(draw: st.DrawFn) -> str:
    header = {"alg": draw(st.sampled_from(["ES256", "RS256", "HS256", "none"])), **draw(_claims)}
    payload = draw(_claims)

    def enc(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")

    return f"{enc(header)}.{enc(payload)}.{draw(_b64url) if header['alg'] != 'none' else ''}"


@st.composite
def private_keys(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A PEM private key (BEGIN, 64-column base64 lines, END) and its body lines."""
    kind = draw(st.sampled_from(["", "EC ", "RSA ", "OPENSSH ", "ENCRYPTED "]))
    der = draw(st.binary(min_size=24, max_size=600))
    b64 = base64.b64encode(der).decode()
    body = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {kind}PRIVATE KEY-----", *body, f"-----END {kind}PRIVATE KEY-----"]), body


_noise = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=40)
_glue = st.sampled_from(["", " ", "_", "%22", "=", "\"", "'", ":", "/", "\n", "{\"x\": \"", "Bearer "])


_formats = st.sampled_from(["json", "console"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=_noise, glue1=_glue, token=jwts(), glue2=_glue, after=_noise, fmt=_formats)
def test_no_jwt_ever_reaches_the_output(before: str, glue1: str, token: str, glue2: str, after: str,
                                        fmt: str) -> None:
    text = before + glue1 + token + glue2 + after
    out = _through_a_child(text.split("\n"), fmt=fmt)
    signature = token.rsplit(".", 1)[1]
    assert token not in out
    assert len(signature) < 8 or signature not in out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=_noise, glue1=_glue, key=private_keys(), glue2=_glue, after=_noise,
       escaped=st.booleans(), fmt=_formats)
def test_no_private_key_ever_reaches_the_output(before: str, glue1: str, key: tuple[str, list[str]], glue2: str,
                                                after: str, escaped: bool, fmt: str) -> None:
    pem, body = key
    if escaped:  # the key inside one line, newlines escaped (a JSON value, a repr)
        pem = pem.replace("\n", "\\n")
    text = before + glue1 + pem + glue2 + after
    out = _through_a_child(text.split("\n"), fmt=fmt)
    for line in body:
        assert len(line) < 16 or line not in out, line
