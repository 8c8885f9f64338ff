"""Log formatting: child lines become ``child.output`` events, secrets never reach the output,
``LOG_FORMAT=console`` is for people, ``LOG_LEVEL`` sets our verbosity (issue 14 item 6)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import select
import signal
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from entrypoint import logs
from entrypoint.web.caddy import READY_MSG
from tests.harness import Running, base_env, wait_for

JWT = ("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhYmMiLCJpc3MiOiJsb2NhbGhvc3QifQ."
       "MEUCIQDx3y2vP5u7bKq0zFZ")
CONSOLE_HEAD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (\w+) +(\S+) +(.*)$")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _child(service: str, text: str, stream: str = "stderr", pid: int = 7) -> None:
    level, fields = logs.child_event(service, stream, text)
    fields["pid"] = pid
    logs.emit(level, fields)


# -- redaction ----------------------------------------------------------------------------------------

def test_redacts_jwt_bearer_and_token_pairs() -> None:
    line = f"got token {JWT} and Authorization: Bearer abcdefghijkl and spacetimedb_token = \"s3cr3tvalue\""
    out = logs.redact(line)
    assert JWT not in out and "abcdefghijkl" not in out and "s3cr3tvalue" not in out
    assert out.count(logs.REDACTED) == 3


def test_case_insensitive_patterns_see_unicode_case_folds() -> None:
    # Python's (?i) matches "ſ" (long s) as "s" and "K" (Kelvin) as "k": such text skips the ASCII fast path.
    for text in ("ſecret=hunter2222", "to\u212aen=abcdefgh", "BEARER abcdefghijkl", "Bearer abcdefghijkl",
                 "PASSWORD: longenough"):
        assert logs.REDACTED in logs.redact(text), text


def _reference_redact(text: str) -> str:
    """``redact`` without any fast path: every pattern, every time."""
    text = logs._PEM_BLOCK.sub(logs.PEM_REDACTED, text)
    text = logs._JWT.sub(logs.REDACTED, text)
    text = logs._BEARER.sub(lambda m: f"{m.group(1)} {logs.REDACTED}", text)
    return logs._KV_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{logs.REDACTED}", text)


_pieces = st.sampled_from(["bearer ", "Bearer\t", "BEARER  ", "token", "TOKEN", "ToKeN", "secret", "SeCrEt",
                           "password", "PASSWORD", "client_secret", "id_token", "=", ": ", "'", '"', " ",
                           "abcdefgh12345", "x", "ſ", "\u212a", "eyJ", JWT, "-----BEGIN PRIVATE KEY-----",
                           "-----END PRIVATE KEY-----", "é", "\n"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=12).map("".join))
def test_fast_path_redacts_exactly_what_every_pattern_would(text: str) -> None:
    assert logs.redact(text) == _reference_redact(text)


def test_multiline_private_key_is_hidden_entirely() -> None:
    red = logs.LineRedactor()
    lines = ["before", "-----BEGIN PRIVATE KEY-----", "MIGHAgEAMBMGByqGSM49AgEG", "-----END PRIVATE KEY-----",
             "after"]
    out = [red(line) for line in lines]
    assert out[0] == "before" and out[-1] == "after"
    assert out[2] is None and out[3] is None and "REDACTED" in (out[1] or "")


# -- a child's line: event "child.output", its text in "message" ---------------------------------------

def test_caddy_json_line_keeps_its_fields_under_child_fields() -> None:
    # Was "merged": Caddy's fields at the top level, where a child could set keys of ours
    # (exit_code, event…).  Issue 13: a child's own fields are kept under child_fields.
    # Issue 14: its text is the message; the event is always child.output.
    line = json.dumps({"level": "warn", "ts": 1.5, "logger": "http", "msg": "server running", "name": "srv0"})
    level, fields = logs.child_event("caddy", "stderr", line)
    assert level == "warning"
    assert fields == {"service": "caddy", "stream": "stderr", "event": "child.output", "message": "server running",
                      "child_fields": {"ts": 1.5, "logger": "http", "name": "srv0"}}


def test_plain_line_is_child_output_with_its_text_as_message() -> None:
    level, fields = logs.child_event("spacetimedb", "stdout", "2025-01-01T00:00:00  INFO starting up")
    assert level == "info"
    assert fields == {"service": "spacetimedb", "stream": "stdout", "event": logs.CHILD_OUTPUT,
                      "message": "2025-01-01T00:00:00  INFO starting up"}
    # shaped like one of our event names: still only a message
    assert logs.child_event("caddy", "stdout", "entrypoint.exit")[1]["event"] == "child.output"


def test_our_helper_lines_stay_our_events() -> None:
    line = json.dumps({"ts": "t", "level": "info", "event": "oidc.verified", "service": "entrypoint", "issuer": "i"})
    level, fields = logs.child_event("oidc", "stderr", line)
    assert (level, fields["event"], fields["issuer"]) == ("info", "oidc.verified", "i")
    assert fields["service"] == "oidc" and fields["child_fields"] == {"ts": "t"}
    # a helper's plain text (say, a traceback) is that helper's output, not an event name
    assert logs.child_event("oidc", "stderr", "Traceback (most recent call last):")[1]["event"] == "child.output"


def test_plain_line_level_is_guessed() -> None:
    assert logs.child_event("spacetimedb", "stdout", "2025-01-01T00:00:00 ERROR boom")[0] == "error"
    assert logs.child_event("spacetimedb", "stderr", "Error: cannot take lock")[0] == "error"
    assert logs.child_event("spacetimedb", "stdout", "hello")[0] == "info"


def test_json_output_has_ts_level_event_service_and_is_redacted() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    logs.get().info("thing.happened", token=JWT, detail=f"Bearer {JWT}")
    _child("caddy", f"line with {JWT}")
    first, second = _json_lines(out)
    assert first["event"] == "thing.happened" and first["level"] == "info" and first["service"] == "entrypoint"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert JWT not in out.getvalue()
    assert second["service"] == "caddy" and second["event"] == "child.output"
    assert second["message"] == f"line with {logs.REDACTED}"


def test_child_line_in_json_has_our_keys_first_and_its_own_fields_last() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    _child("caddy", json.dumps({"level": "info", "ts": 1.5, "logger": "http.log", "msg": "handled request",
                                "request": {"uri": "/x", "headers": {"Authorization": ["Bearer abcdefghijkl"]}}}))
    (line,) = _json_lines(out)
    assert list(line) == ["ts", "level", "event", "service", "stream", "pid", "message", "child_fields"]
    assert (line["event"], line["service"], line["message"], line["pid"]) == ("child.output", "caddy",
                                                                              "handled request", 7)
    assert line["child_fields"]["request"]["headers"]["Authorization"] == [logs.REDACTED]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["ts"])


def test_deeply_nested_json_from_a_child_is_relayed_as_text() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out)
    deep = '{"a":' * 5000 + "1" + "}" * 5000  # deeper than Python's parser goes: the line is plain text
    _child("caddy", deep)
    (line,) = _json_lines(out)
    assert line["event"] == "child.output" and line["message"] == deep and "child_fields" not in line


# -- console ----------------------------------------------------------------------------------------------

def test_console_puts_time_first_then_level_service_and_event_or_text() -> None:
    out = io.StringIO()
    logs.configure("console", stream=out)
    logs.get().info("child.started", child="caddy", pid=12, argv=["caddy", "run"])
    _child("spacetimedb", "2026-01-01T00:00:00  INFO Starting SpacetimeDB listening on 127.0.0.1:3000")
    _child("caddy", json.dumps({"level": "info", "msg": "serving initial configuration", "logger": "http"}))
    ours, stdb, caddy = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # not a terminal: no colour
    assert CONSOLE_HEAD.match(ours).groups() == ("info", "entrypoint",
                                                 'child.started  child=caddy  pid=12  argv=["caddy", "run"]')
    assert CONSOLE_HEAD.match(stdb).groups() == (
        "info", "spacetimedb", "2026-01-01T00:00:00  INFO Starting SpacetimeDB listening on 127.0.0.1:3000")
    assert CONSOLE_HEAD.match(caddy).groups() == ("info", "caddy", "serving initial configuration  logger=http")
    assert "child.output" not in out.getvalue()  # a person reads the child's text, not our event name


def test_console_renders_a_multiline_message_as_indented_redacted_lines() -> None:
    out = io.StringIO()
    logs.configure("console", stream=out)
    logs.get().error("config.invalid", message=f"2 problems:\n  OIDC_ISSUER: bad\n  token={JWT}", exit_code=78)
    first, *rest = out.getvalue().splitlines()
    assert CONSOLE_HEAD.match(first).groups() == ("error", "entrypoint", "config.invalid  2 problems:")
    indent = len(first) - len(CONSOLE_HEAD.match(first).group(3))  # continuation lines start under the text
    assert [line[:indent].strip() for line in rest] == ["", ""]
    assert [line[indent:] for line in rest] == ["  OIDC_ISSUER: bad", f"  token={logs.REDACTED}  exit_code=78"]
    assert JWT not in out.getvalue()


def test_console_multiline_private_key_is_redacted_on_every_line() -> None:
    out = io.StringIO()
    logs.configure("console", stream=out)
    body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"
    logs.get().warning("thing.happened", detail=f"key:\n-----BEGIN PRIVATE KEY-----\n{body}\n"
                                                "-----END PRIVATE KEY-----\nafter")
    text = out.getvalue()
    assert body not in text and logs.PEM_REDACTED in text and text.splitlines()[-1].strip() == "after"


def test_console_colours_only_on_a_terminal() -> None:
    tty = _Tty()
    logs.configure("console", stream=tty)
    logs.get().warning("thing.happened")
    _child("caddy", "plain")
    assert tty.getvalue().count("\x1b[33mwarning") == 1 and "\x1b[0m" in tty.getvalue()
    auto = _Tty()
    logs.configure("auto", stream=auto)  # auto on a terminal: console, in colour
    logs.get().info("thing.happened")
    assert CONSOLE_HEAD.match(re.sub(r"\x1b\[[0-9;]*m", "", auto.getvalue()))


# -- LOG_LEVEL and DEBUG_MODE -------------------------------------------------------------------------------

def _levels_shown(level: str = "", debug: bool = False) -> list[str]:
    out = io.StringIO()
    logs.configure("json", debug=debug, stream=out, level=level)
    log = logs.get()
    log.debug("our.debug")
    log.info("our.info")
    log.warning("our.warning")
    log.error("our.error")
    return [e["event"] for e in _json_lines(out)]


def test_log_level_sets_our_verbosity() -> None:
    assert _levels_shown() == ["our.info", "our.warning", "our.error"]  # the seed: info
    assert _levels_shown("info") == ["our.info", "our.warning", "our.error"]  # debug hidden
    assert _levels_shown("warning") == ["our.warning", "our.error"]
    assert _levels_shown("debug") == ["our.debug", "our.info", "our.warning", "our.error"]
    assert _levels_shown("ERROR") == ["our.error"]


def test_debug_mode_alone_still_gives_debug_and_log_level_wins_over_it() -> None:
    assert _levels_shown(debug=True) == ["our.debug", "our.info", "our.warning", "our.error"]
    assert _levels_shown("error", debug=True) == ["our.error"]
    assert _levels_shown("info", debug=True) == ["our.info", "our.warning", "our.error"]
    assert logs.resolve_level("", True) == "debug" and logs.resolve_level("warning", True) == "warning"


def test_log_level_never_filters_a_childs_lines() -> None:
    out = io.StringIO()
    logs.configure("json", stream=out, level="error")
    _child("spacetimedb", "2026-01-01T00:00:00 DEBUG spacetimedb: a debug line")
    _child("caddy", json.dumps({"level": "info", "msg": "an info line"}))
    logs.get().info("our.info")
    assert [(e["level"], e["message"]) for e in _json_lines(out)] == [
        ("debug", "2026-01-01T00:00:00 DEBUG spacetimedb: a debug line"), ("info", "an info line")]


# -- the writer: lines of one loop callback go out together, in order, none lost ---------------------------

def test_lines_written_in_one_loop_callback_all_arrive_in_order() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    logs.configure("json", stream=stream)
    got = bytearray()

    async def burst() -> None:
        for n in range(600):  # ~90 KB: more than one batch, far less than the pending limit
            _child("spacetimedb", f"line {n:04d}")
            if n % 100 == 0:  # the reader keeps up, as a log collector does
                got.extend(_read_all(read_end))
        await asyncio.sleep(0)  # the end of the callback: what waits is written

    asyncio.run(burst())
    got.extend(_read_all(read_end))
    messages = [json.loads(x)["message"] for x in got.decode().splitlines()]
    assert messages == [f"line {n:04d}" for n in range(600)]
    assert logs._sinks[0].dropped == 0
    stream.close()
    os.close(read_end)


def test_each_write_to_a_pipe_holds_whole_lines(monkeypatch: Any) -> None:
    """One write() of at most PIPE_BUF bytes is atomic: a line `owner set` writes into our stdout never splits ours."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    logs.configure("json", stream=stream)
    writes: list[bytes] = []
    real_write = os.write

    def recording(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", recording)

    async def burst() -> None:
        for n in range(150):  # lines of uneven length, ~30 KB (less than a pipe holds): several PIPE_BUF chunks
            _child("caddy", f"line {n} " + "x" * (n % 97))
        await asyncio.sleep(0)

    asyncio.run(burst())
    assert len(writes) > 5 and all(w.endswith(b"\n") and len(w) <= select.PIPE_BUF for w in writes)
    assert len(_read_all(read_end).splitlines()) == 150
    stream.close()
    os.close(read_end)


def test_a_loop_that_closed_before_writing_leaves_nothing_stuck() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    logs.configure("json", stream=stream)
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: (_child("caddy", "first"), loop.stop()))  # its deferred write never runs
    loop.run_forever()
    loop.close()

    async def later() -> None:
        _child("caddy", "second")
        await asyncio.sleep(0)

    asyncio.run(later())
    assert [json.loads(x)["message"] for x in _read_all(read_end).splitlines()] == ["first", "second"]
    stream.close()
    os.close(read_end)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- end to end: real Caddy through a real run ------------------------------------------------------------

