"""The xDS server: the index served to Envoy and proxyless gRPC clients over ADS, CDS, EDS, LDS and RDS.

`server` runs the gRPC server and the push loop, `resources` builds every
resource from snapshots, `connection` holds one stream's protocol state,
`status` renders `/debug/syncz` as the `discoveryd status` table.
"""

from discoveryd.xds.server import XdsServer

__all__ = ["XdsServer"]
