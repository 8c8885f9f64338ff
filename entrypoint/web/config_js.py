"""Runtime configuration for the browser: ``/config.js`` and the ``index.html`` hook.

Why a script file at runtime: one image must serve any OIDC provider, and the
Pogly web build (upstream since the self-host-rework merge, PR #92) reads its
provider from a global that ``index.html`` loads before the bundle.  Writing
``config.js`` at startup from the environment, and patching ``index.html`` to
load it when a build does not already, lets the same image sign people in at
the operator's provider without a rebuild.

``config.js`` defines exactly one global, with the keys the web app reads
(``src/Auth/oidc.ts``: ``window.POGLY_RUNTIME_CONFIG.OIDC_ISSUER`` and
``.OIDC_CLIENT_ID``, upper case; see ``reference/webapp-contract.md``)::

    window.POGLY_RUNTIME_CONFIG = {
      "OIDC_ISSUER": "...",        // OIDC_ISSUER, verbatim: oidc-client-ts "authority"
      "OIDC_CLIENT_ID": "...",     // OIDC_CLIENT_ID: oidc-client-ts "client_id"
      "configVersion": 2,          // informational; nothing reads it
      "streamPlatform": "twitch",  // informational; nothing reads it
      "streamName": "..."          // informational; nothing reads it
    };

Both OIDC values empty is the app's anonymous mode (OIDC off); an empty string
overrides any value built into the bundle, which is what OIDC off needs.  The
key names live here only (``KEY_OIDC_ISSUER``, ``KEY_OIDC_CLIENT_ID``,
``GLOBAL_NAME``); tests import them.  A plain assignment rather than
``Object.freeze``: it is the shape upstream's own entrypoint writes, so the app
sees exactly what it was built against (freezing would make any write to it by
the app's strict-mode module code throw, and protects nothing: any script on
the page can replace the global anyway).

The issuer is passed verbatim (never slash-normalised) because the browser's
authority and the ``iss`` SpacetimeDB sees must be the same string.

Why the escaping: the values are operator-controlled but end up in a script,
and ``config.js`` may also be inlined into a page one day.  JSON with
``<``, ``>``, ``&``, U+2028 and U+2029 written as ``\\uXXXX`` cannot close a
``<script>`` element, open an HTML comment, or end a JavaScript string early in
older engines, whatever the value contains, and parses back to the exact
original string.
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import structlog

from entrypoint.config import Settings
from entrypoint.fsutil import WriteFailed, atomic_write

log = structlog.get_logger("webconfig")

CONFIG_JS_NAME = "config.js"
CONFIG_JS_URL = "/config.js"
GLOBAL_NAME = "POGLY_RUNTIME_CONFIG"
KEY_OIDC_ISSUER = "OIDC_ISSUER"
KEY_OIDC_CLIENT_ID = "OIDC_CLIENT_ID"
CONFIG_VERSION = 2  # 1 had camel-case oidcIssuer/oidcClientId, which no web build reads
SCRIPT_TAG = f'<script src="{CONFIG_JS_URL}"></script>'

_SCRIPT_SAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SCRIPT_SAFE_RE = re.compile("[<>&\u2028\u2029]")
# src="/config.js", src='config.js?v=2', src=./config.js … all load our file.
_LOADS_CONFIG = re.compile(r"^(?:\./|/)?config\.js(?:[?#].*)?$", re.IGNORECASE)


def runtime_config(settings: Settings) -> dict[str, object]:
    """The object the browser sees, as a plain dict (key names documented above)."""
    return {
        KEY_OIDC_ISSUER: settings.oidc_issuer,
        KEY_OIDC_CLIENT_ID: settings.oidc_client_id,
        "configVersion": CONFIG_VERSION,
        "streamPlatform": settings.stream_platform,
        "streamName": settings.stream_name,
    }


def loads_config(src: str) -> bool:
    """Whether a ``<script src>`` value loads our ``config.js`` (``/``, ``./`` or bare, query allowed)."""
    return bool(_LOADS_CONFIG.match(src.strip()))


def script_safe_json(value: object) -> str:
    """JSON that is also safe anywhere inside an HTML ``<script>`` element.

    The replaced characters can only occur inside JSON strings, where the
    ``\\uXXXX`` form means the same character, so a blind replacement is exact.
    """
    text = json.dumps(value, ensure_ascii=True, indent=2, allow_nan=False)
    return _SCRIPT_SAFE_RE.sub(lambda m: _SCRIPT_SAFE[m.group(0)], text)


def render_config_js(settings: Settings) -> str:
    """The full text of ``config.js``."""
    body = script_safe_json(runtime_config(settings))
    return (
        "// Written by pogly-entrypoint at every start from the container's environment; do not edit.\n"
        f"window.{GLOBAL_NAME} = {body};\n"
    )


def write_config_js(settings: Settings) -> Path:
    """Write ``config.js`` into ``settings.run_dir`` atomically and return its path.

    Atomic because Caddy may serve it to a browser at any moment: a reader gets
    the old file or the new one, never half of one.  A run dir that cannot take
    it (full, read-only) is exit 78 naming ``POGLY_RUN_DIR``.
    """
    path = settings.run_dir / CONFIG_JS_NAME
    try:
        atomic_write(path, render_config_js(settings), mode=0o644)
    except WriteFailed as exc:
        raise exc.fatal("POGLY_RUN_DIR", settings.run_dir) from exc
    return path


class IndexScripts(HTMLParser):
    """What an ``index.html`` loads, and where a tag can go: one real tokenizer for both jobs.

    Used to inject the ``config.js`` tag (here) and to tell which web build is
    served (``webapp``); comments and attribute values containing ``<script``
    fool neither.  ``config_at``/``bundle_at`` are positions among the script
    tags: the config only counts when it comes before the bundle's script.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.config_at: int | None = None  # position among the scripts of the first config.js tag
        self.bundle_at: int | None = None  # … of the first other script with a src
        self.sources: list[str] = []  # other scripts and modulepreload links: the bundle's files
        self._scripts = 0
        self.in_head = False
        self.first_head_script: tuple[int, int] | None = None
        self.head_end: tuple[int, int] | None = None
        self.first_script: tuple[int, int] | None = None
        self.body_start: tuple[int, int] | None = None

    @property
    def loads_config_first(self) -> bool:
        """It loads ``config.js``, before any other script with a ``src``."""
        return self.config_at is not None and (self.bundle_at is None or self.config_at < self.bundle_at)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "head":
            self.in_head = True
        elif tag == "body" and self.body_start is None:
            self.body_start = self.getpos()
        elif tag == "script":
            src = values.get("src", "").strip()
            if src and loads_config(src):
                if self.config_at is None:
                    self.config_at = self._scripts
            elif src:
                self.sources.append(src)
                if self.bundle_at is None:
                    self.bundle_at = self._scripts
            self._scripts += 1
            if self.first_script is None:
                self.first_script = self.getpos()
            if self.in_head and self.first_head_script is None:
                self.first_head_script = self.getpos()
        elif (tag == "link" and "modulepreload" in values.get("rel", "").lower().split()
              and values.get("href", "").strip()):
            self.sources.append(values["href"].strip())

    def handle_endtag(self, tag: str) -> None:
        if tag == "head" and self.in_head:
            self.in_head = False
            if self.head_end is None:
                self.head_end = self.getpos()