def test_caddy_line_arrives_as_child_output_and_log_level_filters_only_ours(tmp_path: Path) -> None:
    env = base_env(tmp_path, LOG_LEVEL="warning")
    with Running(env) as run:
        ready = run.wait_event("child.output", timeout=60, service="caddy", message=READY_MSG)
        assert ready["level"] == "info" and ready["stream"] == "stderr"  # a child's info line at LOG_LEVEL=warning
        assert "ts" in ready["child_fields"]  # Caddy's own fields, kept apart
        wait_for(lambda: run.find(lambda e: e.get("service") == "spacetimedb" and e.get("event") == "child.output"),
                 30, "a SpacetimeDB line")
        run.signal(signal.SIGTERM)
        assert run.wait() == 0
    ours = [e for e in run.events if e.get("service") == "entrypoint"]
    assert not [e for e in ours if e.get("level") in ("debug", "info")], ours[:5]
    children = [e for e in run.events if e.get("service") in ("caddy", "spacetimedb")]
    assert children and all(e["event"] == "child.output" and isinstance(e["message"], str) for e in children)


def test_console_format_end_to_end(tmp_path: Path) -> None:
    env = base_env(tmp_path, LOG_FORMAT="console")
    with Running(env) as run:
        def caddy_ready() -> list[str]:
            return [line for line in list(run.raw) if (m := CONSOLE_HEAD.match(line))
                    and m.group(2) == "caddy" and m.group(3).startswith(READY_MSG)]

        (line,) = wait_for(caddy_ready, 60, "Caddy's ready line in console format")
        assert CONSOLE_HEAD.match(line).group(1) == "info"
        wait_for(lambda: any((m := CONSOLE_HEAD.match(x)) and m.group(3).startswith("entrypoint.ready")
                             for x in list(run.raw)), 60, "entrypoint.ready")
        run.signal(signal.SIGTERM)
        assert run.wait() == 0
    assert not [x for x in run.raw if x.startswith("{")]  # no JSON in console format


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                            max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), _json_values, max_size=6))
def test_a_childs_json_line_is_written_exactly_as_json_dumps_would(line: dict[str, Any]) -> None:
    assert logs._child_json(line) == json.dumps(line, ensure_ascii=False) + "\n"


