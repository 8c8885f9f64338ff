"""``pogly-entrypoint backup`` and ``restore``: both volumes in one verifiable archive, taken consistently.

Why a pause and not a copy of a running server: SpacetimeDB appends to its
commit log and syncs it every 500 ms; a copy taken meanwhile can hold half a
transaction, or files from two different moments.  So ``backup`` asks the
running supervisor, over its control socket (``entrypoint/control.py``), to
stop SpacetimeDB the way a shutdown does (SIGINT: it flushes and exits), copies
``POGLY_DATA_DIR`` and ``POGLY_CONFIG_DIR`` while nothing writes them, and lets
it start again: overlays blank for about a second, Caddy keeps serving the web
app, ``/readyz`` says ``spacetimedb: paused for backup`` meanwhile.  The pause
is a lease on the connection: a backup that dies cannot leave the database
stopped.

The archive (one ``.tar.gz``, mode 0600: it holds the signing keys and the
publisher token)::

    manifest.json        first member: format, versions, modules and their wasm hashes,
                         identities, time, and every file with its size and sha256
    data/…               POGLY_DATA_DIR
    config/…             POGLY_CONFIG_DIR

Every file is read twice while the server is stopped (hashed for the
manifest, then archived and hashed again); a difference means something
still writes the directory and the backup fails instead of keeping a torn
copy.  A file is written to ``PATH.partial``, fsynced and renamed: an existing
``PATH`` is replaced only by a complete archive.

``restore`` (the container not serving) checks the manifest and every file's
sha256 before it touches anything, refuses another major version, extracts
into a staging directory inside each target, then swaps: the previous
contents move to ``<dir>/.pogly-pre-restore-<UTC time>/`` (kept unless
``--discard-old``; a later backup leaves them out).  Inside, not beside: the
targets are usually volume mount points, which cannot be renamed, and a
rename across volumes is a copy.

Exit codes (docs/operations.md): 0 done; 65 the archive is not valid (not
ours, tampered, unsafe member, another major version); 66 the archive cannot
be read; 69 no supervisor to pause SpacetimeDB (``backup`` without
``--offline``), or it cannot pause now; 73 the output cannot be created; 74
an I/O error while copying; 75 try again: another pause holds SpacetimeDB, the
pause expired before the copy was done, or (``restore``) the container is
still serving; 78 a bad variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, TextIO

from entrypoint import logs
from entrypoint.version import __version__

log = logs.get("backup")

FORMAT = "pogly-backup"
FORMAT_VERSION = 1  # its major: an archive of another format version is refused
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 64 * 1024 * 1024
ROOTS = (("data", "POGLY_DATA_DIR"), ("config", "POGLY_CONFIG_DIR"))
PRE_RESTORE = ".pogly-pre-restore-"
STAGING = ".pogly-restore-"
LOST_FOUND = "lost+found"  # an ext4 volume's own directory: neither archived nor moved aside
CHUNK = 1024 * 1024
GZIP_LEVEL = 1  # everything is read while SpacetimeDB is paused: speed over size (level 6: ~4x slower)

EXIT_DATAERR = 65
EXIT_NOINPUT = 66
EXIT_UNAVAILABLE = 69
EXIT_CANTCREAT = 73
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75


class BackupError(Exception):
    """The command stops: ``message`` says why and what to do, ``exit_code`` how it ends."""

    def __init__(self, exit_code: int, message: str, event: str = "backup.failed") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.event = event


@dataclasses.dataclass(frozen=True)
class Places:
    """The few variables these commands need, each read through its own row of the configuration table.

    Not the whole ``Settings``: a restore pod or a ``kubectl exec`` shell
    need not carry the OIDC settings to move files.
    """

    data_dir: Path
    config_dir: Path
    run_dir: Path
    module_dir: Path
    modules: tuple[str, ...]
    health_addr: Any
    spacetime_addr: Any
    spacetime_bin: str
    stop_timeout: float
    start_timeout: float
    log_format: str

    @classmethod
    def from_env(cls) -> Places:
        from entrypoint import config

        def get(name: str) -> Any:
            return config.read(name)

        return cls(get("POGLY_DATA_DIR"), get("POGLY_CONFIG_DIR"), get("POGLY_RUN_DIR"), get("POGLY_MODULE_DIR"),
                   tuple(get("MODULES")), get("POGLY_HEALTH_ADDR"), get("POGLY_SPACETIME_ADDR"),
                   str(get("SPACETIME_BIN")), float(get("POGLY_STOP_TIMEOUT")), float(get("POGLY_START_TIMEOUT")),
                   str(get("LOG_FORMAT")))

    def roots(self) -> dict[str, Path]:
        return {"data": self.data_dir, "config": self.config_dir}

    def module_wasm(self, module: str) -> Path:
        own = self.module_dir / f"{module}.wasm"
        return own if own.exists() else self.module_dir / "pogly.wasm"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One directory or regular file of a volume, as archived."""

    arcname: str  # "data/replicas/…"
    path: Path
    is_dir: bool
    mode: int
    mtime: float
    size: int = 0
    sha256: str = ""


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# ---------------------------------------------------------------------------
# backup
# ---------------------------------------------------------------------------


