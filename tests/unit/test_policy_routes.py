"""VirtualService rewrite and header manipulation: validation as Istio does it, and the RDS they become."""

from __future__ import annotations

import textwrap

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2

from adapters.istio.policy import PolicySet, read_yaml_all
from discoveryd.model import Endpoint, Hostname, Port, PortProtocol, Problem, Service, Severity
from discoveryd.policy import HostPolicy
from discoveryd.xds.resources import ROUTE, Builder, BuildOptions
from tests.fakes.policy import VS_HEAD

HOST = Hostname("cart.shop.internal")
SERVICE = Service(
    hostname=HOST,
    namespace="shop",
    ports=(Port(8080, "http", PortProtocol.HTTP),),
    endpoints=(Endpoint("10.0.0.1", labels={"version": "v1"}), Endpoint("10.0.0.2", labels={"version": "v2"})),
)
HEAD = VS_HEAD + "  http:\n"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def read(http: str) -> tuple[HostPolicy | None, list[Problem]]:
    objects, problems = read_yaml_all("vs.yaml", HEAD + textwrap.indent(textwrap.dedent(http), "  "), "default")
    if problems:
        return None, problems
    policies = PolicySet()
    policies.update("vs.yaml", objects)
    policies.build()
    return policies.policies[HOST], [p for ps in policies.problems().values() for p in ps]


def routes(http: str) -> list[object]:
    policy, problems = read(http)
    assert [p for p in problems if p.severity is not Severity.WARNING] == [] and policy is not None
    out = {(t, n): m for t, n, m in Builder(BuildOptions()).build(SERVICE, policy)}
    rc = out[(ROUTE, f"{HOST}:8080")]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    return list(rc.virtual_hosts[0].routes)


ROUTE_TO = "route: [{destination: {host: cart.shop.internal}}]\n"