_level_pieces = st.sampled_from(["INFO", "WARN", "WARNING", "ERROR", "DEBUG", "TRACE", "PANIC", "FATAL", "X", "_",
                                 "é", "1", " ", ":", "INF", "WARNINGS", "[", "Error:", "a" * 30])


@settings(max_examples=400, deadline=None)
@given(st.lists(_level_pieces, max_size=12).map("".join))
def test_level_guess_is_the_first_level_word_in_the_first_80_characters(text: str) -> None:
    match = logs._LEVEL_WORD.search(text[:80])
    expected = "error" if text.startswith("Error:") else (
        logs._LEVELS.get(match.group(1).lower(), "info") if match else "info")
    assert logs._guess_level(text) == expected


@settings(max_examples=300, deadline=None)
@given(message=st.text(), service=st.sampled_from(["caddy", "spacetimedb", "módulo \"x\""]),
       level=st.sampled_from(["debug", "info", "warning", "error", "critical"]))
def test_a_plain_child_line_is_the_same_on_the_short_path(message: str, service: str, level: str) -> None:
    fields = {"service": service, "stream": "stdout", "event": "child.output", "message": message, "pid": 12}
    short = logs._plain_child_json(level, fields)
    assert short is not None

    def same_ts(text: str) -> str:
        return re.sub(r'^\{"ts": "[^"]*"', '{"ts": "t"', text)

    assert same_ts(short) == same_ts(logs._child_json(logs._child_line(level, fields)))  # byte for byte
    assert list(json.loads(short)) == ["ts", "level", "event", "service", "stream", "pid", "message"]
    assert logs._plain_child_json(level, {**fields, "extra": 1}) is None
