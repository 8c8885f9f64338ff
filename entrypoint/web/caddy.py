"""Caddy as a supervised child: render its Caddyfile, validate it, and say how to run it.

Why a template plus ``caddy validate`` instead of building JSON: operators read
and patch Caddyfiles, and the Caddyfile adapter is what upstream documents.  The
price is that Caddyfile syntax is injection-prone (``{$ENV}`` is substituted
before parsing, ``{placeholders}`` expand at request time, quoting is subtle), so
values are *validated, not escaped*: config.py's allowlists reject anything that
is not one plain token, and :func:`render` checks every interpolated value again
(defence in depth) before a byte is written.

Why validate before run: ``caddy run`` 2.11 exits 1 *without printing the error*
when the Caddyfile does not adapt (its logs are still buffered when it fails), so
the only way to show an operator what is wrong is ``caddy validate``, whose
error message names ``file:line``.  Nothing here starts ``caddy run``; the
supervisor does that with :func:`run_command` once :func:`validate` passed.

Why jinja2 is imported lazily: PID 1 lives for the container's whole life, and
jinja2 (+ markupsafe) costs ~1.8 MB of its RSS and ~40 ms of start-up CPU.  On
a restart the Caddyfile on disk is usually exactly what a render would produce;
:func:`render_key` says so from the inputs alone (template bytes, the checked
context, this code and jinja2's version) and :func:`reusable_caddyfile` hands
back the file when its stamp and its text agree, so jinja2 is never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.config import ConfigError, Problem, Settings
from entrypoint.fsutil import atomic_write, read_small_file
from entrypoint.version import __version__

if TYPE_CHECKING:
    import jinja2

TEMPLATE_NAME = "Caddyfile.j2"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
CADDYFILE_NAME = "Caddyfile"
# Beside the Caddyfile: which inputs it was rendered from and the hash of its text (see reusable_caddyfile).
RENDER_STAMP_SUFFIX = ".rendered"
#: A rendered Caddyfile is a few KiB; anything near this is not ours and is rendered again.
CADDYFILE_LIMIT = 1024 * 1024
# Bump when what goes into render_key changes meaning, so no old stamp can ever match by accident.
_RENDER_KEY_FORMAT = b"pogly-caddyfile-render/1"
READY_MSG = "serving initial configuration"
VALIDATE_TIMEOUT = 30.0
# Caddy's own grace period is capped so a slow client can never eat the whole
# SIGTERM budget: the supervisor must still have time to stop SpacetimeDB.
MAX_GRACE = 10.0
GRACE_SHARE = 0.4

# One async call: (argv, env, timeout) -> (returncode, stdout, stderr).  The
# supervisor's process module supplies one that cooperates with the PID-1 reaper.
Runner = Callable[[list[str], dict[str, str], float], Awaitable[tuple[int, bytes, bytes]]]

# Environment variables Caddy may inherit.  Everything else (OIDC secrets, user
# values) is dropped, so even a stray {$VAR} or {env.VAR} could not leak it.
_ENV_ALLOW = frozenset({
    "PATH", "HOME", "TZ", "LANG", "LC_ALL", "LC_CTYPE",
    "GOMAXPROCS", "GOMEMLIMIT", "GOGC", "GODEBUG",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
})

# What one interpolated string may look like: no character that ends a token,
# starts a quote, an escape, a placeholder/block or a control sequence.  Also
# refuse a leading "#" (comment) or "<<" (heredoc), which only matter unquoted,
# but the template must not depend on being quoted correctly.
_TOKEN_BAD = re.compile(r"[\s\"'`\\{}\x00-\x1f\x7f-\x9f]")


class CaddyConfigError(ConfigError):
    """The Caddyfile could not be rendered or Caddy rejected it: exit 78, don't start Caddy.

    A subclass of :class:`ConfigError` so the CLI's existing "exit 78" handling
    covers it.  ``message`` is Caddy's own error text (verbatim) or the render
    problem; ``lines`` are the offending rendered lines ``(number, text)`` when
    Caddy named ``file:line``.
    """

    def __init__(self, message: str, *, path: Path | None = None,
                 lines: list[tuple[int, str]] | None = None, stderr: str = "") -> None:
        self.message = message
        self.path = path
        self.lines = lines or []
        self.stderr = stderr
        super().__init__([Problem("Caddyfile", None, message)])
        self.args = (str(self),)

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        out = [f"invalid Caddyfile{where}: {self.message}"]
        out += [f"  line {n}: {text}" for n, text in self.lines]
        return "\n".join(out)


def stop_grace(settings: Settings) -> float:
    """Caddy's ``grace_period`` in seconds: at most 10 s and 40 % of the stop timeout.

    Rounded to whole milliseconds, the unit written into the Caddyfile, so the
    supervisor's arithmetic matches what Caddy enforces.
    """
    grace = min(MAX_GRACE, settings.stop_timeout * GRACE_SHARE)
    return max(0.001, math.floor(grace * 1000) / 1000)


def _duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def check_token(name: str, value: object) -> str:
    """Return ``value`` as one safe Caddyfile token or raise ``CaddyConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Path)):
        raise CaddyConfigError(f"template value {name} has unsupported type {type(value).__name__}")
    text = str(value)
    if not text or _TOKEN_BAD.search(text) or text.startswith(("#", "<<")):
        raise CaddyConfigError(f"template value {name}={text!r} is not a single safe token")
    return text


