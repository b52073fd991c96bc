"""The Istio ServiceEntry / WorkloadEntry translation, as a library every adapter may import.

Data flow:

  YAML file text ──yamlread (libyaml when present)──> documents ─┐
  API objects (JSON from Kubernetes) ─────────────────────────────┼─objects.read_object─> ServiceEntry
  Pods (objects.Pod.from_json → objects.pod_workload) ────────────┘   / WorkloadEntry (workloads)
      ─> translate.Translation.update(scope, objects); build() → changed hostnames
      ─> services (one per host), problems by scope

Entry points:
- `read_yaml_objects(file, text, default_namespace, cache=ChunkCache())`:
  a file's text → objects, or all its problems (`file:line`, field path).
  Keep one `ChunkCache` per file: an edit then re-reads only the documents
  whose text changed, and unchanged documents come back as the same objects.
- `read_object(data, locator, default_namespace)`: one object's plain data →
  a `ServiceEntry` / `WorkloadEntry`, or problems located by `locator`
  (`ObjectLocator(kind, namespace, name)` for API objects: `ServiceEntry ns/name`
  and the dotted field path such as `spec.ports[1].name`).
- `Pod.from_json(pod)` and `pod_workload(pod)`: a Pod as a workload that a
  ServiceEntry's `workloadSelector` selects (Istio selects Pods and
  WorkloadEntries alike).
- `Translation`: `update(scope, objects)` / `remove(scope)` then `build()`
  → the hostnames whose service changed; `services` and `problems()` by
  scope. Only namespaces whose objects changed are rebuilt.
- `translate(pairs)`: the same all at once, for tests and offline checks.

Everything here is synchronous and pure (no I/O but what the caller hands
in); a caller runs it in its own task or a worker thread, one at a time per
`Translation` and per `ChunkCache`.
"""

from __future__ import annotations

from adapters.istio.locate import FieldPath, FixedLocator, Locator, ObjectLocator, dotted
from adapters.istio.objects import (
    API_VERSIONS,
    SERVICE_ENTRY,
    WORKLOAD_ENTRY,
    Host,
    Object,
    ObjectRef,
    Pod,
    ServiceEntry,
    Workload,
    WorkloadEntry,
    labels_match,
    pod_workload,
    read_object,
    read_objects,
    read_yaml_objects,
)
from adapters.istio.translate import ScopedProblem, Translation, translate
from adapters.istio.yamlread import FAST_LOADER, PURE_LOADER, ChunkCache, Document, parse_documents

__all__ = [
    "API_VERSIONS",
    "FAST_LOADER",
    "PURE_LOADER",
    "SERVICE_ENTRY",
    "WORKLOAD_ENTRY",
    "ChunkCache",
    "Document",
    "FieldPath",
    "FixedLocator",
    "Host",
    "Locator",
    "Object",
    "ObjectLocator",
    "ObjectRef",
    "Pod",
    "ScopedProblem",
    "ServiceEntry",
    "Translation",
    "Workload",
    "WorkloadEntry",
    "dotted",
    "labels_match",
    "parse_documents",
    "pod_workload",
    "read_object",
    "read_objects",
    "read_yaml_objects",
    "translate",
]
