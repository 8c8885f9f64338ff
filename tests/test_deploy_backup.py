"""The scheduled backup example (deploy/kubernetes/examples/backup) and the guide's backup runbook.

Built with the real ``kubectl kustomize`` and validated strictly, like the
overlays (tests/test_deploy.py's helpers).  The CronJob's script is run here
too, with stand-ins for ``kubectl`` and ``age`` on ``PATH``: the file names,
the retention, the refusal to write an unencrypted archive when recipients
are configured, and that a failed ``kubectl exec`` leaves no archive behind.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.test_deploy import (
    DEPLOYMENT_DOC,
    KUBERNETES,
    build_variant,
    flux_objects,
    kustomize_build,
    one,
    shell_commands,
    validate_object,
)

EXAMPLE = KUBERNETES / "examples" / "backup"
EXEC = ["kubectl", "exec", "deploy/pogly", "-c", "pogly", "--", "pogly-entrypoint", "backup", "--to", "-"]


def built() -> list[dict[str, Any]]:
    return kustomize_build(EXAMPLE)


def by_kind(kind: str) -> dict[str, Any]:
    return one(built(), kind)


def pod_spec() -> dict[str, Any]:
    return by_kind("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def script() -> str:
    [container] = pod_spec()["containers"]
    assert container["command"] == ["/bin/bash", "-c"]
    return container["args"][0]


def test_the_example_builds_and_every_object_validates() -> None:
    objects = built()
    assert sorted(o["kind"] for o in objects) == ["CronJob", "PersistentVolumeClaim", "Role", "RoleBinding",
                                                  "ServiceAccount"]
    for obj in objects:
        validate_object(obj, "deploy/kubernetes/examples/backup")


def test_it_lives_beside_the_deployment_it_execs_into() -> None:
    deployment = one(build_variant("ingress-nginx"), "Deployment")
    assert {o["metadata"]["namespace"] for o in built()} == {deployment["metadata"]["namespace"]}
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert f"deploy/{deployment['metadata']['name']}" in EXEC and names[0] in EXEC


def test_the_role_allows_exec_into_the_pod_and_nothing_else() -> None:
    role, binding, account = by_kind("Role"), by_kind("RoleBinding"), by_kind("ServiceAccount")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): (sorted(r["verbs"]), r.get("resourceNames"))
             for r in role["rules"]}
    assert rules == {
        (("apps",), ("deployments",)): (["get"], ["pogly"]),
        (("",), ("pods",)): (["get", "list"], None),
        (("",), ("pods/exec",)): (["create"], None),
    }
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]  # kustomize fills it in
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]


def test_the_job_meets_pod_security_restricted_and_writes_to_its_own_volume() -> None:
    cronjob, spec = by_kind("CronJob"), pod_spec()
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod, [container] = spec["securityContext"], spec["containers"]
    assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = by_kind("PersistentVolumeClaim")
    assert volumes[mounts["/backup"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/prune"] == "disabled"
    assert volumes[mounts["/age"]]["configMap"]["optional"] is True
    assert " ".join(EXEC) in script() and "umask 077" in script()


# --------------------------------------------------------------------------- the script, run


def fake_bin(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


def run_script(tmp: Path, *, kubectl_exit: int = 0, age: bool = False, recipients: bool = False,
               keep: int = 14) -> subprocess.CompletedProcess[str]:
    backups, age_dir, bin_dir = tmp / "backup", tmp / "age", tmp / "bin"
    for directory in (backups, age_dir, bin_dir):
        directory.mkdir(exist_ok=True)
    expected = shlex.join(EXEC[1:])
    fake_bin(bin_dir, "kubectl", f"""\
        [ "$*" = {shlex.quote(expected)} ] || {{ echo "unexpected kubectl $*" >&2; exit 2; }}
        printf 'ARCHIVE'
        exit {kubectl_exit}
        """)
    if age:
        fake_bin(bin_dir, "age", """\
            [ "$1 $2 $3" = "--encrypt -R {age}/recipients.txt" ] || exit 2
            printf 'AGE:'; cat
            """.replace("{age}", str(age_dir)))
    if recipients:
        (age_dir / "recipients.txt").write_text("age1examplepublickey\n")
    text = script().replace("/backup/", f"{backups}/").replace("/age/", f"{age_dir}/")
    tools = ":".join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir())
    return subprocess.run(["/bin/bash", "-c", text], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:{tools}", "KEEP": str(keep), "HOME": str(tmp)})


def archives(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "backup").iterdir())


def test_the_script_writes_a_private_archive_and_keeps_the_newest(tmp_path: Path) -> None:
    (tmp_path / "backup").mkdir()
    for day, name in enumerate(["pogly-20250101T000000Z.tar.gz", "pogly-20250102T000000Z.tar.gz",
                                "pogly-20250103T000000Z.tar.gz.age"]):
        old = tmp_path / "backup" / name
        old.write_text("old")
        os.utime(old, (1_700_000_000 + day, 1_700_000_000 + day))
    (tmp_path / "backup" / "pogly-20250104T000000Z.tar.gz.partial").write_text("a failed run's leftover")
    done = run_script(tmp_path, keep=2)
    assert done.returncode == 0, done.stderr
    names = archives(tmp_path)
    assert len(names) == 2 and names[0] == "pogly-20250103T000000Z.tar.gz.age"
    assert re.fullmatch(r"pogly-\d{8}T\d{6}Z\.tar\.gz", names[1])
    new = tmp_path / "backup" / names[1]
    assert new.read_text() == "ARCHIVE" and stat.S_IMODE(new.stat().st_mode) == 0o600


def test_the_script_encrypts_when_recipients_are_configured(tmp_path: Path) -> None:
    done = run_script(tmp_path, age=True, recipients=True)
    assert done.returncode == 0, done.stderr
    [name] = archives(tmp_path)
    assert name.endswith(".tar.gz.age") and (tmp_path / "backup" / name).read_text() == "AGE:ARCHIVE"


def test_the_script_refuses_to_write_an_unencrypted_archive_without_age(tmp_path: Path) -> None:
    done = run_script(tmp_path, recipients=True)
    assert done.returncode == 1 and "has no age" in done.stderr
    assert archives(tmp_path) == []


@pytest.mark.parametrize("code", [69, 75])
def test_a_failed_exec_fails_the_job_and_keeps_no_archive(tmp_path: Path, code: int) -> None:
    done = run_script(tmp_path, kubectl_exit=code)
    assert done.returncode == code
    assert not [n for n in archives(tmp_path) if not n.endswith(".partial")]


# --------------------------------------------------------------------------- the guide's runbook


def backup_section() -> str:
    sections = re.split(r"^## ", DEPLOYMENT_DOC.read_text(), flags=re.MULTILINE)
    [section] = [s for s in sections if s.splitlines()[0].strip() == "Backup and restore"]
    return section


def section_commands() -> list[str]:
    return shell_commands(re.findall(r"^```sh\n(.*?)^```", backup_section(), flags=re.DOTALL | re.MULTILINE))


def first_command(line: str) -> list[str]:
    """The words of a shell line up to its first redirection or pipe."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in ("<", ">", "|", "&&", ";"):
            break
        words.append(word)
    return words