def _finalize(value: object) -> object:
    """Jinja ``finalize``: every ``{{ … }}`` is re-checked, whatever the template does."""
    import jinja2  # already loaded: only render() calls this

    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    return check_token("(interpolated)", value)


def template_context(settings: Settings) -> dict[str, Any]:
    """The values the template sees, each already checked by name."""
    tokens = {
        "http_port": settings.http_port,
        "spacetime_addr": str(settings.spacetime_addr),
        "health_addr": str(settings.health_addr),
        "web_root": str(settings.web_root),
        "run_dir": str(settings.run_dir),
        "grace_period": _duration(stop_grace(settings)),
    }
    context: dict[str, Any] = {name: check_token(name, value) for name, value in tokens.items()}
    port = settings.http_port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CaddyConfigError(f"template value http_port={port!r} is not a TCP port")
    context["public_api"] = check_token("public_api", settings.public_api)
    if context["public_api"] not in ("minimal", "full"):
        raise CaddyConfigError(f"template value public_api={settings.public_api!r} is not minimal|full")
    context["strict_mode"] = bool(settings.strict_mode)
    # POGLY_PUBLIC_METRICS: /metrics on the public port goes to the health server, not to a 403.
    context["public_metrics"] = bool(settings.public_metrics)
    # HSTS over plain HTTP is ignored by browsers and wrong when the public
    # origin is http; it only makes sense behind an https terminator.
    context["hsts"] = bool(settings.strict_mode and (settings.public_url or "").startswith("https://"))
    return context


def _environment(template_dir: Path) -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # HTML escaping would turn 'self' into &#39;self&#39;
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(settings: Settings, template_dir: Path | None = None) -> str:
    """Render the Caddyfile text; ``CaddyConfigError`` if the template or a value is unusable."""
    import jinja2  # here, not at the top: a restart that reuses the Caddyfile never loads it

    directory = template_dir or TEMPLATE_DIR
    context = template_context(settings)
    try:
        return _environment(directory).get_template(TEMPLATE_NAME).render(context)
    except CaddyConfigError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        where = f"{exc.filename or TEMPLATE_NAME}:{exc.lineno}"
        raise CaddyConfigError(f"template {where}: {exc.message}") from exc
    except jinja2.TemplateError as exc:
        raise CaddyConfigError(f"template {directory / TEMPLATE_NAME}: {exc}") from exc


def caddyfile_path(settings: Settings) -> Path:
    return settings.run_dir / CADDYFILE_NAME


