"""Which web build do we serve?  Told once at start from the files in ``POGLY_WEB_ROOT``.

Why it matters: only a Pogly web build that reads ``window.POGLY_RUNTIME_CONFIG``
(upstream after the self-host-rework merge, PR #92, 2026-05-11) signs people in
at ``OIDC_ISSUER``.  Older builds hard-code SpacetimeAuth (authority
``https://auth.spacetimedb.com/oidc``, a ``client_031…`` client id) and ignore
any runtime config: every sign-in goes there, the first-user claim can never
match the issuer, and nothing else would tell the operator why.

How: property names and URL strings survive minification, so a byte scan of the
built JavaScript tells the builds apart without running anything
(``reference/webapp-contract.md``, "How to tell which build an image carries"):

* ``runtime-config``: an asset carries ``POGLY_RUNTIME_CONFIG`` (whatever else
  it carries: a fallback default may still name SpacetimeAuth);
* ``hard-coded-spacetimeauth``: an asset carries the SpacetimeAuth authority or
  client id, none carries ``POGLY_RUNTIME_CONFIG``, and every asset was read;
* ``unknown``: anything else, with the reason; never a guess.

Whether ``index.html`` loads ``config.js`` is reported from the build's *own*
``index.html``: when ours is a patched copy (``webconfig`` keeps the original
as ``index.html.orig``), the original is what the build did.

Bounded, since this runs in PID 1 at every start: at most ``MAX_FILE_BYTES``
per file and ``MAX_TOTAL_BYTES`` in all, read in chunks (markers are found
across chunk boundaries), at most ``MAX_FILES`` candidate files from a walk of
at most ``MAX_WALK_ENTRIES`` entries; no process is spawned; a symlink is only
read when it resolves inside the web root; FIFOs and devices are never opened
for reading.  An incomplete scan never yields ``hard-coded-spacetimeauth``,
the one verdict that can stop the container.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from entrypoint import logs
from entrypoint.errors import EXIT_CONFIG, Fatal
from entrypoint.web.config_js import GLOBAL_NAME, SCRIPT_TAG, scan_index

log = logs.get("webapp")

RUNTIME_CONFIG = "runtime-config"
HARD_CODED = "hard-coded-spacetimeauth"
UNKNOWN = "unknown"

MARKER_RUNTIME_CONFIG = GLOBAL_NAME.encode()
# The authority as a JS string literal, also with the slash JSON-escaped, and the client id's prefix.
MARKERS_SPACETIMEAUTH = (b"auth.spacetimedb.com/oidc", b"auth.spacetimedb.com\\/oidc", b"client_031")
_MARKERS = (MARKER_RUNTIME_CONFIG, *MARKERS_SPACETIMEAUTH)

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOTAL_BYTES = 8 * 1024 * 1024
MAX_INDEX_BYTES = 1024 * 1024
MAX_FILES = 500
MAX_WALK_ENTRIES = 10_000
CHUNK_BYTES = 64 * 1024
MAX_LISTED = 20  # file names per list in the event, so one line stays readable
ASSET_SUFFIXES = (".js", ".mjs", ".cjs")

FIX = ("use a Pogly web build from upstream after the self-host-rework merge (PR #92, 2026-05-11), "
       "or point POGLY_IMAGE at one")


class _Skip(Exception):
    """A file that is not read, and why (reported, never fatal)."""


@dataclass(frozen=True)
class WebBuild:
    """What the files in the web root say about the build (see the module docstring)."""

    verdict: str
    reason: str
    web_root: str
    index_found: bool = False
    index_loads_config: bool | None = None  # the build's own index.html; None without one
    config_after_bundle: bool = False  # it loads config.js, but only after the bundle's script
    index_patched: bool = False  # the served index.html is our patched copy of the build's own
    served_index_loads_config: bool = False
    runtime_config_in: tuple[str, ...] = ()
    spacetimeauth_in: tuple[str, ...] = ()
    files_scanned: int = 0
    bytes_scanned: int = 0
    complete: bool = True
    not_read: tuple[str, ...] = ()  # "path: why", for files skipped or cut at a cap
    notes: tuple[str, ...] = field(default_factory=tuple)

    def fields(self) -> dict[str, Any]:
        """The ``webapp.detected`` event's fields (lists capped at ``MAX_LISTED``)."""
        def capped(items: tuple[str, ...]) -> list[str]:
            extra = len(items) - MAX_LISTED
            return list(items[:MAX_LISTED]) + ([f"… and {extra} more"] if extra > 0 else [])

        return {
            "verdict": self.verdict, "reason": self.reason, "web_root": self.web_root,
            "index_found": self.index_found, "index_loads_config": self.index_loads_config,
            "config_after_bundle": self.config_after_bundle, "index_patched": self.index_patched,
            "runtime_config_in": capped(self.runtime_config_in), "spacetimeauth_in": capped(self.spacetimeauth_in),
            "files_scanned": self.files_scanned, "bytes_scanned": self.bytes_scanned,
            "complete": self.complete, "not_read": capped(self.not_read), "notes": list(self.notes),
        }

    def summary(self) -> dict[str, Any]:
        """The short form ``/status`` and ``status`` show."""
        return {"verdict": self.verdict, "reason": self.reason, "index_loads_config": self.index_loads_config,
                "index_patched": self.index_patched}


