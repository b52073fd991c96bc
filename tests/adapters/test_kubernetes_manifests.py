"""The manifests a pod deployment of the Kubernetes registry needs: valid, least privilege, and enough.

Validated with kubernetes-validate against the schemas of the newest Kubernetes release it knows, and
checked against what the adapter really requests: every kind it lists and watches is granted, nothing
else, and only get/list/watch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from adapters.kubernetes import KubernetesConfig, KubernetesRegistry
from adapters.kubernetes.crds import IstioView
from adapters.kubernetes.registry import _ServiceView
from discoveryd.index import Index

MANIFESTS = Path(__file__).resolve().parents[2] / "config" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


@pytest.mark.parametrize("name", ["rbac.yaml", "rbac-nodes.yaml", "rbac-pods.yaml", "discoveryd.yaml"])
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    version = kubernetes_validate.latest_version()
    for doc in _docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


def _rules(name: str) -> set[tuple[str, str]]:
    granted = set()
    for doc in _docs(name):
        if doc["kind"] == "ClusterRole":
            for rule in doc["rules"]:
                assert sorted(rule["verbs"]) == ["get", "list", "watch"], rule
                granted.update((g, r) for g in rule["apiGroups"] for r in rule["resources"])
    return granted


def _requested(tmp: Path, **keys: Any) -> set[tuple[str, str]]:
    config = KubernetesConfig.model_validate({"kind": "kubernetes", "name": "c"} | keys)
    registry = KubernetesRegistry(config, tmp)
    shard = Index().writer(config.source)
    view = _ServiceView(config, shard.part("services"))
    istio = IstioView(shard.part("istio")) if config.istio else None
    return {(r.kind.group, r.kind.plural) for r in registry._reflectors(view, istio)}


def test_the_cluster_role_grants_what_the_adapter_reads_and_no_more(tmp_path: Path) -> None:
    default = _rules("rbac.yaml")
    assert _requested(tmp_path) <= default
    assert default == {
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.istio.io", "serviceentries"),
        ("networking.istio.io", "workloadentries"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "virtualservices"),
    }
    assert _requested(tmp_path) == default  # and all of it is needed
    # Without `istio`, no Istio kind is read at all.
    assert not {p for g, p in _requested(tmp_path, istio=False) if g == "networking.istio.io"}
    # Nodes only with watch_nodes, from the separate file.
    assert ("", "nodes") in _requested(tmp_path, watch_nodes=True)
    assert _rules("rbac-nodes.yaml") == {("", "nodes")}
    # Pods only with pods (workloadSelector over Pods), from their own file.
    assert ("", "pods") not in _requested(tmp_path)
    assert ("", "pods") in _requested(tmp_path, pods=True)
    assert _rules("rbac-pods.yaml") == {("", "pods")}


def test_the_deployment_runs_as_the_service_account_with_an_in_cluster_registry() -> None:
    rbac = {(d["kind"], d["metadata"]["name"]): d for d in _docs("rbac.yaml")}
    account = rbac[("ServiceAccount", "discoveryd")]
    assert account.get("automountServiceAccountToken", True) is True
    binding = rbac[("ClusterRoleBinding", "discoveryd")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "discoveryd", "namespace": account["metadata"]["namespace"]}
    ]
    app = {d["kind"]: d for d in _docs("discoveryd.yaml")}
    pod = app["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "discoveryd" and pod.get("automountServiceAccountToken", True)
    assert app["Deployment"]["metadata"]["namespace"] == account["metadata"]["namespace"]
    config = yaml.safe_load(app["ConfigMap"]["data"]["discoveryd.yaml"])
    (entry,) = [r for r in config["registries"] if r["kind"] == "kubernetes"]
    parsed = KubernetesConfig.model_validate(entry)
    assert parsed.kubeconfig is None and parsed.domain == "cluster.local"  # in-cluster service account
