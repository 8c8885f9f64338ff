"""Log formatting: child lines become events, secrets never reach the output."""

from __future__ import annotations

import io
import json

from entrypoint import logs

JWT = ("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhYmMiLCJpc3MiOiJsb2NhbGhvc3QifQ."
       "MEUCIQDx3y2vP5u7bKq0zFZ")


def test_redacts_jwt_bearer_and_token_pairs() -> None:
    line = f"got token {JWT} and Authorization: Bearer abcdefghijkl and spacetimedb_token = \"s3cr3tvalue\""
    out = logs.redact(line)
    assert JWT not in out and "abcdefghijkl" not in out and "s3cr3tvalue" not in out
    assert out.count(logs.REDACTED) == 3


def test_multiline_private_key_is_hidden_entirely() -> None:
    red = logs.LineRedactor()
    lines = ["before", "-----BEGIN PRIVATE KEY-----", "MIGHAgEAMBMGByqGSM49AgEG", "-----END PRIVATE KEY-----",
             "after"]
    out = [red(line) for line in lines]
    assert out[0] == "before" and out[-1] == "after"
    assert out[2] is None and out[3] is None and "REDACTED" in (out[1] or "")


def test_caddy_json_line_keeps_its_fields_under_child_fields() -> None:
    # Was "merged": Caddy's fields at the top level, where a child could set keys of ours
    # (exit_code, event…).  Issue 13: a child's own fields are kept under child_fields.
    line = json.dumps({"level": "warn", "ts": 1.5, "logger": "http", "msg": "server running", "name": "srv0"})
    level, fields = logs.child_event("caddy", "stderr", line)
    assert level == "warning"
    assert fields == {"service": "caddy", "stream": "stderr", "event": "server running",
                      "child_fields": {"ts": 1.5, "logger": "http", "name": "srv0"}}


def test_our_helper_lines_stay_our_events() -> None:
    line = json.dumps({"ts": "t", "level": "info", "event": "oidc.verified", "service": "entrypoint", "issuer": "i"})
    level, fields = logs.child_event("oidc", "stderr", line)
    assert (level, fields["event"], fields["issuer"]) == ("info", "oidc.verified", "i")
    assert fields["service"] == "oidc" and fields["child_fields"] == {"ts": "t"}


def test_plain_line_level_is_guessed() -> None:
    assert logs.child_event("spacetimedb", "stdout", "2025-01-01T00:00:00 ERROR boom")[0] == "error"
    assert logs.child_event("spacetimedb", "stderr", "Error: cannot take lock")[0] == "error"
    assert logs.child_event("spacetimedb", "stdout", "hello")[0] == "info"


def test_json_output_has_ts_level_event_service_and_is_redacted() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    logs.get().info("thing.happened", token=JWT, detail=f"Bearer {JWT}")
    logs.emit("info", {"service": "caddy", "stream": "stderr", "event": f"line with {JWT}"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "thing.happened" and first["level"] == "info" and first["service"] == "entrypoint"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert JWT not in out.getvalue()
    assert second["service"] == "caddy"


def test_debug_level_filtering() -> None:
    out = io.StringIO()
    logs.configure("json", debug=False, stream=out)
    logs.get().debug("hidden")
    logs.configure("json", debug=True, stream=out)
    logs.get().debug("shown")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["shown"]
