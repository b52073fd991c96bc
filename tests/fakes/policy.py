"""A DestinationRule and a VirtualService for one service, and helpers that read and build them:
shared by the policy tests and the state tests (policies saved and restored)."""

from __future__ import annotations

from google.protobuf.message import Message

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Problem, Service
from discoveryd.policy import HostPolicy
from discoveryd.xds.resources import Builder, BuildOptions

HOST = Hostname("cart.shop.internal")

# The first lines of a DestinationRule and of a VirtualService named cart in namespace shop, for HOST.
DR_HEAD = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart, namespace: shop}
spec:
  host: cart.shop.internal
"""
VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart.shop.internal]
"""

DR = (
    DR_HEAD
    + """\
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 2
      interval: 2s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
      minHealthPercent: 20
    connectionPool:
      tcp: {maxConnections: 7, connectTimeout: 250ms, tcpKeepalive: {probes: 3, time: 60s, interval: 10s}}
      http: {http1MaxPendingRequests: 11, http2MaxRequests: 13, maxRequestsPerConnection: 5, maxRetries: 2,
             idleTimeout: 90s}
    portLevelSettings:
    - port: {number: 9090}
      tls: {mode: MUTUAL, clientCertificate: /certs/c.pem, privateKey: /certs/k.pem,
            caCertificates: /certs/ca.pem, sni: cart.example, subjectAltNames: [cart.example]}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}
"""
)

VS = (
    VS_HEAD
    + """\
  http:
  - match:
    - uri: {exact: /a}
      method: {exact: POST}
    - headers: {x-canary: {regex: "y.*"}}
    route: [{destination: {host: cart.shop.internal, subset: v2}}]
    timeout: 3s
    retries: {attempts: 4, perTryTimeout: 1s, retryOn: unavailable}
    fault: {delay: {fixedDelay: 5ms, percentage: {value: 10}}}
  - route:
    - {destination: {host: cart.shop.internal, subset: v1}, weight: 80}
    - {destination: {host: cart.shop.internal, subset: v2}, weight: 20}
"""
)

SERVICE = Service(
    hostname=HOST,
    namespace="shop",
    ports=(Port(8080, "grpc", PortProtocol.GRPC), Port(9090, "http", PortProtocol.HTTP)),
    endpoints=(
        Endpoint("10.0.0.1", labels={"version": "v1"}),
        Endpoint("10.0.0.2", labels={"version": "v2"}),
        Endpoint("10.0.0.3", labels={"version": "v1"}),
    ),
)


def rule_text(name: str, namespace: str, lb: str, export_to: str = "", subset: str = "") -> str:
    """A DestinationRule `name` of `namespace` for HOST with the simple load balancer `lb`; with an exportTo
    list when `export_to` is given, and one subset `subset` (labels version: `subset`) when that is."""
    text = f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  host: {HOST}
  {f"exportTo: {export_to}" if export_to else ""}
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
"""
    if subset:
        text += f"  subsets: [{{name: {subset}, labels: {{version: {subset}}}}}]\n"
    return text


def read_policies(text: str, namespace: str = "default", file: str = "p.yaml") -> PolicySet:
    """`text` read as the file `file` of a files registry (objects without a namespace in `namespace`) and
    built; the file must read without problems."""
    objects, problems = read_yaml_all(file, text, namespace)
    assert not problems, problems
    policies = PolicySet()
    policies.update(file, objects)
    policies.build()
    return policies


def problems_of(text: str, namespace: str = "default", file: str = "p.yaml") -> list[Problem]:
    """The problems of reading `text` as the file `file`, or when it reads, those of building its policies."""
    objects, problems = read_yaml_all(file, text, namespace)
    if problems:
        return problems
    policies = PolicySet()
    policies.update(file, objects)
    policies.build()
    return [p for ps in policies.problems().values() for p in ps]


def policy_of(text: str) -> HostPolicy:
    policies = read_policies(text)
    assert policies.problems() == {}
    return policies.policies[HOST]


def built(policy: HostPolicy | None) -> dict[tuple[str, str], Message]:
    return {(t, n): m for t, n, m in Builder(BuildOptions()).build(SERVICE, policy)}