def write(settings: Settings, text: str) -> Path:
    """Write ``text`` to ``run_dir/Caddyfile`` atomically: Caddy never reads half a file."""
    path = caddyfile_path(settings)
    atomic_write(path, text, mode=0o644)
    return path


def render_stamp_path(settings: Settings) -> Path:
    return settings.run_dir / (CADDYFILE_NAME + RENDER_STAMP_SUFFIX)


def _template_files(template_dir: Path) -> list[tuple[str, bytes]]:
    """Every file under ``template_dir``, by relative path: what the template and anything it includes can read.

    Jinja's ``FileSystemLoader`` loads only from ``template_dir``, so whatever
    ``Caddyfile.j2`` includes, imports or extends is one of these files.
    Hashing them all covers includes without parsing the template (which
    would need jinja2), at the price of a re-render when an unrelated file
    there changes.
    """
    files = []
    for path in sorted(template_dir.rglob("*")):
        if path.is_file():
            files.append((path.relative_to(template_dir).as_posix(), path.read_bytes()))
    if not any(name == TEMPLATE_NAME for name, _ in files):
        raise FileNotFoundError(template_dir / TEMPLATE_NAME)
    return files


def render_key(settings: Settings, template_dir: Path | None = None) -> str | None:
    """A hash of everything :func:`render` output depends on, computed without importing jinja2.

    Inputs: the template directory's files (the template and anything it
    includes), :func:`template_context` serialised canonically, our version,
    this module's source (``finalize`` and the ``Environment`` options shape
    the output too) and jinja2's ``__init__.py`` (its version).  ``None`` when
    any of them cannot be read or a value fails its check: then the caller
    renders, which reports the problem as it always did.
    """
    try:
        context = template_context(settings)
        files = _template_files(template_dir or TEMPLATE_DIR)
        code = Path(__file__).read_bytes()
        # Where jinja2 would be imported from, by the path alone: finds, never imports, whatever sys.modules holds.
        spec = importlib.machinery.PathFinder.find_spec("jinja2")
        if spec is None or spec.origin is None:
            return None
        engine = Path(spec.origin).read_bytes()
    except (CaddyConfigError, OSError, ValueError, ImportError):
        return None
    digest = hashlib.sha256()

    def part(label: str, data: bytes) -> None:  # length-prefixed: no two input sets hash the same stream
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    part("format", _RENDER_KEY_FORMAT)
    part("version", __version__.encode())
    part("code", code)
    part("jinja2", engine)
    part("context", json.dumps(context, sort_keys=True, separators=(",", ":")).encode())
    for name, data in files:
        part(f"template:{name}", data)
    return digest.hexdigest()


def _text_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reusable_caddyfile(settings: Settings, key: str | None) -> str | None:
    """The Caddyfile on disk, if it is exactly what :func:`render` would write now; else ``None``.

    It is when the stamp beside it names the same ``render_key`` and the
    file's bytes still hash to what was written (a hand-edited, truncated or
    half-copied file is rendered again).  Anything unreadable or odd: ``None``.
    """
    if key is None:
        return None
    path = caddyfile_path(settings)
    raw_stamp = read_small_file(render_stamp_path(settings))
    data = read_small_file(path, CADDYFILE_LIMIT)
    if raw_stamp is None or data is None:  # missing, or not a plain file (a FIFO must not block the loop)
        return None
    try:
        stamp = json.loads(raw_stamp)
        text = data.decode("utf-8")
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(stamp, dict) or stamp.get("render_key") != key or stamp.get("sha256") != _text_hash(data):
        return None
    return text


def write_render_stamp(settings: Settings, key: str, text: str) -> Path:
    """Record which inputs produced the Caddyfile just written, and its hash; atomic like the file itself.

    Written after the Caddyfile: a crash in between leaves an old stamp whose
    hash no longer matches the new file, so the next start renders again.
    A sidecar rather than a header comment in the Caddyfile, so the file stays
    byte for byte what ``pogly-entrypoint render`` prints (and a hash of the
    text cannot sit inside the text it hashes).
    """
    path = render_stamp_path(settings)
    record = {"render_key": key, "sha256": _text_hash(text.encode()), "version": __version__}
    atomic_write(path, json.dumps(record, sort_keys=True) + "\n", mode=0o644)
    return path


