"""The one place that knows how podman runs on these machines.

Every other file in tests/image writes podman commands exactly as a user types
them (``podman build …``, ``podman run …``); :meth:`Podman.user` adds what this
kind of machine needs (../shared/reference/container-runtime.md):

* ``--storage-driver vfs`` (no overlay), ``--runtime runc`` (crun fails with
  "cgroups in hybrid mode not supported"), ``--cgroup-manager cgroupfs`` (no
  systemd);
* ``--ulimit nofile=1000:1000 --ulimit nproc=1000:1000`` on ``build``, ``run``
  and ``create``, and the same as ``default_ulimits`` in a containers.conf for
  the containers podman makes itself (a pod's infra container): the runtime
  here refuses podman's default RLIMIT_NPROC/NOFILE;
* ``--network host`` for ``build`` (its ``RUN pip install`` reaches PyPI);
* ``--layers=false`` for ``build``: vfs stores every layer as a full copy of
  the file system, so one layer per stage instead of one per instruction keeps
  a build to seconds and a few hundred MB.

Storage (images, containers, volumes) and libpod's state live under
:data:`STATE_DIR`, never in the checkout and never in the machine's own podman
storage; the base image is kept there between runs, keyed by a hash of its
inputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

STATE_DIR = Path(os.environ.get("POGLY_IMAGE_TEST_DIR", "/var/tmp/pogly-image-test"))

GLOBAL_FLAGS = ("--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
ULIMITS = ("--ulimit", "nofile=1000:1000", "--ulimit", "nproc=1000:1000")
SUBCOMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    "build": (*ULIMITS, "--network", "host", "--layers=false"),
    "run": ULIMITS,
    "create": ULIMITS,
}
CONTAINERS_CONF = """\
# Written by tests/image/podman.py: what podman needs on this kind of machine.
[containers]
default_ulimits = ["nofile=1000:1000", "nproc=1000:1000"]
"""
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def missing_prerequisites() -> list[str]:
    """What this machine lacks to build and run the image (``make podman`` installs the packages)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    missing = [f"{tool} (apt-get install {tool})" for tool in ("podman", "runc", "mmdebstrap")
               if shutil.which(tool, path=path) is None]
    if os.geteuid() != 0:
        missing.append("root (rootful podman: vfs storage, netavark port publishing, nsenter)")
    return missing


class Podman:
    """``podman`` with this machine's flags and the test's own storage."""

    def __init__(self, state: Path = STATE_DIR) -> None:
        self.state = state
        self.root = state / "storage"
        self.runroot = state / "runroot"
        self.tmpdir = state / "libpod-tmp"
        self.conf = state / "containers.conf"
        state.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONTAINERS_CONF)
        executable = shutil.which("podman")
        assert executable, "podman is not installed (make podman)"
        self.executable = executable

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        return env

    def engine(self) -> list[str]:
        """``podman`` and the global flags: what goes before the subcommand (e.g. make's CONTAINER_ENGINE)."""
        return [self.executable, "--root", str(self.root), "--runroot", str(self.runroot),
                "--tmpdir", str(self.tmpdir), *GLOBAL_FLAGS]

    def argv(self, command: Sequence[str]) -> list[str]:
        """``["podman", sub, *rest]`` as typed by a user → the argv that works on this machine."""
        assert command[0] == "podman", command
        sub, rest = command[1], list(command[2:])
        return [*self.engine(), sub, *SUBCOMMAND_FLAGS.get(sub, ()), *rest]

    def user(self, *command: str, timeout: float = 120, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a user's ``podman …`` command; ``check`` fails the test with its output."""
        proc = subprocess.run(self.argv(command), env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
        return proc

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """``podman ARGS`` → stdout (stripped)."""
        return self.user("podman", *args, timeout=timeout, check=check).stdout.strip()
