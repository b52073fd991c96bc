"""Fakes and harnesses shared by the test folders: registries that cannot run here (Consul agent,
Kubernetes API server), a real etcd, the xDS server fixtures, the DNS harness."""
