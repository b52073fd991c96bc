"""Client TLS settings shared by adapters that dial a registry over TLS (etcd, Consul).

Read from a registry's `tls:` config block; each adapter turns it into its own client's
credentials. Relative paths are resolved by the adapter against the config file's directory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator


class ClientTls(BaseModel):
    """The CA that signs the registry's certificate, and our own certificate (mTLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = None
    """PEM bundle of trusted CAs; omitted: the system roots."""
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """The name to verify in the registry's certificate, when it differs from the address host."""

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self