def _unreadable(exc: OSError) -> None:
    """``os.walk`` would skip a directory it cannot list, silently: a backup must not."""
    raise BackupError(EXIT_IOERR, f"cannot read {exc.filename}: {exc.strerror or exc}; nothing was kept")


def _left_out(name: str) -> bool:
    """Top-level entries of a volume that are not its contents: a restore's leftovers, ext4's lost+found."""
    return name == LOST_FOUND or name.startswith((PRE_RESTORE, STAGING))


def scan(roots: dict[str, Path]) -> tuple[list[Entry], list[str]]:
    """Every directory and regular file under each root, hashed; and what was left out, and why."""
    entries: list[Entry] = []
    skipped: list[str] = []
    for name, root in roots.items():
        if not root.is_dir():
            raise BackupError(EXIT_IOERR, f"{root} is not a directory: nothing to back up there")
        for current, dirs, files in os.walk(root, onerror=_unreadable):
            here = Path(current)
            if here == root:
                left_out = sorted(d for d in dirs if _left_out(d))
                skipped.extend(f"{name}/{d} (not part of the volume's contents)" for d in left_out)
                dirs[:] = [d for d in dirs if d not in left_out]
            dirs.sort()
            for child in [*dirs, *sorted(files)]:
                path = here / child
                arc = f"{name}/{path.relative_to(root).as_posix()}"
                info = path.lstat()
                if stat.S_ISDIR(info.st_mode):
                    entries.append(Entry(arc, path, True, stat.S_IMODE(info.st_mode), info.st_mtime))
                elif stat.S_ISREG(info.st_mode):
                    digest, size = _sha256_file(path)
                    entries.append(Entry(arc, path, False, stat.S_IMODE(info.st_mode), info.st_mtime, size, digest))
                else:
                    kind = "symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                    skipped.append(f"{arc} ({kind})")
            dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
    return entries, skipped