def scan_index(html: str) -> IndexScripts:
    scanner = IndexScripts()
    scanner.feed(html)
    scanner.close()
    return scanner


def _offset(text: str, pos: tuple[int, int]) -> int:
    line, col = pos
    offset = 0
    for _ in range(line - 1):
        offset = text.index("\n", offset) + 1
    return offset + col


def inject_config_script(html: str) -> str | None:
    """``html`` with the ``config.js`` tag inserted, or ``None`` if it already loads it before the bundle.

    Placement: before the first ``<script`` in ``<head>`` so the config exists
    before the app's own code runs; else before ``</head>``; else (no head
    element written out) before the first script, the ``<body>``, or at the end.
    """
    scanner = scan_index(html)
    if scanner.loads_config_first:
        return None
    where = scanner.first_head_script or scanner.head_end or scanner.first_script or scanner.body_start
    at = _offset(html, where) if where else len(html)
    return html[:at] + SCRIPT_TAG + html[at:]


def ensure_index_loads_config(web_root: Path) -> bool:
    """Make ``web_root/index.html`` load ``/config.js``; idempotent and atomic.

    Returns ``True`` when ``index.html`` now loads ``/config.js`` (patched now
    or already), ``False`` when there is nothing to patch (no ``index.html``)
    or it could not be written (e.g. a read-only web root): the overlay still
    serves, only the runtime config is not used, so the caller logs rather than
    exits.  The untouched original is kept once as ``index.html.orig`` (never
    overwritten, so it stays the upstream file across restarts).  Events:
    ``webconfig.index_patched``, ``webconfig.index_missing``,
    ``webconfig.index_unwritable``.
    """
    index = web_root / "index.html"
    try:
        raw = index.read_bytes()
    except FileNotFoundError:
        log.warning("webconfig.index_missing", path=str(index))
        return False
    # surrogateescape keeps any non-UTF-8 bytes exactly as they were.
    html = raw.decode("utf-8", errors="surrogateescape")
    patched = inject_config_script(html)
    if patched is None:
        return True
    try:
        mode = os.stat(index).st_mode & 0o777
        original = web_root / "index.html.orig"
        if not original.exists():
            atomic_write(original, raw, mode=mode)
        atomic_write(index, patched.encode("utf-8", errors="surrogateescape"), mode=mode)
    except OSError as exc:
        log.warning("webconfig.index_unwritable", path=str(index), error=str(exc))
        return False
    log.info("webconfig.index_patched", path=str(index))
    return True
