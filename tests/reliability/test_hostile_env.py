"""Hostile environment values are exit 78 naming the variable (issue 13, fault 4).

Each used to end otherwise: ``OWNER_SUBJECTS`` with bytes that are not UTF-8
in a ``UnicodeEncodeError`` traceback (rc 1), ``POGLY_HTTP_PORT=²`` in a
``ValueError`` (rc 1) while ``８０`` was taken, a run dir with invalid UTF-8 in
exit 70, a 300-byte path component in a raw traceback from the pre-loop spawn
(rc 1), ``POGLY_WEB_ROOT=/etc/passwd`` in exit 70, whitespace-only paths in
the defaults ``/stdb``, ``/root/.spacetime`` and ``/run/pogly`` (created).

Every case runs the real program, ``check`` and ``run``, with its environment
given as bytes (as the kernel hands it over) and every configured path under
``tmp_path``: exit 78, one problem line naming the variable and showing the
value safely, no traceback, and nothing created anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from entrypoint import config
from entrypoint.spacetimedb.server import prespawn
from tests.harness import ENTRYPOINT, base_env

#: The defaults a whitespace-only path used to fall back to (and ``run`` then created).
PATH_VARIABLES = ("POGLY_DATA_DIR", "POGLY_CONFIG_DIR", "POGLY_WEB_ROOT", "POGLY_MODULE_DIR", "POGLY_RUN_DIR")
DEFAULT_DIRS = [Path(config.VARIABLE[name].default or "/") for name in PATH_VARIABLES]

Value = Callable[[Path], bytes]


def _under(tmp: Path, tail: bytes) -> bytes:
    return os.fsencode(tmp) + tail


# name: (variable, value given the test's tmp dir, what the problem line must show)
CASES: dict[str, tuple[str, Value, str]] = {
    "owner-subjects-not-utf8": ("OWNER_SUBJECTS", lambda t: b"alice \xff\xfebob", r"'alice \xff\xfebob'"),
    "client-id-not-utf8": ("OIDC_CLIENT_ID", lambda t: b"pogly\xff", r"'pogly\xff'"),
    "client-id-newline": ("OIDC_CLIENT_ID", lambda t: b"pogly\nlevel=error forged", r"'pogly\nlevel=error forged'"),
    "stream-name-escape-sequence": ("STREAM_NAME", lambda t: b"bob\x1b[31mross", r"'bob\x1b[31mross'"),
    "http-port-superscript": ("POGLY_HTTP_PORT", lambda t: "²".encode(), "ASCII digits"),
    "http-port-full-width": ("POGLY_HTTP_PORT", lambda t: "８０".encode(), "'８０'"),
    "stop-timeout-full-width": ("POGLY_STOP_TIMEOUT", lambda t: "２５".encode(), "ASCII digits"),
    "lock-wait-infinite": ("POGLY_LOCK_WAIT", lambda t: b"inf", "from 0 to 3600"),
    "start-timeout-not-a-number": ("POGLY_START_TIMEOUT", lambda t: b"NaN", "from 1 to 3600"),
    "run-dir-not-utf8": ("POGLY_RUN_DIR", lambda t: _under(t, b"/run\xff"), r"/run\xff'"),
    "data-dir-whitespace": ("POGLY_DATA_DIR", lambda t: b"   ", "only whitespace"),
    "config-dir-whitespace": ("POGLY_CONFIG_DIR", lambda t: b" \t ", "only whitespace"),
    "run-dir-whitespace": ("POGLY_RUN_DIR", lambda t: b"  ", "only whitespace"),
    "data-dir-long-component": ("POGLY_DATA_DIR", lambda t: _under(t, b"/" + b"a" * 300), "300 bytes"),
    "module-dir-long-component": ("POGLY_MODULE_DIR", lambda t: _under(t, b"/" + b"m" * 256), "256 bytes"),
    "run-dir-too-long": ("POGLY_RUN_DIR", lambda t: _under(t, (b"/" + b"r" * 200) * 22), "bytes long"),
    "web-root-a-file": ("POGLY_WEB_ROOT", lambda t: b"/etc/passwd", "not a directory"),
    "module-dir-the-wasm-itself": ("POGLY_MODULE_DIR", lambda t: _under(t, b"/modules/pogly.wasm"),
                                   "not the file itself"),
    "config-dir-through-a-file": ("POGLY_CONFIG_DIR", lambda t: b"/etc/passwd/spacetime", "goes through a file"),
    "modules-64-KiB": ("MODULES", lambda t: b"X" * 65536, "and"),
}


def _tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _run(tmp: Path, command: str, variable: str, value: bytes) -> tuple[int, bytes, bytes]:
    """``command`` with the base environment (every path under ``tmp``, OIDC off) and ``variable=value``."""
    env = {os.fsencode(k): os.fsencode(v) for k, v in base_env(tmp, OIDC_ISSUER="", OIDC_CLIENT_ID="").items()}
    if variable == "OIDC_CLIENT_ID":  # half of the OIDC pair: only its own problem counts here
        env[b"OIDC_ISSUER"] = b"https://auth.example.com/realms/pogly"
    env[variable.encode()] = value
    cwd, scratch = tmp / "cwd", tmp / "tmpdir"
    cwd.mkdir(exist_ok=True)
    scratch.mkdir(exist_ok=True)
    env[b"TMPDIR"] = os.fsencode(scratch)
    proc = subprocess.run([*ENTRYPOINT, command], env=env, cwd=cwd, capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def _problems(out: bytes) -> list[str]:
    for line in out.splitlines():
        if line.startswith(b"{"):
            event = json.loads(line)
            if event.get("event") == "config.invalid":
                return event["problems"]
    raise AssertionError(f"no config.invalid event in {out[-2000:]!r}")


def _assert_refused(tmp: Path, command: str, variable: str, value: bytes, shown: str) -> None:
    before = _tree(tmp) if tmp.exists() else set()
    defaults = {path: path.exists() for path in DEFAULT_DIRS}
    rc, out, err = _run(tmp, command, variable, value)
    assert rc == 78, (rc, out[-2000:], err[-2000:])
    assert b"Traceback" not in out + err
    (out + err).decode("utf-8")  # strict: no raw invalid bytes reach the log
    lines = [p for p in _problems(out) if p.startswith(f"{variable}=")]
    assert lines, _problems(out)
    assert any(shown in line for line in lines), (shown, lines)
    assert all("\n" not in line and len(line) < 1000 for line in lines), lines
    # Nothing created: _run's own cwd/ and tmpdir/ are all that is new, and they are empty.
    assert _tree(tmp) - before <= {"cwd", "tmpdir"}, sorted(_tree(tmp) - before)
    assert [p for d in ("cwd", "tmpdir") for p in (tmp / d).iterdir()] == []
    assert {path: path.exists() for path in DEFAULT_DIRS} == defaults


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_value_is_exit_78_naming_the_variable(tmp_path: Path, case: str, command: str) -> None:
    variable, value, shown = CASES[case]
    base_env(tmp_path)  # the configured directories exist before the snapshot
    _assert_refused(tmp_path, command, variable, value(tmp_path), shown)


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("variable", [var.name for var in config.VARIABLES])
def test_invalid_utf8_in_any_variable_is_exit_78_naming_it(tmp_path: Path, variable: str, command: str) -> None:
    base_env(tmp_path)
    default = config.VARIABLE[variable].default or "x"
    _assert_refused(tmp_path, command, variable, default.encode() + b"\xc3\x28\xff", r"\xc3(\xff'")


def test_refused_values_are_shown_safely_and_secrets_masked() -> None:
    """The problem line itself: invalid bytes as \\xNN, control characters escaped, long values cut, secrets
    masked (a row flagged secret, or a name like one) even when they are not UTF-8."""
    shown = str(config.Problem("STREAM_NAME", "a\udcff\x1b\u202e'\\" + "z" * 500, "bad"))
    assert shown.startswith(r"STREAM_NAME='a\xff\x1b\u202e\'\\zz") and "…(506 chars)" in shown
    assert len(shown) < 200 and shown.isprintable()
    secret = str(config.Problem("POGLY_ADMIN_TOKEN", "s3cr\udcffet-value-here", "bad"))
    assert "et-value" not in secret and secret.isprintable() and "(18 chars)" in secret
    with pytest.raises(config.ConfigError) as info:
        config.read("POGLY_HEALTH_ADDR", {"POGLY_HEALTH_ADDR": "127.0.0.1:80\udcff"})
    assert str(info.value.problems[0]).startswith(r"POGLY_HEALTH_ADDR='127.0.0.1:80\xff': is not valid UTF-8")


def test_prespawn_with_a_path_the_kernel_refuses_falls_back_to_the_in_loop_start(tmp_path: Path) -> None:
    """Settings that bypass ``config.load`` (a 300-byte component): ``is_dir()`` raises ENAMETOOLONG, which
    used to escape ``prespawn`` as a raw traceback (rc 1).  Now: no early spawn; the supervisor starts and
    reports."""
    settings = config.Settings(oidc_issuer="", oidc_client_id="", data_dir=tmp_path / ("d" * 300),
                               config_dir=tmp_path)
    assert prespawn(settings) is None
    assert list(tmp_path.iterdir()) == []
