"""Fuzz every variable of the configuration table (issue 13, fault 4; hypothesis).

In the process: ``config.load`` (and ``config.read``) with one variable set to
arbitrary text (lone surrogates, i.e. bytes that are not UTF-8; control
characters; NUL, which only the process can hold; full-width digits; values
up to 64 KiB) either returns ``Settings`` whose every value can be written
out as UTF-8, or raises ``ConfigError`` whose problems each name that
variable, shown on one bounded line.  Never another exception.

Through the real program: ``check`` with one variable set to arbitrary bytes
exits 0 or 78 (never 1 or 70, never a traceback); 78 names the variable (or the
Caddyfile); nothing is written anywhere (no partial file, no directory, not in
the configured paths, the working directory, ``TMPDIR`` or at a path the value
names).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from entrypoint import config
from tests.harness import ENTRYPOINT, base_env

NAMES = [var.name for var in config.VARIABLES]
BASE = {"OIDC_ISSUER": "https://auth.example.com/application/o/pogly/", "OIDC_CLIENT_ID": "pogly",
        "SPACETIME_BIN": "/bin/true", "CADDY_BIN": "/bin/true"}
KIB64 = 64 * 1024
#: Examples through the real ``check`` (each a process); raise it for a longer hunt.
CHECK_EXAMPLES = int(os.environ.get("POGLY_FUZZ_CHECK_EXAMPLES", "25"))
DEFAULT_DIRS = [Path(var.default) for var in config.VARIABLES
                if var.name in ("POGLY_DATA_DIR", "POGLY_CONFIG_DIR", "POGLY_WEB_ROOT", "POGLY_MODULE_DIR",
                                "POGLY_RUN_DIR") and var.default]

# Pieces that sit near the edges of the parsers: almost-valid values and the characters that broke them.
PIECES = ["/", "/tmp", "/etc/passwd", ".", "..", "80", "8080", "65536", "0", "25", "2.5", "1e3", "inf", "nan",
          "²", "８", "٣", "_", "-", "true", "yes", "json", "twitch", "youtube", "kick", "pogly", "http://",
          "https://", "127.0.0.1:", "[::1]:", "localhost", "@", "{", "}", "'", '"', "`", "\\", "$", "%", "#", "?",
          " ", "\t", "\n", "\r", "\x0b", "\x1c", "\x85", "\xa0", "\u2028", "\u202e", "\u200b", "\ufeff",
          "\x00", "\x1b[31m", "\x7f", "\udcff", "\udc80", "\ud800", "a" * 255, "b" * 256, "c" * 4000]

_any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=80)  # surrogates too
_pieces = st.lists(st.one_of(st.sampled_from(PIECES), _any_text), max_size=8).map("".join)
_huge = st.builds(lambda unit, size: (unit * (size // max(len(unit), 1) + 1))[:size],
                  st.one_of(st.sampled_from(PIECES), _any_text.filter(bool)), st.integers(1, KIB64))
VALUES = st.one_of(_any_text, _pieces, _huge)


def _names_it(problem: config.Problem, variable: str) -> bool:
    """A problem names the variable: it is about it, or (a rule across variables) its message says it."""
    return problem.variable == variable or variable in problem.message


def _assert_safe_report(exc: config.ConfigError, variable: str) -> None:
    assert exc.problems, "a ConfigError with no problem"
    for problem in exc.problems:
        assert _names_it(problem, variable), (variable, str(problem))
        line = str(problem)
        assert line.isprintable() and len(line) < 2000, line  # one line, bounded, nothing raw
    str(exc).encode("utf-8")  # strict: no lone surrogate left in what is logged



def ours(out: bytes) -> bytes:
    """The output without the children's relayed lines (``event: child.output``): the promise is that
    *we* never print a traceback; a child's own (the Python stand-in's, say) is relayed as it came."""
    kept = []
    for line in out.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        if not (isinstance(record, dict) and record.get("event") == "child.output"):
            kept.append(line)
    return b"".join(kept)

@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(variable=st.sampled_from(NAMES), value=VALUES)
def test_load_returns_settings_or_a_config_error_naming_the_variable(variable: str, value: str) -> None:
    try:
        loaded = config.load({**BASE, variable: value})
    except config.ConfigError as exc:
        event("refused")
        _assert_safe_report(exc, variable)
    else:
        event("accepted")
        json.dumps(loaded.to_json(), ensure_ascii=False).encode("utf-8")
        json.dumps(loaded.public_view(), ensure_ascii=False).encode("utf-8")
    try:
        config.read(variable, {variable: value})
    except config.ConfigError as exc:
        _assert_safe_report(exc, variable)


# --------------------------------------------------------------------------- through `check`

_bytes_values = st.one_of(
    st.binary(max_size=200),
    VALUES.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.builds(lambda unit, size: (unit * (size // len(unit) + 1))[:size], st.binary(min_size=1, max_size=8),
              st.integers(1, KIB64)),
).map(lambda raw: raw.replace(b"\x00", b"")[:KIB64])  # an environment holds no NUL; 64 KiB per value


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env-fuzz")


@settings(max_examples=CHECK_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(variable=st.sampled_from(NAMES), value=_bytes_values)
def test_check_exits_0_or_78_and_writes_nothing(fuzz_root: Path, variable: str, value: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=fuzz_root) as tmp_name:
        tmp = Path(tmp_name)
        env = {os.fsencode(k): os.fsencode(v) for k, v in base_env(tmp, OIDC_ISSUER="", OIDC_CLIENT_ID="").items()}
        cwd, scratch = tmp / "cwd", tmp / "tmpdir"
        cwd.mkdir()
        scratch.mkdir()
        env[b"TMPDIR"] = os.fsencode(scratch)
        env[variable.encode()] = value
        named = Path(os.fsdecode(value.strip(b" \t\n\r\x0b\x0c"))) if value.strip().startswith(b"/") else None
        existed = named is not None and _exists(named)
        before = _tree(tmp)
        defaults = {path: _exists(path) for path in DEFAULT_DIRS}
        proc = subprocess.run([*ENTRYPOINT, "check"], env=env, cwd=cwd, capture_output=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        out = proc.stdout + proc.stderr
        event(f"check exit {proc.returncode}")
        assert proc.returncode in (0, 78), (variable, value[:200], proc.returncode, out[-3000:])
        assert b"Traceback" not in ours(out), out[-3000:]
        if proc.returncode == 78:
            assert variable.encode() in out or b"Caddyfile: INVALID" in out, (variable, out[-3000:])
        assert _tree(tmp) == before, "check wrote into the test's directories"
        assert named is None or _exists(named) == existed, f"check created {named}"
        assert {path: _exists(path) for path in DEFAULT_DIRS} == defaults


def _exists(path: Path) -> bool:
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- through `run`

#: Examples per variable through the real ``run`` (each a process that may start both children).
RUN_EXAMPLES = int(os.environ.get("POGLY_FUZZ_RUN_EXAMPLES", "6"))
PATH_NAMES = {var.name for var in config.VARIABLES if var.parse is config.VARIABLE["POGLY_DATA_DIR"].parse}
PROGRAM_NAMES = ("SPACETIME_BIN", "CADDY_BIN")
#: Failures that are the machine's, not the value's: a valid port some other process holds.  They must
#: still name the variable.
ENVIRONMENT_FAILURES = {69: b"health.listen_failed", 1: b"caddy.startup_failed"}


def _configured(settings: config.Settings) -> list[Path]:
    return [settings.data_dir, settings.config_dir, settings.run_dir, settings.web_root, settings.module_dir]


def _ready(settings: config.Settings) -> bool:
    import httpx

    addr = settings.health_addr
    try:
        return httpx.get(f"http://{addr}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env-fuzz-run")


@pytest.mark.parametrize("variable", NAMES)
@settings(max_examples=RUN_EXAMPLES, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: every example is a whole run
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(value=b"!/!")  # a nested path: its parent is made on the way (found by this test, a false alarm then)
@given(value=_bytes_values)
def test_run_starts_and_stops_0_or_exits_78_naming_the_variable(run_root: Path, variable: str, value: bytes) -> None:
    """The real ``run`` with one variable hostile: it is refused (78 naming the variable, before anything
    is created) when ``config.load`` refuses it; otherwise both children start, ``/readyz`` turns 200 and
    SIGTERM exits 0, or it is refused later, still 78 naming the variable (what the value points at is
    unusable, e.g. a module dir without the ``.wasm``).  Never a traceback, never 70; no ``.tmp`` file
    left; no directory created outside the configured paths (but ``$HOME/.config``, for the CLI link), the
    working directory or ``TMPDIR``.  An empty value is the default, which every other test starts with:
    not run again.  Path values are placed under the test's directory, and an accepted path or program
    outside it is not run (nothing is written to the host)."""
    import signal

    from tests.harness import kill_with_descendants, wait_for

    with tempfile.TemporaryDirectory(dir=run_root) as tmp_name:
        tmp = Path(tmp_name)
        env = {os.fsencode(k): os.fsencode(v) for k, v in base_env(
            tmp, OIDC_ISSUER="", OIDC_CLIENT_ID="", POGLY_START_TIMEOUT="20", POGLY_STOP_TIMEOUT="10").items()}
        cwd, scratch = tmp / "cwd", tmp / "tmpdir"
        cwd.mkdir()
        scratch.mkdir()
        env[b"TMPDIR"] = os.fsencode(scratch)
        if variable in PATH_NAMES:
            value = os.fsencode(tmp) + b"/" + value.lstrip(b"/")
        env[variable.encode()] = value
        try:
            loaded: config.Settings | None = config.load({os.fsdecode(k): os.fsdecode(v) for k, v in env.items()})
        except config.ConfigError:
            loaded = None
        if loaded is not None and not value.strip():
            event("empty: the default, started by every other test")
            return
        if loaded is not None:
            outside = [p for p in _configured(loaded) if not str(p).startswith(str(tmp) + "/")]
            other_program = variable in PROGRAM_NAMES and getattr(loaded, variable.lower()) != base_env(tmp)[variable]
            if outside or other_program:
                event("accepted outside the test's directory: not run")
                return
        before = {p for p in tmp.rglob("*") if p.is_dir()}
        defaults = {path: _exists(path) for path in DEFAULT_DIRS}
        proc = subprocess.Popen([*ENTRYPOINT, "run"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if loaded is not None:
                wait_for(lambda: proc.poll() is not None or _ready(loaded), 60, "ready or an exit")
                if proc.poll() is None:
                    event("run: ready, then SIGTERM")
                    proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # a failed wait: take its children along (not PID 1: they would outlive it)
                kill_with_descendants(proc)
        rc = proc.returncode
        event(f"run exit {rc}")
        assert b"Traceback" not in ours(out), out[-3000:]
        if loaded is None:
            assert rc == 78, (variable, value[:200], rc, out[-3000:])
            assert variable.encode() in out, (variable, out[-3000:])
        elif rc in ENVIRONMENT_FAILURES:
            assert ENVIRONMENT_FAILURES[rc] in out and variable.encode() in out, (variable, rc, out[-3000:])
        elif rc == 78:  # valid as a value, refused by what it points at (e.g. a module dir without a .wasm)
            assert variable.encode() in out, (variable, value[:200], out[-3000:])
        else:
            assert rc == 0, (variable, value[:200], rc, out[-3000:])
        assert not [p for p in tmp.rglob("*.tmp")], "a partially written file was left"
        assert [p for d in (cwd, scratch) for p in d.iterdir()] == []
        # The one deliberate write outside them: $HOME/.config/spacetime, a link to the config volume so
        # `kubectl exec … spacetime sql` acts as the publisher (spacetimedb/credentials.link_cli_config).
        allowed = [*_configured(loaded), tmp / "home"] if loaded is not None else []
        created = {p for p in tmp.rglob("*") if p.is_dir()} - before
        # In a configured path, or on the way to one (its parents are made as `mkdir -p` would).
        assert all(any(p == a or a in p.parents or p in a.parents for a in allowed) for p in created), sorted(created)
        assert {path: _exists(path) for path in DEFAULT_DIRS} == defaults
