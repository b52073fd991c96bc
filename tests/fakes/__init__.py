"""Faithful fakes of registries that cannot run here (Consul agent, Kubernetes API server)."""
