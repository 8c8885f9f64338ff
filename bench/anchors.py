"""The anchors, fetched once into ``bench/.cache`` (ignored by git) with the ordinary clients.

- tini and dumb-init: Debian's packages, ``apt-get download`` + ``dpkg-deb -x`` (nothing installed);
- supervisord: PyPI's ``supervisor``, pinned, in a venv of its own.

Each step has a deadline; a failure names the command and its output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
DEBS = {"tini": "0.19.0-1+b3", "dumb-init": "1.2.5-2"}
SUPERVISOR = "supervisor==4.3.0"
STEP_TIMEOUT = 300


class AnchorError(RuntimeError):
    """An anchor could not be prepared (the harness cannot run it)."""


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AnchorError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise AnchorError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def debian_binaries() -> dict[str, Path]:
    """``{"tini": …/usr/bin/tini, "dumb-init": …}``, downloading and unpacking on first use."""
    root = CACHE / "debroot"
    wanted = {name: root / "usr" / "bin" / name for name in DEBS}
    if all(path.exists() for path in wanted.values()):
        return wanted
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}={version}" for name, version in DEBS.items()]
    try:
        _run(["apt-get", "download", *specs], cwd=debs)
    except AnchorError:
        _run(["apt-get", "update", "-qq"])  # a fresh machine has no package lists yet
        _run(["apt-get", "download", *specs], cwd=debs)
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    missing = [str(p) for p in wanted.values() if not p.exists()]
    if missing:
        raise AnchorError(f"not in the unpacked packages: {missing}")
    return wanted


def supervisord() -> Path:
    """``supervisord`` from a venv of its own (not the project's: its imports must not mix with ours)."""
    venv = CACHE / "supervisor-venv"
    exe = venv / "bin" / "supervisord"
    if exe.exists():
        return exe
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", SUPERVISOR])
    if not exe.exists():
        raise AnchorError(f"{exe} missing after pip install {SUPERVISOR}")
    return exe


def versions(tini: Path, dumb_init: Path, supervisord_exe: Path) -> dict[str, str]:
    """What actually ran, as each reports itself."""
    return {
        "tini": _run([str(tini), "--version"]).strip(),
        "dumb-init": subprocess.run([str(dumb_init), "--version"], capture_output=True, text=True,
                                    timeout=30).stderr.strip() or "dumb-init",
        "supervisord": "supervisord " + _run([str(supervisord_exe), "--version"]).strip(),
    }
