"""`discoveryd.testing`: the contract suite run for the in-memory registry, and the spec/registry seams."""

from __future__ import annotations

import pytest

from discoveryd.registry import AdapterContext, AdapterSpec, Registry, RegistryConfig
from discoveryd.testing import MEMORY, AdapterContract, MemoryConfig, MemoryHarness, MemoryRegistry


class TestMemoryContract(AdapterContract):
    @pytest.fixture
    def harness(self) -> MemoryHarness:
        return MemoryHarness()


def test_spec_builds_with_its_own_config_model_only(tmp_path: object) -> None:
    ctx = AdapterContext(base_dir=tmp_path)  # type: ignore[arg-type]
    registry = MEMORY.build(MemoryConfig(kind="memory", name="m"), ctx)
    assert isinstance(registry, MemoryRegistry) and isinstance(registry, Registry)
    assert registry.source == "memory/m" == registry.config.source
    with pytest.raises(TypeError, match="memory adapter needs a MemoryConfig"):
        MEMORY.build(RegistryConfig(kind="memory", name="m"), ctx)


def test_spec_is_generic_over_its_config() -> None:
    spec: AdapterSpec[MemoryConfig] = MEMORY
    assert spec.config_model is MemoryConfig
