"""Every overlay meets the "restricted" Pod Security Standard; the base meets "baseline".

No cluster here, so the Pod Security Standards' rules for the fields our
manifests can set are checked directly on the built manifests (every overlay,
with and without its NetworkPolicy, and the Flux one after substitution, built
with the real kustomize by tests/test_deploy.py's ``build_variant``), from
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy
version "latest", Kubernetes 1.30 and later).  The overlays run as the uid and
group the image test runs the image as (tests/image: ``--user 10001:0``): the
``restricted`` component.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.image.containers import NON_ROOT_GID, NON_ROOT_UID
from tests.test_deploy import OVERLAY_VARIANTS, build_variant, one, pod_spec

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(key, [])]


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    out = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field}: true")
    psc = pod.get("securityContext", {})
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']} is not a safe sysctl")
    if psc.get("seccompProfile", {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            out.append(f"volume {volume['name']}: hostPath")
    for c in _containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        extra = set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"{c['name']}: adds capabilities {sorted(extra)}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{c['name']}: procMount {sc['procMount']}")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"{c['name']}: seccompProfile Unconfined")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{c['name']}: hostProcess")
    return out


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    out = baseline_violations(pod)
    psc = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    pod_seccomp = psc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    for c in _containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{c['name']}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{c['name']}: runAsUser 0")
        container_seccomp = sc.get("seccompProfile", {}).get("type")
        if not (container_seccomp in ("RuntimeDefault", "Localhost") or (pod_seccomp and container_seccomp is None)):
            out.append(f"{c['name']}: seccompProfile is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{c['name']}: capabilities do not drop ALL")
        extra = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"{c['name']}: adds capabilities {sorted(extra)} (restricted allows NET_BIND_SERVICE only)")
    return out


@pytest.mark.parametrize("name", OVERLAY_VARIANTS)
def test_the_overlay_meets_restricted_and_its_namespace_enforces_it(name: str) -> None:
    built = build_variant(name)
    pod = pod_spec(one(built, "Deployment"))
    assert restricted_violations(pod) == []
    labels = one(built, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    psc = pod["securityContext"]
    assert (psc["runAsUser"], psc["runAsGroup"]) == (NON_ROOT_UID, NON_ROOT_GID), "what tests/image runs"
    assert psc["fsGroup"] == NON_ROOT_GID, "the volumes must be writable by the pod's group"
    # Port 80 without root or an effective capability.
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"} in psc["sysctls"]


def test_the_base_meets_baseline_and_the_checks_can_fail() -> None:
    pod = pod_spec(one(build_variant("base"), "Deployment"))
    assert baseline_violations(pod) == []
    assert "pogly: runAsNonRoot is not true" in restricted_violations(pod)
    pod["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    assert baseline_violations(pod) == ["pogly: adds capabilities ['SYS_ADMIN']"]
