"""discoveryd: registries in, Envoy xDS and authoritative DNS out."""

__version__ = "0.1.0"
