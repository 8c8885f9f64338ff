"""Session fixtures of the image test: podman, the image built by ``make image``, a pod with a provider.

Built once per test session: the base image (kept between sessions, see
artifacts.base_image), the stand-in images and the project image.  A missing
prerequisite (podman, runc, mmdebstrap, nsenter, root, node + oidc-provider)
fails the tests; ``make test`` installs the packages first (``make podman``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.image import artifacts
from tests.image.containers import PREFIX, SESSION, name, remove_leftovers
from tests.image.podman import STATE_DIR, SUBCOMMAND_FLAGS, Podman, missing_prerequisites
from tests.oidc.fixtures import node_available, node_provider

REPO = Path(__file__).resolve().parents[2]
# The label a `make image SOURCE=…` puts on the image (any URL; nothing is fetched from it).
TEST_SOURCE = "https://git.example.invalid/pogly/pogly-entrypoint.git"
TIMINGS: dict[str, float | str] = {}


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    version: str
    revision: str
    source: str


@dataclass(frozen=True)
class Pod:
    """A pod publishing port 80 on 127.0.0.1:``port``, with the OIDC provider on the pod's own loopback."""

    name: str
    port: int
    issuer: str


@pytest.fixture(scope="session")
def podman() -> Podman:
    missing = missing_prerequisites()
    if missing:
        pytest.fail("the image test needs: " + "; ".join(missing) + " (make podman installs the packages)")
    engine = Podman()
    remove_leftovers(engine)
    return engine


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def built_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    """``make image`` with the local base and stand-in images as build arguments, nothing else changed."""
    base = artifacts.base_image(podman)
    TIMINGS["base image (s)"] = round(base.seconds, 1)
    TIMINGS["base image"] = "cached" if base.cached else "built (mmdebstrap + import)"
    t0 = time.monotonic()
    images = {"PYTHON_IMAGE": base.image,
              **artifacts.standin_images(podman, tmp_path_factory.mktemp("standins"), SESSION)}
    TIMINGS["stand-in images (s)"] = round(time.monotonic() - t0, 1)
    tag = f"localhost/{PREFIX}-entrypoint:{SESSION}"
    flags = [*SUBCOMMAND_FLAGS["build"], *(f"--build-arg={k}={v}" for k, v in images.items())]
    t0 = time.monotonic()
    make = shutil.which("make")
    assert make, "make is not installed"
    proc = subprocess.run([make, "--no-print-directory", "-s", "-C", str(REPO), "image",
                           f"CONTAINER_ENGINE={shlex.join(podman.engine())}", f"IMAGE_BUILD_FLAGS={shlex.join(flags)}",
                           f"IMAGE={tag}", f"SOURCE={TEST_SOURCE}"],
                          env=podman.env(), capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"make image failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    TIMINGS["image build, make image (s)"] = round(time.monotonic() - t0, 1)
    version = _pyproject_version()
    try:
        yield BuiltImage(tag=tag, version=version, revision=_git("rev-parse", "HEAD"), source=TEST_SOURCE)
    finally:
        # (podman 4.3 with --layers=false already removed the stand-ins: their stages have no instruction)
        podman("rmi", "--force", "--ignore", tag, *(v for k, v in images.items() if k != "PYTHON_IMAGE"),
               check=False)


def _pyproject_version() -> str:
    from entrypoint.version import __version__

    return __version__


@pytest.fixture(scope="module")
def pod(podman: Podman, built_image: BuiltImage) -> Iterator[Pod]:
    """The pod (network namespace, published port), and the real ``oidc-provider`` inside it.

    The provider is the test suite's node ``oidc-provider`` (tests/oidc/fixtures.py) run with
    ``nsenter --net`` into the pod's network namespace: like a sidecar, the container reaches it
    on 127.0.0.1, and nothing listens on any address of this machine but the published loopback
    port.
    """
    problem = node_available()
    assert problem is None, f"the image test runs the OIDC provider: {problem} (make node)"
    nsenter, node = shutil.which("nsenter"), shutil.which("node")
    assert nsenter and node
    pod_name = name("pod")
    port = free_port()
    # The sysctl lets a non-root uid bind port 80, as the Kubernetes overlay's pod does.
    podman("pod", "create", "--name", pod_name, "-p", f"127.0.0.1:{port}:80",
           "--sysctl", "net.ipv4.ip_unprivileged_port_start=80")
    wrappers = STATE_DIR / f"node-in-{pod_name}"
    try:
        podman("pod", "start", pod_name)
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod_name)
        netns = podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", infra)
        assert netns.startswith("/"), f"no network namespace for {pod_name}: {netns!r}"
        wrappers.mkdir(exist_ok=True)
        (wrappers / "node").write_text(f"#!/bin/sh\nexec {shlex.quote(nsenter)} --net={shlex.quote(netns)} -- "
                                       f"{shlex.quote(node)} \"$@\"\n")
        (wrappers / "node").chmod(0o755)
        with node_provider("--shape", "authentik",
                           env={"PATH": f"{wrappers}{os.pathsep}{os.environ.get('PATH', '')}"}) as provider:
            yield Pod(name=pod_name, port=port, issuer=provider.issuer)
    finally:
        podman("pod", "rm", "--force", pod_name, check=False)
        shutil.rmtree(wrappers, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "image test timings")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {value}")
        (STATE_DIR / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
