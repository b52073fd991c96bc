"""`host:port` and `scheme://host:port` parsing: the daemon's own parser (`discoveryd.hostport`)."""

from __future__ import annotations

from discoveryd.hostport import is_ip, split_hostport, split_url

__all__ = ["is_ip", "split_hostport", "split_url"]
