"""Adapter test fixtures shared across modules: one real etcd per test session."""

from tests.fakes.etcd import etcd  # noqa: F401
