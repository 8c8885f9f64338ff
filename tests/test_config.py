"""Configuration: every problem reported at once, exit 78, secrets masked."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
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


# --------------------------------------------------------------------------- the table


def test_every_settings_field_is_one_row() -> None:
    rows = [var.field for var in config.VARIABLES]
    assert sorted(rows) == sorted(f.name for f in dataclasses.fields(config.Settings))
    assert len({var.name for var in config.VARIABLES}) == len(rows)


def test_settings_defaults_are_the_tables() -> None:
    settings = config.Settings(oidc_issuer="", oidc_client_id="")
    for var in config.VARIABLES:
        if not var.required:
            assert getattr(settings, var.field) == config.DEFAULTS[var.field]
            text = var.default
            assert config.DEFAULTS[var.field] == (None if text is None else var.parse(text, var)), var.name
    assert config.DEFAULTS["health_addr"] == config.HostPort("127.0.0.1", 8079)
    assert config.DEFAULTS["oidc_discovery_timeout"] == 60.0 and config.DEFAULTS["owner_subjects"] == ()


def test_credential_names_are_secret_rows() -> None:
    for var in config.VARIABLES:
        if config.SECRET_NAME.search(var.name):
            assert var.secret, f"{var.name} is named like a credential: mark its row secret=True"
    assert not config.is_secret("OIDC_CLIENT_ID")  # public: the browser sends it in the clear
    assert config.is_secret("OIDC_CLIENT_SECRET") and config.is_secret("POGLY_ADMIN_TOKEN")


def test_check_masks_the_secret_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(STREAM_NAME="bobross_live")
    assert settings.public_view()["stream_name"] == "bobross_live"
    secret_row = [dataclasses.replace(v, secret=True) if v.name == "STREAM_NAME" else v for v in config.VARIABLES]
    monkeypatch.setattr(config, "VARIABLES", tuple(secret_row))
    monkeypatch.setattr(config, "VARIABLE", {v.name: v for v in secret_row})
    view = settings.public_view()
    assert "bobross_live" not in json.dumps(view) and view["stream_name"].startswith("bo…")
    assert view["oidc_client_id"] == "pogly"
    assert "bobross_live" not in str(config.Problem("STREAM_NAME", "bobross_live", "bad"))


def test_public_view_is_plain_json() -> None:
    view = load(POGLY_HEALTH_ADDR="[::1]:9000", OWNER_SUBJECTS="a b").public_view()
    assert view["health_addr"] == "[::1]:9000" and view["data_dir"] == "/stdb"
    assert view["owner_subjects"] == ["a", "b"] and view["public_url"] is None
    assert json.loads(json.dumps(view)) == view


def test_to_json_from_json_round_trip(tmp_path: Path) -> None:
    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    every_field_changed = {
        "OIDC_ISSUER": "http://127.0.0.1:5556/realms/ü", "OIDC_CLIENT_ID": "client id ✓",
        "OIDC_ALLOW_HTTP": "yes", "OIDC_DISCOVERY_TIMEOUT": "2.5", "STREAM_PLATFORM": "youtube",
        "STREAM_NAME": "@pogly", "MODULES": "one two-2", "OWNER_SUBJECTS": "sub-1 sub|2", "DEBUG_MODE": "1",
        "STRICT_MODE": "no", "POGLY_HTTP_PORT": "8080", "POGLY_PUBLIC_URL": "https://overlay.example.com:8443",
        "POGLY_PUBLIC_API": "full", "POGLY_DATA_DIR": "/d", "POGLY_CONFIG_DIR": "/c", "POGLY_WEB_ROOT": "/w",
        "POGLY_MODULE_DIR": "/m", "POGLY_RUN_DIR": "/r", "POGLY_SPACETIME_ADDR": "[::1]:3001",
        "POGLY_HEALTH_ADDR": "localhost:8078", "SPACETIME_BIN": str(program), "CADDY_BIN": "/bin/true",
        "POGLY_STOP_TIMEOUT": "10", "POGLY_START_TIMEOUT": "99.5", "POGLY_LOCK_WAIT": "0", "LOG_FORMAT": "JSON",
        "LOG_LEVEL": "Warning", "POGLY_PUBLIC_METRICS": "true",
    }
    assert set(every_field_changed) == {v.name for v in config.VARIABLES}
    settings = config.load(every_field_changed)
    default = config.Settings(oidc_issuer="", oidc_client_id="")
    same = [v.name for v in config.VARIABLES if getattr(settings, v.field) == getattr(default, v.field)]
    assert same == ["STRICT_MODE"]  # STRICT_MODE=true would refuse OIDC_ALLOW_HTTP=true
    wire = json.dumps(settings.to_json())
    assert config.Settings.from_json(json.loads(wire)) == settings
    assert config.Settings.from_json(json.loads(json.dumps(load().to_json()))) == load()


@pytest.mark.parametrize("change", [
    {"http_port": "80"}, {"debug_mode": 1}, {"modules": "pogly"}, {"health_addr": "nope"},
    {"data_dir": None}, {"public_url": 5}, {"stop_timeout": True}, {"extra": 1},
])
def test_from_json_refuses_what_to_json_never_writes(change: dict[str, object]) -> None:
    data = load().to_json() | change
    with pytest.raises(ValueError, match="settings JSON"):
        config.Settings.from_json(data)
    incomplete = load().to_json()
    del incomplete["modules"]
    with pytest.raises(ValueError, match="missing"):
        config.Settings.from_json(incomplete)


def test_read_one_variable_through_its_row() -> None:
    assert config.read("POGLY_HEALTH_ADDR", {}) == config.HostPort("127.0.0.1", 8079)
    assert config.read("POGLY_HEALTH_ADDR", {"POGLY_HEALTH_ADDR": " "}) == config.HostPort("127.0.0.1", 8079)
    assert config.read("POGLY_HEALTH_ADDR", {"POGLY_HEALTH_ADDR": "[::1]:1"}) == config.HostPort("::1", 1)
    assert config.read("OIDC_ISSUER", {}) == ""
    with pytest.raises(config.ConfigError) as info:
        config.read("POGLY_HEALTH_ADDR", {"POGLY_HEALTH_ADDR": "8079"})
    assert str(info.value.problems[0]).startswith("POGLY_HEALTH_ADDR='8079': must be host:port")


def test_status_and_probe_read_only_the_health_address(tmp_path: Path) -> None:
    # The rest of the environment may be missing in a `kubectl exec` shell: only POGLY_HEALTH_ADDR matters.
    env = {"PATH": "/usr/bin:/bin", "POGLY_HEALTH_ADDR": "localhost"}
    for argv in (["status"], ["probe", "ready"]):
        proc = subprocess.run([sys.executable, "-m", "entrypoint", *argv], env=env, capture_output=True,
                              timeout=30)
        assert proc.returncode == 78 and b"POGLY_HEALTH_ADDR='localhost': must be host:port" in proc.stderr
    with socket.socket() as sock:  # a port nobody answers on: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "entrypoint", "status"], capture_output=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "POGLY_HEALTH_ADDR": f"127.0.0.1:{port}"})
    assert proc.returncode == 69 and f"127.0.0.1:{port}".encode() in proc.stderr


def test_identity_reads_only_the_issuer(tmp_path: Path) -> None:
    def identity(issuer: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "entrypoint", "identity", "--sub", "alice"], capture_output=True,
                              env={"PATH": "/usr/bin:/bin", "OIDC_ISSUER": issuer}, timeout=30)

    good = identity(" https://auth.example.com/realms/pogly ")
    assert good.returncode == 0 and re.fullmatch(rb"c200[0-9a-f]{60}\n", good.stdout)
    bad = identity("https://auth.example.com/realms/pogly?x=1")
    assert bad.returncode == 78 and b"OIDC_ISSUER=" in bad.stderr and b"query or fragment" in bad.stderr
    off = identity("")
    assert off.returncode == 78 and b"give --issuer" in off.stderr


# --------------------------------------------------------------------------- the docs


README = Path(__file__).resolve().parent.parent / "README.md"
DEPLOYMENT_GUIDE = README.parent / "docs" / "deployment.md"


def documented_default(var: config.Variable) -> str:
    """A row's default as the docs' tables show it."""
    if var.required:
        return "required"
    if var.shown_default is not None:
        return var.shown_default
    if var.default is None:
        return "(unset)"
    return f"`{var.default}`" if var.default else "(empty)"


def readme_table() -> str:
    """The README's variable table as the table in config.py says it should read."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{v.name}` | {documented_default(v)} | {v.doc} |" for v in config.VARIABLES]
    return "\n".join(lines)


def documented_defaults(doc: Path) -> dict[str, str]:
    """``{VARIABLE: default cell}`` from every Markdown table row whose first cell names variables."""
    found: dict[str, str] = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        if names and re.fullmatch(r"(?:`[A-Z][A-Z0-9_]+`(?:, )?)+", cells[0]):
            found.update(dict.fromkeys(names, cells[1]))
    return found


def test_readme_variable_table_is_the_tables() -> None:
    assert readme_table() in README.read_text(), (
        "README.md's configuration table differs from entrypoint/config.py's VARIABLES; it should read:\n\n"
        + readme_table())


def test_deployment_guide_lists_every_variable_with_its_default() -> None:
    documented = documented_defaults(DEPLOYMENT_GUIDE)
    rows = {v.name: v for v in config.VARIABLES}
    assert sorted(set(rows) - set(documented)) == [], "docs/deployment.md does not document these"
    assert sorted(set(documented) - set(rows)) == [], "docs/deployment.md documents variables config.py lacks"
    for name, cell in documented.items():
        assert cell.startswith(documented_default(rows[name])), (
            f"docs/deployment.md: {name} defaults to {documented_default(rows[name])}, not {cell}")