def manifest(places: Places, entries: list[Entry], skipped: list[str], *, mode: str,
             status: dict[str, Any] | None, spacetimedb_version: str | None) -> dict[str, Any]:
    """What the archive holds, written first so a restore checks it before anything else."""
    from entrypoint.spacetimedb.statefile import load_state

    state = load_state(places.config_dir).get("modules", {})
    modules: dict[str, Any] = {}
    for module in places.modules:
        wasm = places.module_wasm(module)
        try:
            wasm_sha, wasm_size = _sha256_file(wasm)
        except OSError:
            wasm_sha, wasm_size = None, None
        live = (status or {}).get("modules", {}).get(module, {})
        recorded = state.get(module, {}) if isinstance(state.get(module), dict) else {}
        modules[module] = {
            "wasm": wasm.name, "wasm_sha256": wasm_sha, "wasm_size": wasm_size,
            "database_identity": live.get("database_identity") or recorded.get("database_identity"),
            "published_hash": live.get("published_hash") or recorded.get("hash"),
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pogly_entrypoint_version": __version__,
        "spacetimedb_version": spacetimedb_version,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "publisher_identity": (status or {}).get("publisher_identity") or _publisher_identity(places.config_dir),
        "modules": modules,
        "roots": {name: {"variable": var, "path": str(places.roots()[name])} for name, var in ROOTS},
        "dirs": [e.arcname for e in entries if e.is_dir],
        "files": [{"path": e.arcname, "size": e.size, "sha256": e.sha256} for e in entries if not e.is_dir],
        "skipped": skipped,
    }


def _publisher_identity(config_dir: Path) -> str | None:
    """From cli.toml's token, without the token (never logged, never in the manifest)."""
    import tomllib

    from entrypoint.spacetimedb.credentials import token_identity

    try:
        token = tomllib.loads((config_dir / "cli.toml").read_text(encoding="utf-8")).get("spacetimedb_token")
        return token_identity(token) if isinstance(token, str) else None
    except (OSError, ValueError):
        return None


