"""Caddyfile rendering, validation and the public surface, against a real Caddy.

The stacks (stand-in upstream + health server + ``caddy run``) are module-scoped:
each starts in well under a second and waits for Caddy's "serving initial
configuration" line, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from entrypoint import config
from entrypoint.config import ConfigError, HostPort
from entrypoint.web import caddy
from tests import caddyhelp as ch

REPO = Path(__file__).resolve().parent.parent

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "strict-origin-when-cross-origin",
    "content-security-policy": "frame-ancestors 'self'",
    "x-frame-options": "SAMEORIGIN",
}

# What the Pogly web app (current SDK and older builds) calls: must reach SpacetimeDB.
WEB_APP_ROUTES = [
    ("GET", "/v1/ping"),
    ("HEAD", "/v1/ping"),
    ("POST", "/v1/identity"),
    ("POST", "/v1/identity/websocket-token"),
    ("GET", "/v1/identity/public-key"),
    ("GET", "/v1/database/pogly/identity"),
    ("GET", "/v1/database/pogly/schema?version=9"),
    ("POST", "/v1/database/pogly/call/add_widget"),
    ("OPTIONS", "/v1/database/pogly/call/add_widget"),
    ("POST", "/v1/database/pogly/sql"),
    ("POST", "/identity"),
    ("POST", "/identity/websocket_token"),
    ("GET", "/identity/public-key"),
    ("GET", "/database/dns/pogly"),
    ("GET", "/database/schema/pogly"),
    ("POST", "/database/call/pogly/add_widget"),
    ("POST", "/database/sql/pogly"),
    ("GET", "/energy/c200aa"),
]

# Not on the public port in minimal mode (they all work on the loopback address).
FORBIDDEN_ROUTES = [
    ("POST", "/v1/database"),
    ("PUT", "/v1/database/x"),
    ("PUT", "/v1/database/pogly?clear=true"),
    ("POST", "/v1/database/pogly"),
    ("POST", "/v1/database/pogly/pre_publish"),
    ("POST", "/v1/database/pogly/reset"),
    ("DELETE", "/v1/database/pogly"),
    ("GET", "/v1/database/pogly"),
    ("GET", "/v1/database/pogly/names"),
    ("POST", "/v1/database/pogly/names"),
    ("PUT", "/v1/database/pogly/names"),
    ("GET", "/v1/database/pogly/logs?num_lines=10&follow=true"),
    ("GET", "/v1/database/pogly/unstable/timestamp"),
    ("GET", "/v1/metrics"),
    ("GET", "/v1/prometheus/sd_config"),
    ("GET", "/v1/internal/heap"),
    ("GET", "/v1/health"),
    ("GET", "/v1/identity/c200aa/databases"),
    ("GET", "/v1/identity/c200aa/verify"),
    ("GET", "/v1/energy/c200aa"),
    ("GET", "/v1/database/pogly/call/add_widget"),
    ("POST", "/v1/database/pogly/subscribe"),
    ("PUT", "/v1/identity"),
    ("GET", "/V1/ping"),
    ("GET", "/v1"),
    ("POST", "/database/publish"),
    ("POST", "/database/delete/c200aa"),
    ("POST", "/database/set_name"),
    ("POST", "/database/register_tld"),
    ("GET", "/database/logs/pogly"),
    ("GET", "/database/info/pogly"),
    ("POST", "/energy/c200aa"),
    ("PUT", "/energy/c200aa"),
    ("POST", "/identity/c200aa/set-email"),
    ("GET", "/internal/heap"),
    ("GET", "/metrics"),
    ("GET", "/prometheus/sd_config"),
]

SPA_ROUTES = ["/", "/callback", "/overlay", "/login", "/canvas", "/callback?code=abc&state=xyz"]

INJECTION_PAYLOADS = [
    '"',
    '\n\trespond "pwned" 200\n\theader X-Y "y',
    "{$HOME}",
    "{http.request.header.Cookie}",
    "`",
    "}",
]

# Each templated variable with a value that is valid on its own.
TEMPLATED = {
    "POGLY_HTTP_PORT": "8080",
    "POGLY_SPACETIME_ADDR": "127.0.0.1:3000",
    "POGLY_HEALTH_ADDR": "127.0.0.1:8079",
    "POGLY_WEB_ROOT": "/usr/share/caddy",
    "POGLY_RUN_DIR": "/run/pogly",
    "POGLY_PUBLIC_URL": "https://overlay.example.com",
    "POGLY_PUBLIC_API": "minimal",
    "STRICT_MODE": "true",
    "POGLY_STOP_TIMEOUT": "25",
}


def base_env(**extra: str) -> dict[str, str]:
    env = {
        "OIDC_ISSUER": "https://auth.example.com/application/o/pogly/",
        "OIDC_CLIENT_ID": "pogly",
        "CADDY_BIN": ch.CADDY_BIN,
        "SPACETIME_BIN": "/bin/true",
    }
    env.update(extra)
    return env


def load(**extra: str) -> config.Settings:
    return config.load(base_env(**extra))


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, trust_env=False, timeout=10)


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """One raw HTTP/1.1 exchange: for targets httpx would normalise (``..``, ``%2F``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bg():
    loop = ch.BackgroundLoop()
    yield loop
    loop.close()


def _stack(bg: ch.BackgroundLoop, tmp: Path, **overrides):  # type: ignore[no-untyped-def]
    stack = bg.run(ch.start_stack(tmp, **overrides))
    yield stack
    rc = bg.run(ch.stop_stack(stack))
    assert rc == 0, stack.caddy.lines


@pytest.fixture(scope="module")
def stack(bg, tmp_path_factory):  # type: ignore[no-untyped-def]
    yield from _stack(bg, tmp_path_factory.mktemp("minimal"))


@pytest.fixture(scope="module")
def stack_full(bg, tmp_path_factory):  # type: ignore[no-untyped-def]
    yield from _stack(bg, tmp_path_factory.mktemp("full"), public_api="full")


@pytest.fixture(scope="module")
def stack_strict(bg, tmp_path_factory):  # type: ignore[no-untyped-def]
    yield from _stack(bg, tmp_path_factory.mktemp("strict"), strict_mode=True,
                      public_url="https://overlay.example.com")


# -- rendering --------------------------------------------------------------------


def test_root_template_is_a_symlink_to_the_packaged_one() -> None:
    root = REPO / "Caddyfile.j2"
    assert root.is_symlink()
    assert root.resolve() == (REPO / "entrypoint" / "web" / "templates" / "Caddyfile.j2").resolve()
    assert (REPO / "entrypoint" / "web" / "templates").resolve() == caddy.TEMPLATE_DIR


def test_render_defaults(tmp_path: Path) -> None:
    text = caddy.render(ch.base_settings(tmp_path))
    assert ":8080 {" in text
    for line in ("admin off", "auto_https off", "persist_config off", "grace_period 10s",
                 "encode zstd gzip", "output stderr", "format json"):
        assert f"\t{line}\n" in text
    assert 'reverse_proxy "127.0.0.1:3000"' in text
    assert 'reverse_proxy "127.0.0.1:8079"' in text
    assert f'root * "{tmp_path / "web"}"' in text
    assert f'root * "{tmp_path / "run"}"' in text
    assert "frame-ancestors 'self'" in text  # autoescape off: no &#39;
    assert "{$" not in text and "{env." not in text
    assert "Strict-Transport-Security" not in text and "Permissions-Policy" not in text
    assert "\n " not in text  # indented with tabs only


def test_render_ipv6_addresses(tmp_path: Path) -> None:
    settings = ch.base_settings(tmp_path, spacetime_addr=HostPort("::1", 3000),
                                health_addr=HostPort("::1", 8079))
    text = caddy.render(settings)
    assert 'reverse_proxy "[::1]:3000"' in text and 'reverse_proxy "[::1]:8079"' in text


@pytest.mark.parametrize(("stop_timeout", "expected"), [(25.0, "10s"), (5.0, "2s"), (1.0, "400ms"), (3.3, "1320ms")])
def test_grace_period(tmp_path: Path, stop_timeout: float, expected: str) -> None:
    settings = ch.base_settings(tmp_path, stop_timeout=stop_timeout)
    assert f"\tgrace_period {expected}\n" in caddy.render(settings)
    assert caddy.stop_grace(settings) < settings.stop_timeout


@given(st.floats(min_value=1, max_value=3600))
def test_grace_is_always_shorter_than_stop_timeout(stop_timeout: float) -> None:
    settings = ch.base_settings(Path("/tmp/x"), stop_timeout=stop_timeout)
    grace = caddy.stop_grace(settings)
    assert 0 < grace <= 10 and grace <= 0.4 * stop_timeout


def test_hsts_only_for_https_public_url_under_strict(tmp_path: Path) -> None:
    def text(**kw: object) -> str:
        return caddy.render(ch.base_settings(tmp_path, **kw))

    assert "Strict-Transport-Security" in text(strict_mode=True, public_url="https://o.example")
    assert "Strict-Transport-Security" not in text(strict_mode=True, public_url="http://o.example")
    assert "Strict-Transport-Security" not in text(strict_mode=True)
    assert "Strict-Transport-Security" not in text(strict_mode=False, public_url="https://o.example")
    strict = text(strict_mode=True)
    assert "Permissions-Policy" in strict
    policy = next(line for line in strict.splitlines() if "Permissions-Policy" in line)
    # Pogly embeds YouTube/Twitch/Kick players: never restrict what they need.
    for needed in ("autoplay", "fullscreen", "encrypted-media", "picture-in-picture"):
        assert needed not in policy


def test_full_mode_proxies_everything(tmp_path: Path) -> None:
    text = caddy.render(ch.base_settings(tmp_path, public_api="full"))
    assert "path_regexp" not in text.split("handle @spacetime {", 1)[1].split("\n\t}\n", 1)[0]


MODES = {
    "minimal": {},
    "full": {"public_api": "full"},
    "strict": {"strict_mode": True, "public_url": "https://overlay.example.com"},
    "strict-http": {"strict_mode": True, "public_url": "http://overlay.example.com", "stop_timeout": 1.0},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rendered_file_is_caddy_fmt_clean_and_validates(tmp_path: Path, mode: str) -> None:
    settings = ch.base_settings(tmp_path, **MODES[mode])
    text = caddy.render(settings)
    path = caddy.write(settings, text)
    assert path == tmp_path / "run" / "Caddyfile"
    assert path.read_text() == text
    fmt = subprocess.run([ch.CADDY_BIN, "fmt", str(path)], capture_output=True, text=True, timeout=30,
                         check=True)
    assert fmt.stdout == text
    runner = ch.RecordingRunner()
    run(caddy.validate(settings, path, runner))
    assert [argv[1] for argv in runner.calls] == ["validate"]
    # No "not formatted" warning and no error from the adapter either.
    proc = subprocess.run(caddy.validate_command(settings, path), capture_output=True, text=True,
                          timeout=30, env=caddy.environment(settings, os.environ))
    assert proc.returncode == 0 and "Valid configuration" in proc.stdout
    assert "not formatted" not in proc.stderr


def test_settings_from_config_load_render_and_validate(tmp_path: Path) -> None:
    settings = load(POGLY_WEB_ROOT=str(tmp_path / "web"), POGLY_RUN_DIR=str(tmp_path / "run"))
    path = caddy.write(settings, caddy.render(settings))
    run(caddy.validate(settings, path, ch.subprocess_runner))


# -- defence in depth in the renderer -----------------------------------------------


@pytest.mark.parametrize("bad", ["a b", 'a"b', "a`b", "a\\b", "{$HOME}", "{path}", "}", "a\nb", "",
                                 "#comment", "<<EOF", "a\x00b", "a\u2028b", "a\x85b", True, None, 1.5])
def test_check_token_rejects(bad: object) -> None:
    with pytest.raises(caddy.CaddyConfigError) as info:
        caddy.check_token("web_root", bad)
    assert "web_root" in str(info.value)
    assert info.value.exit_code == 78


@pytest.mark.parametrize("space", ["\t", "\n", "\v", "\f", "\r", " ", "\x85", "\xa0", "\u1680", "\u2000",
                                   "\u2005", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"])
def test_check_token_rejects_every_unicode_white_space(space: str) -> None:
    # Caddy's lexer splits tokens on Go's unicode.IsSpace (the White_Space property).
    with pytest.raises(caddy.CaddyConfigError):
        caddy.check_token("web_root", f"/srv{space}x")


@pytest.mark.parametrize("good", ["/srv/web", "127.0.0.1:3000", "[::1]:3000", 8080, Path("/run/pogly"),
                                  "/srv/a#b", "/srv/<<x", "/srv/ünïcode"])
def test_check_token_accepts(good: object) -> None:
    assert caddy.check_token("x", good) == str(good)


@pytest.mark.parametrize("field", ["web_root", "run_dir"])
def test_render_rechecks_values_that_bypassed_config(tmp_path: Path, field: str) -> None:
    settings = ch.base_settings(tmp_path, **{field: Path("/srv/x\n\trespond pwned 200")})
    with pytest.raises(caddy.CaddyConfigError, match=field):
        caddy.render(settings)


def test_render_rechecks_addresses(tmp_path: Path) -> None:
    settings = ch.base_settings(tmp_path, spacetime_addr=HostPort("h{$HOME}", 1))
    with pytest.raises(caddy.CaddyConfigError, match="spacetime_addr"):
        caddy.render(settings)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "80"])
def test_render_rechecks_port(tmp_path: Path, port: object) -> None:
    with pytest.raises(caddy.CaddyConfigError, match="http_port"):
        caddy.render(ch.base_settings(tmp_path, http_port=port))


def test_finalize_checks_every_expression(tmp_path: Path) -> None:
    (tmp_path / "Caddyfile.j2").write_text(':{{ http_port }} {\n\trespond {{ "a b" }}\n}\n')
    with pytest.raises(caddy.CaddyConfigError, match="single safe token"):
        caddy.render(ch.base_settings(tmp_path), template_dir=tmp_path)


def test_undefined_variable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "Caddyfile.j2").write_text(":{{ http_port }} {\n\troot * {{ nope }}\n}\n")
    with pytest.raises(caddy.CaddyConfigError, match="nope"):
        caddy.render(ch.base_settings(tmp_path), template_dir=tmp_path)


def test_template_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "Caddyfile.j2").write_text(":{{ http_port }} {\n{% if %}\n}\n")
    with pytest.raises(caddy.CaddyConfigError, match=r"Caddyfile.j2:2"):
        caddy.render(ch.base_settings(tmp_path), template_dir=tmp_path)


