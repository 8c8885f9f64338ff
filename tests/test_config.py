"""Configuration: every problem reported at once, exit 78, secrets masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint import config

BASE = {"OIDC_ISSUER": "https://auth.example.com/application/o/pogly/", "OIDC_CLIENT_ID": "pogly",
        "SPACETIME_BIN": "/bin/true", "CADDY_BIN": "/bin/true"}


def load(**env: str) -> config.Settings:
    return config.load({**BASE, **env})


def problems(**env: str) -> dict[str, str]:
    with pytest.raises(config.ConfigError) as info:
        load(**env)
    return {p.variable: p.message for p in info.value.problems}


def test_defaults() -> None:
    s = load()
    assert s.stream_platform == "twitch" and s.stream_name == "bobross" and s.modules == ("pogly",)
    assert s.http_port == 80 and str(s.spacetime_addr) == "127.0.0.1:3000"
    assert s.data_dir == Path("/stdb") and s.config_dir == Path("/root/.spacetime")
    assert s.stop_timeout == 25 and s.log_format == "auto" and not s.debug_mode and not s.strict_mode


@pytest.mark.parametrize("raw,expected", [("TRUE", True), ("yes", True), ("1", True), ("No", False),
                                          ("0", False), ("false", False)])
def test_booleans(raw: str, expected: bool) -> None:
    assert load(DEBUG_MODE=raw).debug_mode is expected


@pytest.mark.parametrize("raw", ["on", "enabled", "ture", "2"])
def test_bad_boolean_is_an_error_not_false(raw: str) -> None:
    assert "boolean" in problems(DEBUG_MODE=raw)["DEBUG_MODE"]


def test_all_problems_at_once() -> None:
    found = problems(OIDC_ISSUER="", STREAM_PLATFORM="twich", MODULES="Pogly x_y", POGLY_HTTP_PORT="99999",
                     POGLY_DATA_DIR="relative/dir", POGLY_SPACETIME_ADDR="localhost", LOG_FORMAT="xml",
                     POGLY_STOP_TIMEOUT="-1")
    assert set(found) == {"OIDC_ISSUER", "STREAM_PLATFORM", "MODULES", "POGLY_HTTP_PORT", "POGLY_DATA_DIR",
                          "POGLY_SPACETIME_ADDR", "LOG_FORMAT", "POGLY_STOP_TIMEOUT"}
    assert "twitch, youtube, kick" in found["STREAM_PLATFORM"]


@pytest.mark.parametrize("platform,name,ok", [
    ("twitch", "bob_ross", True), ("twitch", "bob ross", False), ("youtube", "dQw4w9WgXcQ", True),
    ("youtube", "@pogly", True), ("youtube", "not a video", False), ("kick", "some-streamer", True),
])
def test_stream_name_per_platform(platform: str, name: str, ok: bool) -> None:
    if ok:
        assert load(STREAM_PLATFORM=platform, STREAM_NAME=name).stream_name == name
    else:
        assert "STREAM_NAME" in problems(STREAM_PLATFORM=platform, STREAM_NAME=name)


def test_duplicate_and_invalid_modules() -> None:
    assert "duplicate" in problems(MODULES="pogly pogly")["MODULES"]
    assert load(MODULES="pogly  other-1").modules == ("pogly", "other-1")


def test_strict_mode_refuses_allow_http() -> None:
    assert "STRICT_MODE" in problems(STRICT_MODE="true", OIDC_ALLOW_HTTP="true")["OIDC_ALLOW_HTTP"]


def test_missing_binary_names_the_variable() -> None:
    assert "SPACETIME_BIN" in problems(SPACETIME_BIN="/nonexistent/spacetime")


def test_secret_values_are_masked() -> None:
    problem = config.Problem("OIDC_CLIENT_SECRET", "supersecretvalue", "bad")
    assert "supersecretvalue" not in str(problem)


def test_cli_exits_78_listing_every_problem(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OIDC_CLIENT_ID": "x", "STREAM_PLATFORM": "myspace", "LOG_FORMAT": "json",
           "SPACETIME_BIN": "/bin/true", "CADDY_BIN": "/bin/true"}
    proc = subprocess.run([sys.executable, "-m", "entrypoint", "run"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 78
    event = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert event["event"] == "config.invalid" and event["exit_code"] == 78
    assert any(p.startswith("OIDC_ISSUER=(unset)") for p in event["problems"])
    assert any(p.startswith("STREAM_PLATFORM='myspace'") for p in event["problems"])


def test_both_oidc_values_empty_is_oidc_off() -> None:
    s = load(OIDC_ISSUER="", OIDC_CLIENT_ID="")
    assert s.oidc_issuer == "" and s.oidc_client_id == "" and not s.oidc_enabled
    assert load(OIDC_ISSUER="  ", OIDC_CLIENT_ID="\t").oidc_enabled is False  # blank is empty
    assert load().oidc_enabled is True


@pytest.mark.parametrize("empty,other", [("OIDC_ISSUER", "OIDC_CLIENT_ID"), ("OIDC_CLIENT_ID", "OIDC_ISSUER")])
def test_one_oidc_value_empty_names_both(empty: str, other: str) -> None:
    found = problems(**{empty: ""})
    assert set(found) == {empty}
    assert other in found[empty] and "both" in found[empty]


def test_strict_mode_refuses_oidc_off() -> None:
    found = problems(OIDC_ISSUER="", OIDC_CLIENT_ID="", STRICT_MODE="true")
    assert "STRICT_MODE" in found["OIDC_ISSUER"] and "OIDC_CLIENT_ID" in found["OIDC_ISSUER"]


@pytest.mark.parametrize("missing,other,other_value", [
    ("OIDC_ISSUER", "OIDC_CLIENT_ID", ""), ("OIDC_ISSUER", "OIDC_CLIENT_ID", "pogly"),
    ("OIDC_CLIENT_ID", "OIDC_ISSUER", ""), ("OIDC_CLIENT_ID", "OIDC_ISSUER", BASE["OIDC_ISSUER"]),
])
def test_unset_oidc_value_stays_required(missing: str, other: str, other_value: str) -> None:
    # Unset is not OIDC off: a forgotten Secret must never silently turn sign-in off.
    env = {k: v for k, v in BASE.items() if k != missing} | {other: other_value}
    with pytest.raises(config.ConfigError) as info:
        config.load(env)
    assert any(p.variable == missing and p.value is None and "required" in p.message
               for p in info.value.problems)