class _Tee(io.RawIOBase):
    """The archive's bytes on their way out: counted and hashed (the sha256 printed at the end)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self.out.write(view)
        self.size += len(view)
        self.digest.update(view)
        return len(view)


class _Verifying:
    """A file's bytes into the archive, hashed again: proof nothing wrote it since the manifest's hash."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def write_archive(out: BinaryIO, document: dict[str, Any], entries: list[Entry]) -> _Tee:
    """manifest.json, then every directory and file; raises ``BackupError`` when a file changed meanwhile."""
    tee = _Tee(out)
    with gzip.GzipFile(fileobj=tee, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        data = json.dumps(document, indent=2, sort_keys=True).encode()
        info = _tarinfo(MANIFEST, 0o600, time.time())
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for entry in entries:
            info = _tarinfo(entry.arcname, entry.mode, entry.mtime)
            if entry.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = entry.size
            try:
                with open(entry.path, "rb") as handle:
                    reader = _Verifying(handle)
                    tar.addfile(info, reader)  # type: ignore[arg-type]
                    grew = handle.read(1)
            except FileNotFoundError:
                raise _changed(entry, "it disappeared") from None
            except OSError as exc:
                if "unexpected end of data" in str(exc):
                    raise _changed(entry, "it shrank") from None
                raise
            if grew or reader.digest.hexdigest() != entry.sha256:
                raise _changed(entry, "its content changed")
    return tee


def _changed(entry: Entry, how: str) -> BackupError:
    return BackupError(EXIT_IOERR, f"{entry.path} changed while it was archived ({how}): something still writes "
                                   "the volume, so this copy would not be consistent; nothing was kept. Is "
                                   "SpacetimeDB really stopped (with --offline: is the container stopped)?")


def _tarinfo(name: str, mode: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode & 0o7777
    info.mtime = int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class Output:
    """Where the archive goes: ``PATH.partial`` (0600) renamed to ``PATH`` when complete, or stdout."""

    def __init__(self, to: str) -> None:
        self.to = to
        self.path = None if to == "-" else Path(to)
        self.partial = None if self.path is None else self.path.with_name(self.path.name + ".partial")
        self.handle: BinaryIO | None = None

    def open(self) -> BinaryIO:
        if self.path is None:
            if sys.stdout.isatty():
                raise BackupError(EXIT_CANTCREAT, "refusing to write a binary archive to a terminal: redirect "
                                                  "stdout (`… backup --to - > pogly.tar.gz`) or give --to PATH")
            sys.stdout.flush()
            self.handle = sys.stdout.buffer
            return self.handle
        assert self.partial is not None
        if self.path.is_dir():
            raise BackupError(EXIT_CANTCREAT, f"--to {self.path} is a directory; give a file name, e.g. "
                                              f"{self.path / 'pogly-backup.tar.gz'}")
        try:
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # a leftover .partial may have had another mode
        except OSError as exc:
            raise BackupError(EXIT_CANTCREAT, f"cannot create {self.partial}: {exc.strerror or exc}; check that "
                                              f"{self.partial.parent} exists and is writable") from None
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    def commit(self) -> None:
        """Flush, fsync and rename into place (a file), or flush (stdout)."""
        assert self.handle is not None
        self.handle.flush()
        if self.path is None:
            return
        assert self.partial is not None
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        if self.path is None or self.partial is None:
            return
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        with contextlib.suppress(OSError):
            self.partial.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def spacetimedb_version(places: Places) -> str | None:
    """What the running server reports (``/v1/health``), else ``spacetime --version``; None if neither says."""
    import asyncio

    from entrypoint.localhttp import AsyncClient, HTTPError

    async def health() -> object:
        async with AsyncClient(base_url=places.spacetime_addr.url, timeout=2.0) as client:
            return (await client.get("/v1/health")).json()

    with contextlib.suppress(HTTPError, ValueError):
        answer = asyncio.run(health())  # a CLI command: no event loop is running here
        if isinstance(answer, dict) and isinstance(answer.get("version"), str):
            return answer["version"]
    program = shutil.which(places.spacetime_bin) or places.spacetime_bin
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
        found = re.search(r"\b(\d+\.\d+\.\d+[\w.+-]*)", proc.stdout + proc.stderr)
        if found:
            return found.group(1)
    return None


def lock_holder(data_dir: Path) -> str | None:
    """Whether a live SpacetimeDB holds ``spacetime.pid`` (an flock), and who; the file is never changed."""
    pidfile = data_dir / "spacetime.pid"
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        content = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return f"pid {content}" if content.isdigit() else "a live process"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def backup(places: Places, to: str, *, offline: bool, max_pause: float, err: TextIO) -> int:
    """The ``backup`` command; the exit code (see the module docstring)."""
    from entrypoint.containerlog import EventSink, is_entrypoint
    from entrypoint.control import ControlClient, ControlError

    client: ControlClient | None = None
    try:
        client = ControlClient.connect(places.run_dir)
        hello = client.request("hello")
    except ControlError as exc:
        if client is not None:
            client.close()
            client = None
        if not offline:
            print(f"pogly-entrypoint backup: {exc.message}. A consistent backup needs the running supervisor, "
                  "which pauses SpacetimeDB for it: run this inside the running container (`kubectl exec "
                  "deploy/pogly -- pogly-entrypoint backup --to - > pogly.tar.gz`, `docker exec`). With the "
                  "container stopped, `--offline` copies the volumes as they are.", file=err)
            return EXIT_UNAVAILABLE
        hello = None
    pid = hello.get("pid") if hello else None
    sink = EventSink.open(pid if isinstance(pid, int) and is_entrypoint(pid) else None, err,
                          "no supervisor (offline backup)" if hello is None else "")
    logs.configure(places.log_format, stream=sink)
    output = Output(to)
    started = time.monotonic()
    try:
        if client is not None and offline:
            print("pogly-entrypoint backup: a supervisor is running: pausing SpacetimeDB through it rather "
                  "than copying offline", file=err)
        if client is None:
            holder = lock_holder(places.data_dir)
            if holder is not None:
                raise BackupError(EXIT_TEMPFAIL, f"--offline, but SpacetimeDB runs: {holder} holds "
                                                 f"{places.data_dir / 'spacetime.pid'}. Stop the container first, "
                                                 "or run the backup inside it without --offline")
            print("pogly-entrypoint backup: --offline: copying the volumes as they are; SpacetimeDB must not be "
                  "running on them (nothing pauses it)", file=err)
        result = _backup(places, output, client, max_pause)
    except BackupError as exc:
        output.discard()
        log.error(exc.event, message=exc.message, exit_code=exc.exit_code, to=to)
        print(f"pogly-entrypoint backup: {exc.message}", file=err)
        return exc.exit_code
    except OSError as exc:
        output.discard()
        message = f"I/O error: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        log.error("backup.failed", message=message, exit_code=EXIT_IOERR, to=to)
        print(f"pogly-entrypoint backup: {message}; nothing was kept", file=err)
        return EXIT_IOERR
    except KeyboardInterrupt:
        output.discard()
        log.error("backup.failed", message="interrupted", exit_code=130, to=to)
        raise
    finally:
        if client is not None:
            client.close()  # ends the lease whatever happened: SpacetimeDB is never left paused
        sink.close()
    result["total_ms"] = round((time.monotonic() - started) * 1000, 1)
    summary = (f"backup written to {to if to != '-' else 'stdout'}: {result['bytes']} bytes, "
               f"{result['files']} files, sha256 {result['sha256']}; SpacetimeDB paused {result['paused_ms']} ms")
    print(summary, file=err if to == "-" else sys.stdout)
    return 0


def _backup(places: Places, output: Output, client: Any, max_pause: float) -> dict[str, Any]:
    from entrypoint.control import ControlError

    status = None
    if client is not None:
        status = client.request("status")["status"]
    version = spacetimedb_version(places)
    log.info("backup.started", to=output.to, mode="online" if client else "offline",
             data_dir=str(places.data_dir), config_dir=str(places.config_dir))
    handle = output.open()  # before the pause: a bad --to never stops the database
    paused_at = time.monotonic()
    resumed: dict[str, Any] = {}
    if client is not None:
        try:
            client.request("pause", timeout=places.stop_timeout + 30, service="spacetimedb", reason="backup",
                           max_s=max_pause)
        except ControlError as exc:
            code = EXIT_TEMPFAIL if exc.reason == "busy" else EXIT_UNAVAILABLE
            raise BackupError(code, f"SpacetimeDB could not be paused: {exc.message}") from None
        paused_at = time.monotonic()
        log.info("backup.paused", child="spacetimedb")
    try:
        entries, skipped = scan(places.roots())
        document = manifest(places, entries, skipped, mode="online" if client else "offline", status=status,
                            spacetimedb_version=version)
        try:
            tee = write_archive(handle, document, entries)
        except BrokenPipeError:
            raise BackupError(EXIT_IOERR, "the reader of stdout went away before the archive was complete") from None
    finally:
        if client is not None:
            try:
                resumed = client.request("resume", timeout=places.start_timeout + 30)
            except ControlError as exc:
                resumed = {"ready": False, "expired": exc.reason == "not_paused", "error": exc.message}
    paused_ms = round((time.monotonic() - paused_at) * 1000, 1) if client is not None else 0.0
    if resumed.get("expired"):
        raise BackupError(EXIT_TEMPFAIL, f"the pause expired (--max-pause {max_pause:g} s) before the copy was "
                                         "complete and SpacetimeDB was started again: this copy is not consistent "
                                         "and was not kept; try again with a larger --max-pause")
    output.commit()
    result = {"bytes": tee.size, "sha256": tee.digest.hexdigest(),
              "files": sum(1 for e in entries if not e.is_dir), "paused_ms": paused_ms,
              "ready_again": resumed.get("ready") if client is not None else None}
    if skipped:
        log.warning("backup.skipped", skipped=skipped, message="left out of the archive")
    log.info("backup.done", to=output.to, archive_bytes=result["bytes"], archive_sha256=result["sha256"],
             files=result["files"], paused_ms=paused_ms, ready_again=result["ready_again"],
             spacetimedb_version=version)
    return result


# ---------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------


def _major(version: object) -> int | None:
    match = re.match(r"(\d+)\.", str(version))
    return int(match.group(1)) if match else None


def member_target(name: str) -> tuple[str, PurePosixPath]:
    """``(root, relative path)`` of an archive member, or ``BackupError`` when it could land outside."""
    clean = name.rstrip("/")
    path = PurePosixPath(clean)
    parts = path.parts
    if (not clean or path.is_absolute() or "\\" in clean or "\0" in clean or len(parts) < 2
            or any(p in ("", ".", "..") for p in parts) or parts[0] not in dict(ROOTS)):
        raise BackupError(EXIT_DATAERR, f"unsafe or unexpected member {name!r}: every member must be a relative "
                                        "path under data/ or config/ without '..'; nothing was restored",
                          event="restore.refused")
    return parts[0], PurePosixPath(*parts[1:])


def check_manifest(document: object) -> dict[str, Any]:
    """The manifest, or why this archive is not one we restore (not ours, another major version)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BackupError(EXIT_DATAERR, "this is not a pogly-entrypoint backup (manifest.json has no "
                                        f"\"format\": \"{FORMAT}\"); nothing was restored", event="restore.refused")
    fmt = document.get("format_version")
    theirs = document.get("pogly_entrypoint_version")
    if fmt != FORMAT_VERSION or _major(theirs) != _major(__version__):
        raise BackupError(EXIT_DATAERR, f"this archive was made by pogly-entrypoint {theirs} (archive format "
                                        f"{fmt}); this is pogly-entrypoint {__version__} (archive format "
                                        f"{FORMAT_VERSION}): a different major version is not restored. Restore it "
                                        f"with a pogly-entrypoint {_major(theirs)}.x image, then upgrade; nothing "
                                        "was restored", event="restore.version_refused")
    files, dirs = document.get("files"), document.get("dirs")
    if not isinstance(files, list) or not isinstance(dirs, list):
        raise BackupError(EXIT_DATAERR, "manifest.json lists no files/dirs; nothing was restored",
                          event="restore.refused")
    for item in files:
        if (not isinstance(item, dict) or not isinstance(item.get("path"), str) or not isinstance(item.get("size"), int)
                or not re.fullmatch(r"[0-9a-f]{64}", str(item.get("sha256")))):
            raise BackupError(EXIT_DATAERR, f"manifest.json has a malformed file entry {item!r}; nothing was restored",
                              event="restore.refused")
        member_target(item["path"])
    for item in dirs:
        member_target(str(item))
    return document


def _members(archive: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                yield tar, member
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None:
            raise BackupError(EXIT_NOINPUT if isinstance(exc, FileNotFoundError | PermissionError) else EXIT_IOERR,
                              f"cannot read {archive}: {exc.strerror or exc}") from None
        raise BackupError(EXIT_DATAERR, f"{archive} is not a readable .tar.gz ({exc}); nothing was restored",
                          event="restore.refused") from None


def verify(archive: Path) -> dict[str, Any]:
    """Read the whole archive once: manifest first and valid, every member safe, every file's sha256 right."""
    document: dict[str, Any] | None = None
    expected: dict[str, tuple[int, str]] = {}
    dirs: set[str] = set()
    seen: set[str] = set()
    for tar, member in _members(archive):
        if document is None:
            if member.name != MANIFEST or not member.isreg() or member.size > MANIFEST_LIMIT:
                raise BackupError(EXIT_DATAERR, f"{archive}: the first member is {member.name!r}, not {MANIFEST}: "
                                                "not a pogly-entrypoint backup; nothing was restored",
                                  event="restore.refused")
            handle = tar.extractfile(member)
            assert handle is not None
            try:
                document = check_manifest(json.loads(handle.read()))
            except ValueError:
                raise BackupError(EXIT_DATAERR, f"{archive}: {MANIFEST} is not valid JSON; nothing was restored",
                                  event="restore.refused") from None
            expected = {f["path"]: (f["size"], f["sha256"]) for f in document["files"]}
            dirs = {str(d).rstrip("/") for d in document["dirs"]}
            continue
        member_target(member.name)
        name = member.name.rstrip("/")
        if name in seen:
            raise BackupError(EXIT_DATAERR, f"{archive}: member {name!r} appears twice; nothing was restored",
                              event="restore.refused")
        seen.add(name)
        if member.isdir():
            if name not in dirs:
                raise BackupError(EXIT_DATAERR, f"{archive}: directory {name!r} is not in the manifest; nothing "
                                                "was restored", event="restore.tampered")
            continue
        if not member.isreg():
            raise BackupError(EXIT_DATAERR, f"{archive}: member {name!r} is a link or device, which a backup never "
                                            "holds: refused; nothing was restored", event="restore.refused")
        if name not in expected:
            raise BackupError(EXIT_DATAERR, f"{archive}: file {name!r} is not in the manifest; nothing was restored",
                              event="restore.tampered")
        size, sha = expected[name]
        handle = tar.extractfile(member)
        assert handle is not None
        digest = hashlib.sha256()
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
        if member.size != size or digest.hexdigest() != sha:
            raise BackupError(EXIT_DATAERR, f"{archive}: {name} does not match the manifest (sha256 "
                              f"{digest.hexdigest()}, expected {sha}): the archive is damaged or was changed; "
                              "nothing was restored", event="restore.tampered")
    if document is None:
        raise BackupError(EXIT_DATAERR, f"{archive} is empty; nothing was restored", event="restore.refused")
    missing = sorted(set(expected) - seen) + sorted(dirs - seen)
    if missing:
        raise BackupError(EXIT_DATAERR, f"{archive}: the manifest lists {missing[:5]} but the archive does not hold "
                                        "them (truncated?); nothing was restored", event="restore.tampered")
    return document


def refuse_if_serving(places: Places) -> None:
    """A restore under a running supervisor or SpacetimeDB would be overwritten or torn: refuse, say how to stop."""
    from entrypoint.control import answers, socket_path

    how = ("Stop the container first. Kubernetes: `flux suspend kustomization <name>` (if Flux manages it), "
           "`kubectl scale deploy/pogly --replicas=0`, then run the restore in a one-off pod that mounts both "
           "volumes (docs/deployment.md, \"Restore\"). Docker: `docker stop <container>`, then `docker run --rm "
           "-v <data volume>:/stdb -v <config volume>:/root/.spacetime -v $PWD:/backup <image> restore "
           "/backup/<archive>`")
    if answers(socket_path(places.run_dir)):
        raise BackupError(EXIT_TEMPFAIL, f"a pogly-entrypoint supervisor answers on {socket_path(places.run_dir)}: "
                                         f"the container is serving. {how}", event="restore.refused")
    addr = places.health_addr
    with contextlib.suppress(OSError), socket.create_connection((addr.host, addr.port), timeout=1.0):
        raise BackupError(EXIT_TEMPFAIL, f"something answers on POGLY_HEALTH_ADDR={addr} (a running supervisor?). "
                                         f"{how}", event="restore.refused")
    holder = lock_holder(places.data_dir)
    if holder is not None:
        raise BackupError(EXIT_TEMPFAIL, f"SpacetimeDB runs on {places.data_dir}: {holder} holds spacetime.pid. "
                                         f"{how}", event="restore.refused")


def _extract(archive: Path, document: dict[str, Any], staging: dict[str, Path]) -> None:
    """Second read: write every member into its staging directory, checked again as it is written."""
    expected = {f["path"]: f["sha256"] for f in document["files"]}
    for tar, member in _members(archive):
        if member.name == MANIFEST:
            continue
        root, rel = member_target(member.name)
        dest = staging[root].joinpath(*rel.parts)
        if member.isdir():
            dest.mkdir(mode=0o700, parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = 0o600 | (0o100 if member.mode & 0o100 else 0)  # keys and tokens 0600; an executable stays one
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            handle = tar.extractfile(member)
            assert handle is not None
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.utime(dest, (member.mtime, member.mtime))
        if digest.hexdigest() != expected.get(member.name.rstrip("/")):
            raise BackupError(EXIT_DATAERR, f"{archive} changed while it was restored ({member.name}); the targets "
                                            "are untouched", event="restore.tampered")
    for directory in staging.values():
        for current, _dirs, _files in os.walk(directory):
            _fsync_dir(Path(current))


def restore(places: Places, archive: Path, *, discard_old: bool, out: TextIO, err: TextIO) -> int:
    """The ``restore`` command; the exit code (see the module docstring)."""
    logs.configure(places.log_format if places.log_format != "auto" else
                   ("console" if err.isatty() else "json"), stream=err)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    staging: dict[str, Path] = {}
    try:
        refuse_if_serving(places)
        if not archive.is_file():
            raise BackupError(EXIT_NOINPUT, f"{archive} is not a file")
        document = verify(archive)
        log.info("restore.verified", archive=str(archive), created_at=document.get("created_at"),
                 pogly_entrypoint_version=document.get("pogly_entrypoint_version"),
                 publisher_identity=document.get("publisher_identity"), files=len(document["files"]))
        targets = places.roots()
        for name, target in targets.items():
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging[name] = target / f"{STAGING}{stamp}"
            staging[name].mkdir(mode=0o700)
        _extract(archive, document, staging)
        kept = {name: _swap(targets[name], staging[name], stamp) for name in targets}
        staging.clear()
    except BackupError as exc:
        _remove_staging(staging)
        log.error(exc.event, message=exc.message, exit_code=exc.exit_code, archive=str(archive))
        print(f"pogly-entrypoint restore: {exc.message}", file=err)
        return exc.exit_code
    except OSError as exc:
        _remove_staging(staging)
        message = f"I/O error: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        log.error("restore.failed", message=message, exit_code=EXIT_IOERR, archive=str(archive))
        print(f"pogly-entrypoint restore: {message}", file=err)
        return EXIT_IOERR
    lines = [f"restored {archive} (made {document.get('created_at')} by pogly-entrypoint "
             f"{document.get('pogly_entrypoint_version')}, SpacetimeDB {document.get('spacetimedb_version') or '?'})",
             f"publisher identity: {document.get('publisher_identity') or '-'}"]
    for module, info in sorted(document.get("modules", {}).items()):
        lines.append(f"module {module}: database {info.get('database_identity') or '-'}")
    for name, old in kept.items():
        if old is None:
            continue
        if discard_old:
            shutil.rmtree(old, ignore_errors=True)
            lines.append(f"previous {name} contents removed (--discard-old)")
        else:
            lines.append(f"previous {name} contents kept in {old} (remove it once the restored copy works: "
                         f"rm -rf '{old}')")
    log.info("restore.done", archive=str(archive), kept={k: str(v) if v and not discard_old else None
                                                         for k, v in kept.items()})
    print("\n".join(lines), file=out)
    return 0


def _swap(target: Path, staged: Path, stamp: str) -> Path | None:
    """Move the target's contents aside into ``.pogly-pre-restore-<stamp>``, the staged ones in; the aside dir."""
    old = target / f"{PRE_RESTORE}{stamp}"
    current = [p for p in target.iterdir() if not _left_out(p.name)]
    if current:
        old.mkdir(mode=0o700)
        for path in current:
            os.rename(path, old / path.name)
    for path in staged.iterdir():
        os.rename(path, target / path.name)
    staged.rmdir()
    _fsync_dir(target)
    return old if current else None


def _remove_staging(staging: dict[str, Path]) -> None:
    for path in staging.values():
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["BackupError", "Places", "backup", "check_manifest", "member_target", "restore", "verify"]