# --------------------------------------------------------------------------- reading, bounded


def _open_inside(root: Path, path: Path) -> tuple[int, int]:
    """Open ``path`` for reading if it resolves inside ``root`` and is a regular file: ``(fd, size)``."""
    real = os.path.realpath(path)
    if real != str(root) and not real.startswith(str(root).rstrip("/") + "/"):
        raise _Skip("outside the web root (a symlink or path not followed)")
    try:
        # O_NOFOLLOW: the resolved path must not have become a symlink since; O_NONBLOCK: opening a
        # FIFO does not block (and it is refused just below).
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise _Skip("missing") from exc
    except OSError as exc:
        raise _Skip(f"unreadable ({exc.strerror or exc})") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _Skip("not a regular file")
    return fd, info.st_size


def _scan(fd: int, size: int, limit: int, chunk: int) -> tuple[set[bytes], int, bool]:
    """Markers found in the first ``limit`` bytes of ``fd``: ``(found, bytes read, read to the end)``.

    The last ``len(longest marker) - 1`` bytes of each chunk are kept and
    searched again with the next one, so a marker split across two reads is found.
    """
    keep = max(len(m) for m in _MARKERS) - 1
    found: set[bytes] = set()
    tail = b""
    read = 0
    while read < limit:
        data = os.read(fd, min(chunk, limit - read))
        if not data:
            return found, read, True
        read += len(data)
        window = tail + data
        found.update(m for m in _MARKERS if m in window)
        tail = window[-keep:]
    return found, read, read >= size and not os.read(fd, 1)


def _read_prefix(root: Path, path: Path, limit: int) -> bytes:
    """At most the first ``limit`` bytes of a file inside ``root`` (raises ``_Skip``)."""
    fd, _ = _open_inside(root, path)
    parts: list[bytes] = []
    got = 0
    try:
        while got < limit:
            data = os.read(fd, min(CHUNK_BYTES, limit - got))
            if not data:
                break
            parts.append(data)
            got += len(data)
    finally:
        os.close(fd)
    return b"".join(parts)


# --------------------------------------------------------------------------- index.html


def _local_asset(root: Path, src: str) -> Path | None:
    """``src`` from index.html as a path under ``root``, or None for another origin or a data: URL."""
    parts = urlsplit(src)
    if parts.scheme or parts.netloc or not parts.path:
        return None
    relative = parts.path.lstrip("/")
    while relative.startswith("./"):
        relative = relative[2:]
    return root / relative if relative else None


# --------------------------------------------------------------------------- the walk


