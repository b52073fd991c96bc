"""config/kubernetes/: every manifest validates against current Kubernetes schemas, the pod meets
Pod Security "restricted", and the example holds what an operator relies on.

Schemas: the PyPI package kubernetes-validate (strict: unknown fields are
errors). The Pod Security check is written from the documented rules of the
Pod Security Standards (baseline + restricted, current version), applied to
the pod template as the admission controller applies them to a pod.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from discoveryd import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "config" / "kubernetes"
K8S_VERSION = kubernetes_validate.latest_version()


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if doc is not None:
                yield name, doc


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def the(kind: str) -> dict[str, Any]:
    found = by_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


OPTIONAL = {"rbac-nodes.yaml", "rbac-pods.yaml"}  # applied by hand, only with `watch_nodes: true` or `pods: true`
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding"}


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - OPTIONAL
    namespaced = [d for _, d in documents() if d["kind"] not in CLUSTER_SCOPED]
    assert {d["metadata"].get("namespace") for d in namespaced} == {kustomization()["namespace"]}


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_every_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d is not None]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_validator_rejects_what_it_should() -> None:
    """The schema check can fail: an unknown field and a wrong type are reported."""
    deployment = the("Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spek": {}}, K8S_VERSION, strict=True)


# -- Pod Security Standards ---------------------------------------------------------------------

_BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
_SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way `pod` (a PodSpec) breaks the Pod Security "restricted" level (which includes baseline)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [
        (kind, c) for kind in ("containers", "initContainers", "ephemeralContainers") for c in pod.get(kind) or []
    ]

    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} is true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("securityContext.windowsOptions.hostProcess is true")
    for vol in pod.get("volumes") or []:
        if "hostPath" in vol:
            out.append(f"volume {vol['name']} is a hostPath")
    for sysctl in psc.get("sysctls") or []:
        if sysctl["name"] not in _SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']} is not in the safe set")

    def profile_ok(sc: dict[str, Any], where: str, restricted: bool) -> None:
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            out.append(f"{where}: seccompProfile Unconfined")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor == "Unconfined":
            out.append(f"{where}: appArmorProfile Unconfined")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type") not in _SELINUX_TYPES:
            out.append(f"{where}: seLinuxOptions.type {selinux.get('type')}")
        if selinux.get("user") or selinux.get("role"):
            out.append(f"{where}: seLinuxOptions.user/role set")
        if restricted and sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser is 0")

    profile_ok(psc, "pod", restricted=True)
    for kind, c in containers:
        where = f"{kind}[{c['name']}]"
        sc = c.get("securityContext") or {}
        profile_ok(sc, where, restricted=True)
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        caps = sc.get("capabilities") or {}
        for cap in caps.get("add") or []:
            if cap not in _BASELINE_CAPS:
                out.append(f"{where}: adds capability {cap}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount {sc['procMount']}")

        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot") is False or (not sc.get("runAsNonRoot") and not psc.get("runAsNonRoot")):
            out.append(f"{where}: runAsNonRoot is not true (neither on the container nor the pod)")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or (psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities.drop does not include ALL")
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                out.append(f"{where}: restricted allows adding only NET_BIND_SERVICE, not {cap}")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: type {sorted(kinds - _RESTRICTED_VOLUMES)} not allowed")
    return out


def pod_spec() -> dict[str, Any]:
    spec = the("Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def test_the_pod_meets_pod_security_restricted() -> None:
    assert restricted_violations(pod_spec()) == []
    assert the("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _sc(pod: dict[str, Any]) -> dict[str, Any]:
    sc: dict[str, Any] = pod["containers"][0]["securityContext"]
    return sc


def _drop_run_as_non_root(pod: dict[str, Any]) -> None:
    pod["securityContext"].pop("runAsNonRoot")
    _sc(pod).pop("runAsNonRoot")


def _drop_seccomp(pod: dict[str, Any]) -> None:
    pod["securityContext"].pop("seccompProfile")
    _sc(pod).pop("seccompProfile")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.update(hostNetwork=True), "hostNetwork is true"),
        (_drop_run_as_non_root, "runAsNonRoot is not true"),
        (lambda p: _sc(p).update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation is not false"),
        (lambda p: _sc(p)["capabilities"].update(drop=["NET_RAW"]), "drop does not include ALL"),
        (lambda p: _sc(p)["capabilities"].update(add=["SYS_ADMIN"]), "adds capability SYS_ADMIN"),
        (lambda p: _sc(p)["capabilities"].update(add=["CHOWN"]), "only NET_BIND_SERVICE, not CHOWN"),
        (_drop_seccomp, "seccompProfile is not RuntimeDefault"),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h is a hostPath"),
        (lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}), "type ['nfs'] not allowed"),
        (lambda p: p["securityContext"].update(runAsUser=0), "pod: runAsUser is 0"),
        (lambda p: p["containers"][0]["ports"].append({"containerPort": 53, "hostPort": 53}), "hostPort 53"),
        (lambda p: _sc(p).update(privileged=True), "privileged"),
    ],
)
def test_the_restricted_check_catches_each_rule(change: Any, expected: str) -> None:
    pod = yaml.safe_load(yaml.safe_dump(pod_spec()))
    change(pod)
    violations = restricted_violations(pod)
    assert any(expected in v for v in violations), violations


# -- what the example promises ----------------------------------------------------------------------


def test_the_pod_runs_as_65532_with_a_read_only_root_and_an_api_token_only_for_the_kubernetes_registry() -> None:
    pod = pod_spec()
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["runAsGroup"] == 65532
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    sa = the("ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "discoveryd"
    kinds = {r["kind"] for r in yaml.safe_load(the("ConfigMap")["data"]["discoveryd.yaml"])["registries"]}
    # The token is mounted exactly when a registry reads the Kubernetes API.
    assert pod["automountServiceAccountToken"] is ("kubernetes" in kinds)
    assert sa.get("automountServiceAccountToken", True) is ("kubernetes" in kinds)


def test_probes_have_timeouts_and_a_startup_probe() -> None:
    (container,) = pod_spec()["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 1, probe
        assert container[probe]["httpGet"]["port"] == "http-admin"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_spread_disruption_budget_priority_and_resources() -> None:
    pod = pod_spec()
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    selector = the("Deployment")["spec"]["selector"]["matchLabels"]
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert the("Deployment")["spec"]["replicas"] > the("PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert pod["priorityClassName"] == the("PriorityClass")["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    assert "cpu" not in container["resources"]["limits"]


def test_the_image_has_a_tag_placeholder_that_kustomize_sets() -> None:
    (container,) = pod_spec()["containers"]
    name, _, tag = container["image"].partition(":")
    assert tag == "TAG"
    (entry,) = [i for i in kustomization()["images"] if i["name"] == name]
    assert re.fullmatch(r"\d+\.\d+\.\d+", entry["newTag"])


def test_the_admin_api_is_not_published_and_only_monitoring_may_reach_it() -> None:
    cfg_text = the("ConfigMap")["data"]["discoveryd.yaml"]
    admin_port = int(yaml.safe_load(cfg_text)["admin"]["listen"].rsplit(":", 1)[1])
    service_ports = {p.get("targetPort") for p in the("Service")["spec"]["ports"]} | {
        p["port"] for p in the("Service")["spec"]["ports"]
    }
    (container,) = pod_spec()["containers"]
    admin_names = {p["name"] for p in container["ports"] if p["containerPort"] == admin_port}
    assert not service_ports & ({admin_port} | admin_names)
    policy = the("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if admin_port in ports:
            assert ports == {admin_port}
            assert all(peer.get("namespaceSelector", {}).get("matchLabels") for peer in rule["from"])
    open_ports = {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]}
    assert open_ports == {15012, 15053, admin_port}


def test_xds_is_tls_only_and_the_config_validates(tmp_path: Path) -> None:
    data = the("ConfigMap")["data"]
    cfg = yaml.safe_load(data["discoveryd.yaml"])
    assert cfg["xds"]["listen"] is None
    assert cfg["xds"]["tls"]["client_ca_file"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    loaded = config_mod.load(tmp_path / "discoveryd.yaml")  # raises ConfigError naming the key
    assert loaded.xds.listen is None
    mounts = {m["mountPath"]: m for m in pod_spec()["containers"][0]["volumeMounts"]}
    assert str(Path(cfg["xds"]["tls"]["cert_file"]).parent) in mounts


def test_the_state_dir_is_a_writable_volume_under_the_read_only_root() -> None:
    cfg = yaml.safe_load(the("ConfigMap")["data"]["discoveryd.yaml"])
    (container,) = pod_spec()["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == cfg["state_dir"]]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