def environment(settings: Settings, base_env: Mapping[str, str]) -> dict[str, str]:
    """Caddy's environment: a scrubbed copy of ``base_env`` plus XDG dirs under ``run_dir``.

    Caddy writes ``$XDG_CONFIG_HOME/caddy`` and ``$XDG_DATA_HOME/caddy`` even
    with ``auto_https off``; pointing them into the run dir keeps a read-only
    root filesystem working.  No user value is passed through the environment
    (the template never uses ``{$VAR}``), and secrets are not inherited.
    """
    env = {k: v for k, v in base_env.items() if k in _ENV_ALLOW}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = str(settings.run_dir / "caddy-home")
    env["XDG_CONFIG_HOME"] = str(settings.run_dir / "caddy-config")
    env["XDG_DATA_HOME"] = str(settings.run_dir / "caddy-data")
    return env


def run_command(settings: Settings, path: Path) -> list[str]:
    """argv for the long-running Caddy child (never started here)."""
    return [settings.caddy_bin, "run", "--config", str(path), "--adapter", "caddyfile"]


def validate_command(settings: Settings, path: Path) -> list[str]:
    return [settings.caddy_bin, "validate", "--config", str(path), "--adapter", "caddyfile"]


def _error_messages(stderr: str) -> list[str]:
    """Caddy's error messages: JSON log lines at level error, else the non-JSON lines."""
    messages: list[str] = []
    plain: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            plain.append(line)
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "fatal", "panic"):
            text = str(record.get("msg", ""))
            if record.get("error"):
                text = f"{text}: {record['error']}" if text else str(record["error"])
            messages.append(text)
    return messages or plain


def offending_lines(message: str, path: Path, text: str) -> list[tuple[int, str]]:
    """The rendered lines Caddy's message points at (``<path>:<line>``)."""
    lines = text.splitlines()
    found: list[tuple[int, str]] = []
    names = {re.escape(str(path)), re.escape(path.name)}
    pattern = re.compile(r"(?:^|[\s'\"(\[])(?:" + "|".join(sorted(names, key=len, reverse=True)) + r"):(\d+)")
    for match in pattern.finditer(message):
        number = int(match.group(1))
        if 1 <= number <= len(lines) and all(n != number for n, _ in found):
            found.append((number, lines[number - 1]))
    return found


def validation_key(settings: Settings, text: str) -> str:
    """Identifies "this Caddyfile, checked by this caddy binary", so a restart can skip re-validating.

    ``caddy validate`` costs a few hundred milliseconds of start-up; the answer
    cannot change unless the file or the binary does.
    """
    try:
        st = os.stat(settings.caddy_bin)
        binary = f"{settings.caddy_bin}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    except OSError:
        binary = settings.caddy_bin
    return hashlib.sha256(f"{binary}\n{text}".encode()).hexdigest()


async def validate(settings: Settings, path: Path, runner: Runner,
                   base_env: Mapping[str, str] | None = None,
                   timeout: float = VALIDATE_TIMEOUT) -> None:
    """Run ``caddy validate`` on ``path``; raise ``CaddyConfigError`` with Caddy's message if it fails.

    ``runner`` errors (``TimeoutError``, ``OSError``) propagate: they are not
    configuration problems.
    """
    env = environment(settings, os.environ if base_env is None else base_env)
    rc, _out, err = await runner(validate_command(settings, path), env, timeout)
    if rc == 0:
        return
    stderr = err.decode("utf-8", "replace")
    messages = _error_messages(stderr)
    message = "\n".join(messages) if messages else f"caddy validate exited with status {rc}"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    raise CaddyConfigError(message, path=path, lines=offending_lines(message, path, text), stderr=stderr)
