"""Adapter test fixtures shared across modules: one real etcd per test session."""

from tests.adapters.etcd_server import etcd  # noqa: F401
