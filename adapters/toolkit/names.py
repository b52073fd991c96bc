"""DNS and Kubernetes names: the one place their syntax is checked.

- `is_dns_name(name, ...)`: a DNS name of labels of letters, digits and `-`
  (optionally `_`, optionally upper case, optionally a trailing dot), at
  most 63 characters a label and 253 (255 for Istio's FQDN rule) in all.
- `is_dns1123_label` / `is_dns1123_subdomain`: Kubernetes object names and
  namespaces (lower case, no `_`).
"""

from __future__ import annotations

import re

_LOWER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ANY_CASE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$")
_LOWER_UNDERSCORE = re.compile(r"^[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?$")
_ANY_CASE_UNDERSCORE = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABELS = {
    (False, False): _LOWER,
    (True, False): _ANY_CASE,
    (False, True): _LOWER_UNDERSCORE,
    (True, True): _ANY_CASE_UNDERSCORE,
}


def is_dns_label(label: str, *, upper: bool = False, underscore: bool = False) -> bool:
    """One label: 1-63 letters, digits and inner `-` (and `_` / upper case when allowed)."""
    return 0 < len(label) <= 63 and _LABELS[upper, underscore].match(label) is not None


def is_dns_name(
    name: str,
    *,
    upper: bool = False,
    underscore: bool = False,
    trailing_dot: bool = False,
    max_length: int = 253,
) -> bool:
    """A DNS name (see the module docstring); the empty name is not one."""
    if trailing_dot and name.endswith("."):
        name = name[:-1]
    if not name or len(name) > max_length:
        return False
    pattern = _LABELS[upper, underscore]
    return all(0 < len(label) <= 63 and pattern.match(label) for label in name.split("."))


def is_fqdn(name: str) -> bool:
    """Istio's ValidateFQDN: labels of any case, at most 255 characters, a trailing dot allowed."""
    return is_dns_name(name, upper=True, trailing_dot=True, max_length=255)


def is_dns1123_label(value: str) -> bool:
    """A Kubernetes namespace (or Service) name: lower case, digits, inner `-`, at most 63."""
    return is_dns_label(value)


def is_dns1123_subdomain(value: str) -> bool:
    """A Kubernetes object name (or label-key prefix): DNS-1123 labels joined by `.`, at most 253 in all.

    As Kubernetes' IsDNS1123Subdomain: no limit per label.
    """
    return 0 < len(value) <= 253 and _SUBDOMAIN.match(value) is not None


def domain_name(value: str, *, underscore: bool = False) -> str:
    """A configured registry domain, as the daemon uses it: trimmed, lower case, without a trailing
    dot. ValueError (for the config's error message) when it is not a DNS name."""
    name = value.strip().rstrip(".").lower()
    if not is_dns_name(name, underscore=underscore):
        raise ValueError(f"{value!r} is not a DNS name")
    return name