def test_the_runbooks_commands_name_what_the_repository_builds() -> None:
    deployment = one(build_variant("ingress-nginx"), "Deployment")
    namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
    flux_name = flux_objects()["Kustomization"]["metadata"]["name"]
    commands = section_commands()
    seen = set()
    for command in commands:
        argv = first_command(command)
        where = f"docs/deployment.md, Backup and restore: {command!r}"
        if argv[:3] == ["kubectl", "apply", "-k"]:
            assert (KUBERNETES.parent.parent / argv[3]).resolve() == EXAMPLE.resolve(), where
            seen.add("apply")
        elif argv[0] == "flux":
            assert argv[1] in ("suspend", "resume") and argv[2] == "kustomization" and argv[3] == flux_name, where
            seen.add(argv[1])
        elif argv[:3] == ["kubectl", "-n", namespace]:
            if argv[3] == "scale":
                assert argv[4] == f"deploy/{name}" and argv[5] in ("--replicas=0", "--replicas=1"), where
                seen.add(argv[5])
            elif argv[3] == "exec" and f"deploy/{name}" in argv:
                assert argv[argv.index("--") + 1:argv.index("--") + 3] == ["pogly-entrypoint", "backup"], where
                seen.add("backup")
            elif argv[3] == "create" and argv[4] == "job":
                assert argv[5] == "--from=cronjob/pogly-backup", where
            elif argv[3] in ("apply", "wait", "cp", "exec", "delete", "logs", "create", "get"):
                pass
            else:
                pytest.fail(f"{where}: not checked here")
        elif argv[0] in ("docker", "age", "gpg", "age-keygen"):
            pass
        else:
            pytest.fail(f"{where}: not checked here")
    assert {"apply", "suspend", "resume", "--replicas=0", "--replicas=1", "backup"} <= seen


def test_the_runbooks_restore_pod_mounts_both_volumes_and_runs_restore() -> None:
    import yaml

    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", backup_section(),
                                                    flags=re.DOTALL | re.MULTILINE)]
    [pod] = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "Pod"]
    validate_object(pod, "docs/deployment.md restore pod")
    deployment = one(build_variant("ingress-nginx"), "Deployment")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v} == claims
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"/stdb", "/root/.spacetime"} <= mounts