def _candidates(root: Path, first: list[Path], max_files: int) -> tuple[list[Path], list[str]]:
    """JS files to scan: those index.html names first (the bundle), then the rest of the tree, sorted.

    The top-level ``config.js`` is not a bundle (upstream ships a placeholder
    there, and ours replaces it when served), so it is never evidence.
    """
    notes: list[str] = []
    seen: set[Path] = set()
    ordered: list[Path] = []

    def add(path: Path) -> None:
        if path not in seen and path != root / "config.js":
            seen.add(path)
            ordered.append(path)

    for path in first:
        add(path)
    entries = 0
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            entries += 1
            if name.endswith(ASSET_SUFFIXES):
                add(Path(directory) / name)
        entries += len(dirnames)
        if entries >= MAX_WALK_ENTRIES:
            notes.append(f"stopped listing files after {MAX_WALK_ENTRIES} entries")
            dirnames[:] = []
            break
    if len(ordered) > max_files:
        notes.append(f"{len(ordered) - max_files} JavaScript file(s) beyond the first {max_files} not read")
    return ordered, notes


# --------------------------------------------------------------------------- detection


def detect(web_root: Path, *, max_file_bytes: int = MAX_FILE_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES,
           max_files: int = MAX_FILES, chunk_bytes: int = CHUNK_BYTES) -> WebBuild:
    """Inspect ``web_root`` and return the verdict with what was found. Never raises for file problems."""
    shown = str(web_root)
    try:
        root = web_root.resolve(strict=True)
    except (OSError, RuntimeError):
        return WebBuild(UNKNOWN, f"POGLY_WEB_ROOT={shown} does not exist", shown)
    if not root.is_dir():
        return WebBuild(UNKNOWN, f"POGLY_WEB_ROOT={shown} is not a directory", shown)

    # index.html: the served one, and the build's own (the original we kept when we patched it).
    index_found = False
    own_loads: bool | None = None
    after_bundle = False
    served_loads = False
    patched = False
    index_reason = ""
    first: list[Path] = []
    try:
        served = _read_prefix(root, root / "index.html", MAX_INDEX_BYTES)
        index_found = True
    except _Skip as why:
        served = b""
        index_reason = f"index.html in POGLY_WEB_ROOT={shown} is {why}"
    if index_found:
        own = served
        try:
            original: bytes | None = _read_prefix(root, root / "index.html.orig", MAX_INDEX_BYTES)
        except _Skip:
            original = None
        if original is not None and served.replace(SCRIPT_TAG.encode(), b"", 1) == original:
            own, patched = original, True
        scripts = scan_index(own.decode("utf-8", "replace"))
        own_loads = scripts.loads_config_first
        after_bundle = scripts.config_at is not None and not own_loads
        served_loads = scan_index(served.decode("utf-8", "replace")).config_at is not None
        first = [p for p in (_local_asset(root, s) for s in scripts.sources) if p is not None]

    files, notes = _candidates(root, first, max_files)
    runtime_in: list[str] = []
    spacetimeauth_in: list[str] = []
    not_read: list[str] = []
    scanned = 0
    total = 0
    complete = len(files) <= max_files and not notes
    for path in files[:max_files]:
        name = os.path.relpath(path, root)
        budget = min(max_file_bytes, max_total_bytes - total)
        if budget <= 0:
            not_read.append(f"{name}: not read (total cap of {max_total_bytes} bytes reached)")
            complete = False
            continue
        try:
            fd, size = _open_inside(root, path)
        except _Skip as why:
            if str(why) != "missing":  # a script index.html names but the build lacks is no evidence
                not_read.append(f"{name}: {why}")
                complete = False
            continue
        try:
            found, read, whole = _scan(fd, size, budget, chunk_bytes)
        except OSError as exc:
            not_read.append(f"{name}: unreadable ({exc.strerror or exc})")
            complete = False
            continue
        finally:
            os.close(fd)
        scanned += 1
        total += read
        if not whole:
            not_read.append(f"{name}: only the first {read} of {size} bytes read (cap)")
            complete = False
        if MARKER_RUNTIME_CONFIG in found:
            runtime_in.append(name)
        if found & set(MARKERS_SPACETIMEAUTH):
            spacetimeauth_in.append(name)

    verdict, reason = _verdict(index_found, index_reason, own_loads, runtime_in, spacetimeauth_in, scanned,
                               complete)
    return WebBuild(
        verdict, reason, shown, index_found=index_found, index_loads_config=own_loads,
        config_after_bundle=after_bundle, index_patched=patched, served_index_loads_config=served_loads,
        runtime_config_in=tuple(runtime_in), spacetimeauth_in=tuple(spacetimeauth_in), files_scanned=scanned,
        bytes_scanned=total, complete=complete, not_read=tuple(not_read), notes=tuple(notes),
    )