# -- injection through the environment ---------------------------------------------------


@pytest.mark.parametrize("payload", INJECTION_PAYLOADS, ids=["quote", "newline-directive", "env", "placeholder",
                                                             "backtick", "brace"])
@pytest.mark.parametrize("variable", sorted(TEMPLATED))
@pytest.mark.parametrize("where", ["suffix", "prefix", "middle"])
def test_injection_is_rejected_naming_the_variable(variable: str, payload: str, where: str) -> None:
    good = TEMPLATED[variable]
    value = {"suffix": good + payload, "prefix": payload + good,
             "middle": good[:1] + payload + good[1:]}[where]
    with pytest.raises(ConfigError) as info:
        load(**{variable: value})
    assert info.value.exit_code == 78
    assert variable in {p.variable for p in info.value.problems}, str(info.value)


_BASELINE_DIR = "/srv/baseline"


def _structure_ok(settings: config.Settings, field: str, expected_token: str) -> None:
    """The rendered file has the baseline's token structure; only ``field``'s token differs."""
    baseline = ch.tokens_by_line(caddy.render(settings_baseline(settings, field)))
    rendered = ch.tokens_by_line(caddy.render(settings))
    assert rendered.keys() == baseline.keys()
    placeholder = str(getattr(settings_baseline(settings, field), field))
    seen = 0
    for number, tokens in rendered.items():
        base = baseline[number]
        assert len(tokens) == len(base), (number, tokens, base)
        for token, base_token in zip(tokens, base, strict=True):
            if base_token == placeholder:
                assert token == expected_token
                seen += 1
            else:
                assert token == base_token
    assert seen >= 1


