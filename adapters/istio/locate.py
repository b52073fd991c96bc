"""Where an Istio object came from: the abstraction problems are located by.

Validation (`objects`) and translation (`translate`) never format a location
themselves; they hand a field path to the object's `Locator`:

- `ObjectLocator` — an object read from an API server (a Kubernetes CRD as
  JSON): `ServiceEntry shop/api` plus the dotted field path.
- `yamlread`'s file locator — a document of a YAML file: `file:line` of the
  deepest node along the path, composed only when a location is asked for.

A locator is immutable from its holder's point of view; a file locator's line
offset is kept current by the reader that owns the file (see `yamlread`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from adapters.toolkit.location import FieldPath, dotted
from discoveryd.model import Problem

__all__ = ["FieldPath", "FixedLocator", "Locator", "ObjectLocator", "dotted"]


class Locator(ABC):
    """Turns a field path of one object into a place a person can find."""

    __slots__ = ()

    @abstractmethod
    def where(self, path: FieldPath = ()) -> str:
        """The object (and, for files, the line of `path`): `file:line` or `ServiceEntry ns/name`."""

    @property
    def prefix(self) -> FieldPath:
        """The object's own path inside its document (`("items", 3)` inside a `kind: List`)."""
        return ()

    def field(self, path: FieldPath) -> str:
        return dotted(self.prefix + path)

    def problem(self, path: FieldPath, message: str) -> Problem:
        return Problem(where=self.where(path), message=message, field=self.field(path))


@dataclass(frozen=True, slots=True)
class ObjectLocator(Locator):
    """An API object: located by kind and `namespace/name`; the field path says where inside."""

    kind: str
    namespace: str
    name: str

    def where(self, path: FieldPath = ()) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class FixedLocator(Locator):
    """A place known in advance (a whole file, a key); every path maps to it."""

    place: str

    def where(self, path: FieldPath = ()) -> str:
        return self.place