def _verdict(index_found: bool, index_reason: str, own_loads: bool | None, runtime_in: list[str],
             spacetimeauth_in: list[str], scanned: int, complete: bool) -> tuple[str, str]:
    if not index_found:
        return UNKNOWN, f"{index_reason}: no web app a browser could load"
    if runtime_in:
        return RUNTIME_CONFIG, (f"{runtime_in[0]} reads window.{GLOBAL_NAME}; index.html "
                                + ("loads config.js" if own_loads else "is made to load /config.js"))
    if spacetimeauth_in and complete:
        return HARD_CODED, (f"{spacetimeauth_in[0]} hard-codes the SpacetimeAuth authority "
                            f"(auth.spacetimedb.com/oidc) and no asset reads window.{GLOBAL_NAME}: "
                            "this build ignores /config.js")
    if spacetimeauth_in:
        return UNKNOWN, (f"{spacetimeauth_in[0]} names the SpacetimeAuth authority, but not every asset could "
                         f"be read (see not_read), so a runtime config cannot be ruled out")
    if scanned == 0:
        return UNKNOWN, "no JavaScript asset found in the web root"
    return UNKNOWN, (f"none of {scanned} JavaScript file(s) names window.{GLOBAL_NAME} or the SpacetimeAuth "
                     "authority" + ("; index.html loads config.js" if own_loads else ""))


# --------------------------------------------------------------------------- what the program does with it


def problem(settings: Any, build: WebBuild) -> str | None:
    """The message when the build cannot sign anyone in at ``OIDC_ISSUER``, else None.

    Only with OIDC on: with OIDC off nobody is meant to sign in at our
    provider, so an old build is no worse than any other.
    """
    if build.verdict != HARD_CODED or not settings.oidc_enabled:
        return None
    return (f"the web build in POGLY_WEB_ROOT={build.web_root} hard-codes SpacetimeAuth "
            f"(auth.spacetimedb.com/oidc, found in {build.spacetimeauth_in[0]}) and ignores /config.js: browsers "
            f"will sign in there, never at OIDC_ISSUER={settings.oidc_issuer}, and nobody can claim ownership. "
            f"Fix: {FIX}")


def report(settings: Any, build: WebBuild, *, served_loads_config: bool | None = None) -> dict[str, Any]:
    """Log ``webapp.detected`` (and the hard-coded problem); raise ``Fatal`` 78 for it under STRICT_MODE.

    ``served_loads_config``: whether the served ``index.html`` loads
    ``/config.js`` after ``webconfig.ensure_index_loads_config`` ran, so the
    event says whether we patched it now.  Returns the status summary.
    """
    fields = build.fields()
    if served_loads_config is not None:
        patched_now = served_loads_config and not build.served_index_loads_config
        fields["index_patched"] = build.index_patched or patched_now
        fields["served_index_loads_config"] = served_loads_config
    summary = {**build.summary(), "index_patched": fields["index_patched"]}
    level = log.info if build.verdict == RUNTIME_CONFIG else log.warning
    level("webapp.detected", **fields)
    message = problem(settings, build)
    if message is not None:
        if settings.strict_mode:
            raise Fatal(EXIT_CONFIG, f"{message} (STRICT_MODE=true: refusing to serve it)",
                        event="webapp.hard_coded_auth", verdict=build.verdict)
        log.warning("webapp.hard_coded_auth", verdict=build.verdict, message=message,
                    action="serving anyway (overlays work; sign-in does not reach OIDC_ISSUER)")
    return summary