def settings_baseline(settings: config.Settings, field: str) -> config.Settings:
    marker = {"web_root": Path(_BASELINE_DIR + "/web"), "run_dir": Path(_BASELINE_DIR + "/run"),
              "spacetime_addr": HostPort("baseline-stdb", 3000), "health_addr": HostPort("baseline-health", 8079)}
    return replace(settings, **{field: marker[field]})


_C1 = re.compile("[\x80-\x9f]")

_ENV_FIELD = {"POGLY_WEB_ROOT": "web_root", "POGLY_RUN_DIR": "run_dir",
              "POGLY_SPACETIME_ADDR": "spacetime_addr", "POGLY_HEALTH_ADDR": "health_addr"}

_any_text = st.text(st.characters(codec="utf-8"), max_size=40)
_path_like = st.builds(lambda a, b: "/" + a + b, _any_text, st.sampled_from(["", "/", "\n", '"', "}", "x"]))
_addr_like = st.builds(lambda h, p: f"{h}:{p}", _any_text | st.sampled_from(["127.0.0.1", "[::1]", "stdb"]),
                       st.integers(min_value=-1, max_value=70000) | st.just("80x"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variable=st.sampled_from(sorted(_ENV_FIELD)), value=_any_text | _path_like | _addr_like)
def test_property_paths_and_addresses_rejected_or_one_token(variable: str, value: str) -> None:
    try:
        settings = load(**{variable: value})
    except ConfigError as exc:
        assert variable in {p.variable for p in exc.problems}
        return
    field = _ENV_FIELD[variable]
    token = str(getattr(settings, field))
    assume(token not in (str(getattr(settings_baseline(settings, field), field)),))
    try:
        caddy.render(settings)
    except caddy.CaddyConfigError as exc:
        # The renderer's own re-check is stricter than config.py (C1 controls):
        # still exit 78, and it names the field.
        assert field in str(exc)
        assert _C1.search(token), token
        return
    _structure_ok(settings, field, token)


@settings(max_examples=150, deadline=None)
@given(value=_any_text | st.builds(lambda s, r: s + r, st.sampled_from(["http://", "https://"]), _any_text))
def test_property_public_url_rejected_or_only_toggles_hsts(value: str) -> None:
    try:
        settings = load(POGLY_PUBLIC_URL=value, STRICT_MODE="true")
    except ConfigError as exc:
        assert "POGLY_PUBLIC_URL" in {p.variable for p in exc.problems}
        return
    text = caddy.render(settings)
    with_hsts = caddy.render(replace(settings, public_url="https://fixed.example"))
    without = caddy.render(replace(settings, public_url=None))
    assert text in (with_hsts, without)
    assert (text == with_hsts) == (settings.public_url or "").startswith("https://")


@pytest.mark.parametrize("variable", ["POGLY_PUBLIC_URL", "OIDC_ISSUER"])
def test_unbalanced_bracket_url_is_a_config_error(variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{variable: "https://[::1"})
    assert variable in {p.variable for p in info.value.problems}


@pytest.mark.parametrize("web_root", ["/srv/#hash", "/srv/<<EOF", "/srv/a;b|c&d$e(f)", "/srv/%41%7B", "/srv/ünï"])
def test_odd_but_valid_paths_reach_caddy_as_one_token(tmp_path: Path, web_root: str) -> None:
    settings = load(POGLY_WEB_ROOT=web_root, POGLY_RUN_DIR=str(tmp_path / "run"))
    path = caddy.write(settings, caddy.render(settings))
    proc = subprocess.run([ch.CADDY_BIN, "adapt", "--config", str(path), "--adapter", "caddyfile"],
                          capture_output=True, text=True, timeout=30,
                          env=caddy.environment(settings, os.environ), check=True)
    roots = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("handler") == "vars" and "root" in node:
                roots.add(node["root"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(proc.stdout))
    assert roots == {web_root, str(tmp_path / "run")}


# -- validate: Caddy's error, verbatim, and no caddy run ------------------------------------


def _broken(tmp_path: Path, body: str) -> tuple[config.Settings, Path, Path]:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "Caddyfile.j2").write_text(body)
    settings = ch.base_settings(tmp_path)
    text = caddy.render(settings, template_dir=templates)
    return settings, caddy.write(settings, text), templates


def test_broken_template_unknown_directive(tmp_path: Path) -> None:
    settings, path, _ = _broken(tmp_path, "{\n\tadmin off\n}\n\n:{{ http_port }} {\n\tbogus_directive on\n}\n")
    runner = ch.RecordingRunner()
    with pytest.raises(caddy.CaddyConfigError) as info:
        run(caddy.validate(settings, path, runner))
    err = info.value
    assert err.exit_code == 78 and isinstance(err, ConfigError)
    assert f"{path}:6: unrecognized directive: bogus_directive" in err.message
    assert err.lines == [(6, "\tbogus_directive on")]
    assert "bogus_directive on" in str(err) and "line 6" in str(err)
    # Only `caddy validate` ran: nothing here ever starts `caddy run`.
    assert len(runner.calls) == 1
    assert runner.calls[0][:2] == [ch.CADDY_BIN, "validate"]
    assert all("run" not in argv[1:2] for argv in runner.calls)


def test_broken_template_unclosed_brace(tmp_path: Path) -> None:
    settings, path, _ = _broken(tmp_path, ":{{ http_port }} {\n\trespond ok\n")
    runner = ch.RecordingRunner()
    with pytest.raises(caddy.CaddyConfigError) as info:
        run(caddy.validate(settings, path, runner))
    assert "syntax error" in info.value.message or "expecting" in info.value.message
    assert info.value.lines == [(2, "\trespond ok")]
    assert [argv[1] for argv in runner.calls] == ["validate"]


def test_validate_reports_exit_status_without_stderr(tmp_path: Path) -> None:
    async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
        return 1, b"", b""

    settings = ch.base_settings(tmp_path)
    path = caddy.write(settings, caddy.render(settings))
    with pytest.raises(caddy.CaddyConfigError, match="exited with status 1"):
        run(caddy.validate(settings, path, runner))


def test_validate_passes_scrubbed_env_and_timeout(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    async def runner(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
        seen.update(argv=argv, env=env, timeout=timeout)
        return 0, b"Valid configuration\n", b""

    settings = ch.base_settings(tmp_path)
    path = caddy.write(settings, caddy.render(settings))
    run(caddy.validate(settings, path, runner, base_env={"PATH": "/bin", "OIDC_CLIENT_SECRET": "s3cr3t"},
                       timeout=7))
    assert seen["argv"] == [ch.CADDY_BIN, "validate", "--config", str(path), "--adapter", "caddyfile"]
    assert seen["timeout"] == 7
    assert "OIDC_CLIENT_SECRET" not in seen["env"]  # type: ignore[operator]


def test_environment_and_run_command(tmp_path: Path) -> None:
    settings = ch.base_settings(tmp_path)
    env = caddy.environment(settings, {"PATH": "/usr/bin", "OIDC_CLIENT_SECRET": "x", "POGLY_WEB_ROOT": "/w",
                                       "HOME": "/root", "TZ": "UTC", "CADDY_ADMIN": "0.0.0.0:2019"})
    assert env["PATH"] == "/usr/bin" and env["TZ"] == "UTC"
    assert env["XDG_CONFIG_HOME"].startswith(str(settings.run_dir))
    assert env["XDG_DATA_HOME"].startswith(str(settings.run_dir))
    assert env["HOME"].startswith(str(settings.run_dir))
    for dropped in ("OIDC_CLIENT_SECRET", "POGLY_WEB_ROOT", "CADDY_ADMIN"):
        assert dropped not in env
    assert "PATH" in caddy.environment(settings, {})
    path = settings.run_dir / "Caddyfile"
    assert caddy.run_command(settings, path) == [ch.CADDY_BIN, "run", "--config", str(path),
                                                 "--adapter", "caddyfile"]


# -- the public port, through a real Caddy -------------------------------------------------


def _assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert "server" not in response.headers
    assert "via" not in response.headers


@pytest.mark.parametrize(("method", "target"), FORBIDDEN_ROUTES)
def test_forbidden_on_public_port_but_reachable_on_loopback(stack, method: str, target: str) -> None:  # type: ignore[no-untyped-def]
    path = target.split("?", 1)[0]
    with client(stack.url) as public:
        response = public.request(method, target, content=b"\0asm" if method in ("POST", "PUT") else None)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith("403 Forbidden: ")
    _assert_security_headers(response)
    assert not stack.upstream.saw(method, path)
    if path.startswith(("/internal", "/metrics", "/prometheus")):
        return  # process-level SpacetimeDB paths: not part of the proxied prefixes at all
    # The same request to the loopback address reaches SpacetimeDB (our own publishing uses it).
    with client(stack.upstream_url) as loopback:
        direct = loopback.request(method, target)
    assert direct.status_code == 200
    assert stack.upstream.saw(method, path)


@pytest.mark.parametrize(("method", "target"), WEB_APP_ROUTES)
def test_web_app_routes_reach_spacetimedb(stack, method: str, target: str) -> None:  # type: ignore[no-untyped-def]
    path = target.split("?", 1)[0]
    with client(stack.url) as public:
        response = public.request(method, target, headers={"Authorization": "Bearer x.y.z"},
                                  content=b"[]" if method == "POST" else None)
    assert response.status_code == 200, response.text
    if method not in ("HEAD", "OPTIONS") and path != "/v1/ping":
        assert response.text == f"standin {method} {target}"
    _assert_security_headers(response)
    assert stack.upstream.saw(method, path)


def test_ping_proxied(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get("/v1/ping")
    assert response.status_code == 200 and response.content == b""
    assert stack.upstream.saw("GET", "/v1/ping")


@pytest.mark.parametrize("target", [
    "/v1/database/pogly/names/../subscribe",
    "/v1/database/pogly/x/../call/foo",
    "/v1/database/pogly%2Fnames/call/x",
    "/v1/database/pogly/call/%2e%2e",
    "/v1/./ping",
    "//v1/ping",
    "/v1//ping",
    "/v1/ping/..",
    "/v1/database/pogly%5Cnames/identity",
    "/assets/../v1/metrics",
])
def test_non_canonical_api_paths_are_refused(stack, target: str) -> None:  # type: ignore[no-untyped-def]
    method = "POST" if "/call/" in target else "GET"
    before = len(stack.upstream.records)
    status, data = raw_request(stack.settings.http_port,
                               f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                               "Connection: close\r\n\r\n".encode())
    assert status in (400, 403), data
    assert len(stack.upstream.records) == before


def test_query_strings_may_contain_dots_and_slashes(stack) -> None:  # type: ignore[no-untyped-def]
    status, data = raw_request(stack.settings.http_port,
                               b"GET /v1/ping?x=../..%2F//a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200, data


@pytest.mark.parametrize("target", SPA_ROUTES)
def test_spa_fallback_serves_index(stack, target: str) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get(target)
    assert response.status_code == 200
    assert response.text == ch.INDEX_HTML
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["content-type"].startswith("text/html")
    _assert_security_headers(response)


def test_static_files_and_assets(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        renew = public.get("/silent-oidc-renew.html")
        asset = public.get(f"/assets/{ch.ASSET_NAME}", headers={"Accept-Encoding": "gzip"})
        missing = public.get("/assets/nope-123.js")
        zstd = public.get(f"/assets/{ch.ASSET_NAME}", headers={"Accept-Encoding": "zstd"})
    assert renew.status_code == 200 and "<script>" in renew.text
    assert asset.status_code == 200 and asset.text == ch.ASSET_JS
    assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert asset.headers["content-encoding"] == "gzip"
    assert zstd.headers.get("content-encoding") == "zstd"
    assert missing.status_code == 404  # hashed assets never fall back to index.html
    _assert_security_headers(asset)


def test_config_js_no_store(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get("/config.js")
    assert response.status_code == 200
    assert response.text == ch.CONFIG_JS
    assert response.headers["cache-control"] == "no-store"
    assert "javascript" in response.headers["content-type"]
    _assert_security_headers(response)


def test_caddyfile_itself_is_not_served(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get("/Caddyfile")
    assert "admin off" not in response.text


def test_status_is_not_public(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get("/status")
    assert response.status_code == 403
    assert "loopback" in response.text


def test_non_strict_has_no_hsts_or_permissions_policy(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        response = public.get("/")
    assert "strict-transport-security" not in response.headers
    assert "permissions-policy" not in response.headers


@pytest.mark.parametrize("path", ["/v1/database/pogly/subscribe", "/database/subscribe/pogly"])
def test_websocket_with_subprotocol_proxied_both_ways(stack, path: str) -> None:  # type: ignore[no-untyped-def]
    url = f"ws://127.0.0.1:{stack.settings.http_port}{path}?token=abc.def.ghi&compression=None"
    with ws_connect(url, subprotocols=[ch.SUBPROTOCOL], open_timeout=10, close_timeout=5,
                    proxy=None) as ws:
        assert ws.subprotocol == ch.SUBPROTOCOL
        assert json.loads(ws.recv(timeout=10)) == {"hello": ch.SUBPROTOCOL}  # upstream -> client
        ws.send('{"subscribe":["SELECT * FROM widgets"]}')  # client -> upstream -> client
        assert ws.recv(timeout=10) == 'echo:{"subscribe":["SELECT * FROM widgets"]}'
        ws.send(b"\x01\x02")
        assert ws.recv(timeout=10) == b"echo:\x01\x02"
    info = stack.upstream.ws_log[-1]
    assert info["protocol"] == ch.SUBPROTOCOL
    assert info["query"]["token"] == "abc.def.ghi"


def test_access_log_redacts_tokens(bg, stack) -> None:  # type: ignore[no-untyped-def]
    url = f"ws://127.0.0.1:{stack.settings.http_port}/v1/database/pogly/subscribe?token=WS-SECRET-1&probe=redact"
    with ws_connect(url, subprotocols=[ch.SUBPROTOCOL], open_timeout=10, proxy=None) as ws:
        ws.recv(timeout=10)
    with client(stack.url) as public:
        call = public.post("/v1/database/pogly/call/log_probe", content=b"[]",
                           headers={"Authorization": "Bearer AUTH-SECRET-2"})
    assert call.headers["spacetime-identity-token"] == ch.IDENTITY_TOKEN  # the client still gets it

    def access(path: str, marker: str = ""):  # type: ignore[no-untyped-def]
        def match(line: object) -> bool:
            uri = str(line.get("request", {}).get("uri", "")) if isinstance(line, dict) else ""
            return line.get("msg") == "handled request" and uri.startswith(path) and marker in uri  # type: ignore[union-attr]
        return match

    ws_line = bg.run(stack.caddy.wait_for_line(access("/v1/database/pogly/subscribe", "probe=redact")))
    call_line = bg.run(stack.caddy.wait_for_line(access("/v1/database/pogly/call/log_probe")))
    text = json.dumps([ws_line, call_line])
    for secret in ("WS-SECRET-1", "AUTH-SECRET-2", ch.IDENTITY_TOKEN):
        assert secret not in text
    assert "token=REDACTED" in ws_line["request"]["uri"]
    assert call_line["resp_headers"]["Spacetime-Identity-Token"] in ("REDACTED", ["REDACTED"])


def test_caddy_logs_are_json(stack) -> None:  # type: ignore[no-untyped-def]
    with client(stack.url) as public:
        public.get("/callback")
    assert stack.caddy.lines
    assert all(isinstance(line, dict) for line in stack.caddy.lines), stack.caddy.lines
    assert not [line for line in stack.caddy.lines if isinstance(line, dict) and line.get("level") == "error"]


@pytest.mark.parametrize(("method", "target"), [
    ("POST", "/v1/database"), ("PUT", "/v1/database/x"), ("GET", "/v1/metrics"),
    ("GET", "/v1/database/pogly/logs"), ("DELETE", "/v1/database/pogly"), ("POST", "/database/publish"),
    ("GET", "/v1/ping"),
])
def test_full_mode_proxies_all_api_paths(stack_full, method: str, target: str) -> None:  # type: ignore[no-untyped-def]
    with client(stack_full.url) as public:
        response = public.request(method, target)
    assert response.status_code == 200, response.text
    assert stack_full.upstream.saw(method, target)
    _assert_security_headers(response)


def test_full_mode_still_hides_root_internals_and_status(stack_full) -> None:  # type: ignore[no-untyped-def]
    with client(stack_full.url) as public:
        assert public.get("/internal/heap").status_code == 403
        assert public.get("/status").status_code == 403
        assert public.get("/callback").text == ch.INDEX_HTML


@pytest.mark.parametrize("target", ["/v1/database/pogly/sql", "/database/sql/pogly"])
def test_strict_mode_forbids_sql(stack_strict, target: str) -> None:  # type: ignore[no-untyped-def]
    with client(stack_strict.url) as public:
        response = public.post(target, content=b"SELECT * FROM widgets")
    assert response.status_code == 403
    assert "STRICT_MODE" in response.text
    assert not stack_strict.upstream.saw("POST", target)


def test_strict_mode_headers_and_web_app(stack_strict) -> None:  # type: ignore[no-untyped-def]
    with client(stack_strict.url) as public:
        index = public.get("/overlay")
        call = public.post("/v1/database/pogly/call/add_widget", content=b"[]")
    for response in (index, call):
        _assert_security_headers(response)
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        policy = response.headers["permissions-policy"]
        assert "camera=()" in policy and "microphone=()" in policy
        assert "autoplay" not in policy and "fullscreen" not in policy
    assert call.status_code == 200


def test_grace_period_and_clean_exit(bg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack = bg.run(ch.start_stack(tmp_path, stop_timeout=5.0))
    rc = bg.run(ch.stop_stack(stack))
    assert rc == 0
    grace = [line for line in stack.caddy.lines
             if isinstance(line, dict) and line.get("msg") == "servers shutting down; grace period initiated"]
    assert grace and grace[0]["duration"] == pytest.approx(caddy.stop_grace(stack.settings))