# -- validation: one case per rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "field", "message"),
    [
        ("- rewrite: {uri: /a, uriRegexRewrite: {match: x, rewrite: y}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite", "only one of uri or uriRegexRewrite"),
        ("- rewrite: {}\n  " + ROUTE_TO, "spec.http[0].rewrite", "needs uri, uriRegexRewrite or authority"),
        ("- rewrite: {uriRegexRewrite: {match: '^/a'}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite", "needs both match and rewrite"),
        ("- rewrite: {uriRegexRewrite: {match: '(?=a)', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "RE2"),
        ("- rewrite: {uriRegexRewrite: {match: '^/(?>a|ab)c', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "not RE2 (lookaround, a named backreference, an atomic"),
        ("- rewrite: {uriRegexRewrite: {match: '^/a*+', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "possessive"),
        ("- rewrite: {uriRegexRewrite: {match: '^/(a)?(?(1)b|c)', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "conditional"),
        ("- rewrite: {uriRegexRewrite: {match: '^/(?P<v>a)(?P=v)', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "named backreference"),
        ("- rewrite: {uriRegexRewrite: {match: '^/x\\Z', rewrite: /b}}\n  " + ROUTE_TO,
         "spec.http[0].rewrite.uriRegexRewrite.match", "RE2 writes it \\z"),
        ("- headers: {request: {set: {':path': /x}}}\n  " + ROUTE_TO,
         'spec.http[0].headers.request.set[":path"]', "pseudo-headers"),
        ("- headers: {response: {set: {host: x}}}\n  " + ROUTE_TO,
         "spec.http[0].headers.response.set.host", "Host header"),
        ("- headers: {request: {remove: [host]}}\n  " + ROUTE_TO,
         "spec.http[0].headers.request.remove[0]", "Host header"),
        ("- headers: {request: {add: {'x y': v}}}\n  " + ROUTE_TO,
         'spec.http[0].headers.request.add["x y"]', "invalid header name"),
        ("- headers: {request: {set: {'': v}}}\n  " + ROUTE_TO,
         'spec.http[0].headers.request.set[""]', "cannot be empty"),
        ("- headers: {response: {add: {x-a: \"a\\u0001b\"}}}\n  " + ROUTE_TO,
         'spec.http[0].headers.response.add["x-a"]', "control characters"),
        ("- headers: {response: {add: {x-a: 100%}}}\n  " + ROUTE_TO,
         'spec.http[0].headers.response.add["x-a"]', "'%%'"),
        ("- rewrite: {authority: a.example}\n  headers: {request: {set: {host: b.example}}}\n  " + ROUTE_TO,
         "spec.http[0].headers.request", "cannot be set twice"),
        ("- headers: {request: {set: {host: a.example}, add: {':authority': b.example}}}\n  " + ROUTE_TO,
         "spec.http[0].headers.request", "multiple times"),
        ("- route:\n  - destination: {host: cart.shop.internal}\n    headers: {request: {set: {':method': GET}}}\n",
         'spec.http[0].route[0].headers.request.set[":method"]', "pseudo-headers"),
    ],
)  # fmt: skip
def test_rewrite_and_header_problems_are_located(http: str, field: str, message: str) -> None:
    _, found = read(http)
    assert len(found) == 1, found
    assert found[0].field == field, found
    assert message in found[0].message, found
    assert found[0].where.startswith("vs.yaml:")


@pytest.mark.parametrize("regex", [r"^/api/(v[0-9]+)/(.*)$", r"[a*+(?=]x", r"\\Z", r"\\1", r"a*?b+?"])
def test_re2_regexes_pass(regex: str) -> None:
    _, found = read(f"- rewrite: {{uriRegexRewrite: {{match: '{regex}', rewrite: /b}}}}\n  " + ROUTE_TO)
    assert found == []


def test_valid_header_values_pass() -> None:
    _, found = read(
        "- headers: {request: {set: {x-a: '%HOSTNAME%', x-b: '100%%', x-c: \"%REQ(x-id)% tab\\tok\"}}}\n  " + ROUTE_TO
    )
    assert found == []


# -- RDS ------------------------------------------------------------------------------------------------


def test_uri_rewrite_replaces_the_matched_prefix_or_the_whole_path() -> None:
    prefix, exact, regex = routes(
        "- match: [{uri: {prefix: /api/}}, {uri: {exact: /old}}, {uri: {regex: '/r/[0-9]+'}}]\n"
        "  rewrite: {uri: /v2/}\n  " + ROUTE_TO
    )
    assert prefix.match.prefix == "/api/" and prefix.route.prefix_rewrite == "/v2/"  # type: ignore[attr-defined]
    # Envoy's prefix_rewrite on a path or regex match replaces the whole path, which is Istio's meaning.
    assert exact.match.path == "/old" and exact.route.prefix_rewrite == "/v2/"  # type: ignore[attr-defined]
    assert regex.match.safe_regex.regex == "/r/[0-9]+"  # type: ignore[attr-defined]
    assert regex.route.prefix_rewrite == "/v2/"  # type: ignore[attr-defined]


def test_uri_rewrite_without_a_uri_match_replaces_istios_catch_all_slash() -> None:
    (r,) = routes("- rewrite: {uri: /v2/}\n  " + ROUTE_TO)
    assert r.match.prefix == "/" and r.route.prefix_rewrite == "/v2/"  # type: ignore[attr-defined]
    (plain,) = routes("- " + ROUTE_TO)
    assert plain.match.prefix == ""  # type: ignore[attr-defined]


def test_regex_and_authority_rewrites() -> None:
    (r,) = routes(
        "- rewrite: {uriRegexRewrite: {match: '^/a/(.*)$', rewrite: '/b/\\1'}, authority: new.example}\n  " + ROUTE_TO
    )
    action = r.route  # type: ignore[attr-defined]
    assert action.regex_rewrite.pattern.regex == "^/a/(.*)$" and action.regex_rewrite.substitution == "/b/\\1"
    assert not action.prefix_rewrite
    assert action.host_rewrite_literal == "new.example"


def _options(options: object) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in options]  # type: ignore[attr-defined]


def test_route_headers_and_a_single_destination_s_headers_go_on_the_route() -> None:
    (r,) = routes(
        """\
        - headers:
            request: {set: {x-b: "2", x-a: "1", ':authority': up.example}, add: {x-c: "3"}, remove: [x-drop]}
            response: {set: {x-r: r}, remove: [server]}
          route:
          - destination: {host: cart.shop.internal, subset: v1}
            headers: {request: {set: {x-dest: d}}, response: {add: {x-dest-r: e}}}
        """
    )
    assert _options(r.request_headers_to_add) == [  # type: ignore[attr-defined]
        ("x-a", "1", OVERWRITE),
        ("x-b", "2", OVERWRITE),
        ("x-c", "3", APPEND),
        ("x-dest", "d", OVERWRITE),
    ]
    assert list(r.request_headers_to_remove) == ["x-drop"]  # type: ignore[attr-defined]
    assert _options(r.response_headers_to_add) == [("x-r", "r", OVERWRITE), ("x-dest-r", "e", APPEND)]  # type: ignore[attr-defined]
    assert list(r.response_headers_to_remove) == ["server"]  # type: ignore[attr-defined]
    assert r.route.host_rewrite_literal == "up.example"  # type: ignore[attr-defined]


def test_weighted_destinations_carry_their_own_headers() -> None:
    (r,) = routes(
        """\
        - route:
          - destination: {host: cart.shop.internal, subset: v1}
            weight: 90
            headers: {request: {add: {x-v: one}, set: {host: v1.example}}, response: {remove: [x-internal]}}
          - destination: {host: cart.shop.internal, subset: v2}
            weight: 10
        """
    )
    assert not r.request_headers_to_add  # type: ignore[attr-defined]
    one, two = r.route.weighted_clusters.clusters  # type: ignore[attr-defined]
    assert _options(one.request_headers_to_add) == [("x-v", "one", APPEND)]
    assert list(one.response_headers_to_remove) == ["x-internal"]
    assert one.host_rewrite_literal == "v1.example"
    assert not two.request_headers_to_add and not two.host_rewrite_literal
