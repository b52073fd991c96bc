"""Rules every adapter's config shares (adapters/toolkit): the registry domain and the backoff keys."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from adapters.consul.config import ConsulConfig
from adapters.etcd.config import EtcdConfig
from adapters.files.config import FilesConfig
from adapters.kubernetes.config import KubernetesConfig

BASE: dict[type[pydantic.BaseModel], dict[str, Any]] = {
    FilesConfig: {"kind": "files", "name": "local", "paths": ["se/"]},
    KubernetesConfig: {"kind": "kubernetes", "name": "c1"},
    ConsulConfig: {"kind": "consul", "name": "dc1", "address": "http://127.0.0.1:8500"},
    EtcdConfig: {"kind": "etcd", "name": "e", "endpoints": ["http://127.0.0.1:2379"]},
}


@pytest.mark.parametrize("model", list(BASE), ids=lambda m: m.__name__)
def test_the_domain_is_normalised_or_rejected_naming_the_key(model: type[pydantic.BaseModel]) -> None:
    assert model.model_validate({**BASE[model], "domain": " Mesh.Example. "}).domain == "mesh.example"  # type: ignore[attr-defined]
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate({**BASE[model], "domain": "not a name"})
    assert caught.value.errors()[0]["loc"] == ("domain",)
    assert "'not a name' is not a DNS name" in str(caught.value)


def test_only_etcd_domains_may_hold_underscores() -> None:
    assert EtcdConfig.model_validate({**BASE[EtcdConfig], "domain": "_svc.mesh"}).domain == "_svc.mesh"
    with pytest.raises(pydantic.ValidationError, match="not a DNS name"):
        KubernetesConfig.model_validate({**BASE[KubernetesConfig], "domain": "_svc.mesh"})


@pytest.mark.parametrize("model", [KubernetesConfig, ConsulConfig, EtcdConfig], ids=lambda m: m.__name__)
@pytest.mark.parametrize(("initial", "maximum"), [("0s", "30s"), ("10s", "1s")])
def test_backoff_initial_is_positive_and_at_most_backoff_max(
    model: type[pydantic.BaseModel], initial: str, maximum: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match="backoff_initial must be > 0 and at most backoff_max"):
        model.model_validate({**BASE[model], "backoff_initial": initial, "backoff_max": maximum})
    assert model.model_validate({**BASE[model], "backoff_initial": "1s", "backoff_max": "1s"})
