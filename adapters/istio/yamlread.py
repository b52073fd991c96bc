"""YAML text → plain documents, fast, with locations composed only when asked for.

Data flow for one file (`read_documents(file, text, cache)`):

  text ─split at `---` lines─> chunks ─(unchanged chunk: reused from `cache`)─>
      ─libyaml events → plain data (`_build`)─> `Document`(data, locator)

- A YAML stream is split at the lines that start with `---` (document
  markers, which YAML never allows inside a scalar), so that an edit re-reads
  only the documents it touched: the caller keeps a `ChunkCache` per file and
  gets the previous result back for every chunk whose text is unchanged
  (then only its line offset moves). A stream with directives (`%YAML`) or
  line breaks other than `\\n` is read as one chunk.
- Data is built straight from the parser's events (libyaml's `CSafeLoader`
  when PyYAML has it, the pure-Python `SafeLoader` otherwise: the same code
  on the same events, so both give the same documents). No node tree with
  positions is kept. Anything that builder does not handle by itself —
  anchors and aliases, merge keys, complex keys, duplicate keys, an error —
  sends that chunk down the composing path (`_compose`), PyYAML's own
  composer and constructor, which reports duplicates and errors with lines.
- A `Document`'s locator composes its chunk's nodes the first time a
  location is asked for (a problem), and turns a field path into `file:line`.

Input is untrusted: syntax errors, duplicate mapping keys and documents that
are not mappings come back as `Problem`s; nothing here raises for bad input.
`kind: List` documents are unwrapped into their `items`.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from adapters.istio.locate import FieldPath, Locator
from adapters.toolkit.location import yaml_line
from discoveryd.model import Problem

LoaderClass = type[yaml.SafeLoader] | type[yaml.CSafeLoader]
FAST_LOADER: LoaderClass = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's loader when PyYAML was built with it, else the pure-Python one."""
PURE_LOADER: LoaderClass = yaml.SafeLoader

_DOCUMENT_MARKER = re.compile(r"^---(?=[ \t\n]|$)", re.MULTILINE)
_ODD_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_SCALAR_CACHE_MAX = 4096
_plain_scalars: dict[LoaderClass, dict[str, Any]] = {}
"""Plain scalar text → its value (resolution depends on the text alone); values are immutable.

Shared by every thread: a lost race only computes a value twice."""


class _Unusual(Exception):
    """The event builder met something only the composer handles (anchor, merge key, complex key...)."""


@dataclass(slots=True, eq=False)
class Chunk:
    """A run of text from one `---` line to the next, and what it holds.

    Owned by the `ChunkCache` of one file: `first_line` is updated when the
    same text is found at another place of a new version of the file.
    """

    file: str
    text: str
    first_line: int
    """0-based line of the chunk's first line in the file."""
    loader: LoaderClass
    _nodes: list[yaml.Node] | None = None

    def nodes(self) -> list[yaml.Node]:
        """The composed root node of each document in the chunk (composed once, on first use)."""
        if self._nodes is None:
            loader = self.loader(self.text)
            nodes: list[yaml.Node] = []
            try:
                while loader.check_node():
                    node = loader.get_node()
                    if node is not None:
                        nodes.append(node)
            except (yaml.YAMLError, RecursionError):
                pass
            finally:
                loader.dispose()
            self._nodes = nodes
        return self._nodes

    def line(self, document: int, path: FieldPath) -> int:
        """1-based line in the file of the deepest node along `path` in the chunk's `document`-th document."""
        nodes = self.nodes()
        if document >= len(nodes):
            return self.first_line + 1
        return self.first_line + yaml_line(nodes[document], path)


class ChunkLocator(Locator):
    """A document of a YAML file: `file:line`, lines found by composing the chunk on demand."""

    __slots__ = ("_chunk", "_document", "_prefix")

    def __init__(self, chunk: Chunk, document: int, prefix: FieldPath = ()) -> None:
        self._chunk = chunk
        self._document = document
        self._prefix = prefix

    @property
    def prefix(self) -> FieldPath:
        return self._prefix

    @property
    def file(self) -> str:
        return self._chunk.file

    def where(self, path: FieldPath = ()) -> str:
        return f"{self._chunk.file}:{self._chunk.line(self._document, self._prefix + path)}"

    def item(self, index: int) -> ChunkLocator:
        return ChunkLocator(self._chunk, self._document, (*self._prefix, "items", index))


@dataclass(frozen=True, slots=True)
class Document:
    """One object of a file: its plain data (dicts, lists, scalars), and where it came from."""

    data: dict[str, Any]
    locator: ChunkLocator

    @property
    def file(self) -> str:
        return self.locator.file

    def problem(self, path: FieldPath, message: str) -> Problem:
        return self.locator.problem(path, message)


@dataclass(slots=True)
class ChunkCache:
    """What each chunk of one file's previous version held, by chunk text. Owned by one reader.

    Each entry keeps the chunk, its documents (none when derived) and what the caller derived
    from them (the validated objects), so that an unchanged chunk costs a
    dict lookup.
    """

    chunks: dict[str, tuple[Chunk, list[Document], Any]] = field(default_factory=dict)


def split_chunks(text: str) -> list[tuple[int, str]]:
    """(0-based first line, text) of each run from one `---` line to the next."""
    if text.startswith("%") or "\n%" in text or any(c in text for c in _ODD_BREAKS):
        return [(0, text)]
    starts = [m.start() for m in _DOCUMENT_MARKER.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    out: list[tuple[int, str]] = []
    line = 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        chunk = text[start:end]
        out.append((line, chunk))
        line += chunk.count("\n")
    return out


def read_documents(
    file: str,
    text: str,
    *,
    loader: LoaderClass = FAST_LOADER,
    cache: ChunkCache | None = None,
    derive: Callable[[list[Document]], tuple[Any, list[Problem]]] | None = None,
) -> tuple[list[tuple[list[Document], Any]], list[Problem]]:
    """Each chunk's documents (or, with `derive`, `derive(documents)`'s value), and every problem.

    With `derive`, each chunk's entry is `([], derived)`: the documents'
    data is dropped once derived (the derived values hold what they need;
    the raw data of a 15 MB file would otherwise stay alive next to them,
    a third of the peak memory). Without it, `(documents, None)`.

    With a `cache`, chunks whose text is unchanged since the previous call
    are reused (derived value not derived again), and the cache is updated
    to this version. Chunks with problems are never cached.
    """
    with collector_paused():
        return _read_documents(file, text, loader, cache, derive)


def _read_documents(
    file: str,
    text: str,
    loader: LoaderClass,
    cache: ChunkCache | None,
    derive: Callable[[list[Document]], tuple[Any, list[Problem]]] | None,
) -> tuple[list[tuple[list[Document], Any]], list[Problem]]:
    results: list[tuple[list[Document], Any]] = []
    problems: list[Problem] = []
    previous = cache.chunks if cache is not None else {}
    kept: dict[str, tuple[Chunk, list[Document], Any]] = {}
    for first_line, text_chunk in split_chunks(text):
        hit = previous.pop(text_chunk, None) if text_chunk not in kept else None
        if hit is not None:
            hit[0].first_line = first_line
            kept[text_chunk] = hit
            results.append((hit[1], hit[2]))
            continue
        chunk = Chunk(file, text_chunk, first_line, loader)
        documents, found = _read_chunk(chunk)
        derived: Any = None
        if derive is not None:
            if not found:
                derived, found = derive(documents)
            documents = []  # derived: the raw data is not kept (see read_documents)
        problems.extend(found)
        results.append((documents, derived))
        if not found and text_chunk not in kept:
            kept[text_chunk] = (chunk, documents, derived)
    if cache is not None:
        cache.chunks = kept
    return results, problems


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile (process-wide), back on after if it was on.

    Reading a big file allocates millions of containers that all survive
    (the documents, then the validated objects): every collection those
    allocations trigger rescans them and finds nothing to free, about a
    quarter of the time of a 15 MB file. Nothing here makes reference
    cycles that must be freed before the read ends.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_documents(file: str, text: str, loader: LoaderClass = FAST_LOADER) -> tuple[list[Document], list[Problem]]:
    """Every object in `text`, in order, and the problems that make the file unusable."""
    results, problems = read_documents(file, text, loader=loader)
    return [d for documents, _ in results for d in documents], problems


def _read_chunk(chunk: Chunk) -> tuple[list[Document], list[Problem]]:
    try:
        roots = _build(chunk.loader, chunk.text)
    except (_Unusual, yaml.YAMLError, RecursionError, TypeError, KeyError, ValueError):
        return _compose(chunk)
    documents: list[Document] = []
    problems: list[Problem] = []
    for i, data in enumerate(roots):
        _collect(data, ChunkLocator(chunk, i), documents, problems)
    return documents, problems


def _build(loader_class: LoaderClass, text: str) -> list[Any]:
    """The root value of every document, built from parser events. Raises `_Unusual` for what it does not handle."""
    loader = loader_class(text)
    resolve: Callable[..., str] = loader.resolve
    constructors = loader.yaml_constructors
    cache = _plain_scalars.setdefault(loader_class, {})
    implicit_resolvers = _implicit_resolvers(loader_class)
    no_resolvers: tuple[tuple[str, re.Pattern[str]], ...] = ()
    get_event = loader.get_event
    scalar_event, alias_event = ScalarEvent, AliasEvent
    mapping_start, sequence_start = MappingStartEvent, SequenceStartEvent
    mapping_end, sequence_end, stream_end = MappingEndEvent, SequenceEndEvent, StreamEndEvent
    missing = _NO_KEY
    roots: list[Any] = []
    top: Any = None
    """The collection being filled; None at the top of the stream."""
    top_is_list = False
    pending = missing
    """The key whose value comes next, when `top` is a mapping."""
    outer: list[tuple[Any, bool, Any]] = []
    """(top, top_is_list, pending) of each collection around `top`."""
    try:
        while True:
            event: Any = get_event()
            kind = type(event)
            if kind is scalar_event:
                if event.anchor is not None:
                    raise _Unusual
                tag = event.tag
                value = event.value
                if tag is None:
                    if event.implicit[0]:  # plain: its type depends on its text alone
                        text_value = value
                        value = cache.get(text_value, missing)
                        if value is missing:
                            if implicit_resolvers is None:
                                tag = resolve(yaml.ScalarNode, text_value, event.implicit)
                            else:  # the resolver's own lookup, without its per-call overhead
                                tag = _STR
                                for candidate, pattern in implicit_resolvers.get(text_value[:1], no_resolvers):
                                    if pattern.match(text_value):
                                        tag = candidate
                                        break
                            value = _scalar(loader, tag, text_value)
                            if len(cache) < _SCALAR_CACHE_MAX and len(text_value) < 64:
                                cache[text_value] = value
                    # else quoted: the text itself
                else:
                    if tag == "!":
                        tag = resolve(yaml.ScalarNode, value, event.implicit)
                    if tag != _STR:
                        value = _scalar(loader, tag, value, constructors)
                if top_is_list:
                    top.append(value)
                elif top is None:
                    roots.append(value)
                elif pending is missing:
                    pending = value
                else:
                    if pending in top:
                        raise _Unusual  # a duplicate key: the composer reports it with its line
                    top[pending] = value
                    pending = missing
            elif kind is mapping_start or kind is sequence_start:
                if event.anchor is not None or (event.tag is not None and event.tag != "!" and not event.implicit):
                    raise _Unusual
                outer.append((top, top_is_list, pending))
                top_is_list = kind is sequence_start
                top = [] if top_is_list else {}
                pending = missing
            elif kind is mapping_end or kind is sequence_end:
                value = top
                top, top_is_list, pending = outer.pop()
                if top_is_list:
                    top.append(value)
                elif top is None:
                    roots.append(value)
                elif pending is missing:
                    raise _Unusual  # a complex key
                else:
                    if pending in top:
                        raise _Unusual
                    top[pending] = value
                    pending = missing
            elif kind is alias_event:
                raise _Unusual
            elif kind is stream_end or event is None:
                break
            # else stream start, document start / end
    finally:
        loader.dispose()
    return roots


def _implicit_resolvers(loader_class: LoaderClass) -> dict[str, tuple[tuple[str, re.Pattern[str]], ...]] | None:
    """The loader's implicit resolvers by first character, when its `resolve` is exactly that lookup; else None.

    `BaseResolver.resolve` for a plain scalar tries the resolvers registered
    for its first character (`''` for the empty scalar), then the wildcard
    ones (registered for any first character), then path resolvers, then
    falls back to `str`. Without wildcard and path resolvers (PyYAML's safe
    loaders), the lookup here gives the same tag without a method call and
    a list concatenation per scalar.
    """
    found = _resolver_tables.get(loader_class, _NO_KEY)
    if found is _NO_KEY:
        table = loader_class.yaml_implicit_resolvers
        simple = (
            None not in table
            and not loader_class.yaml_path_resolvers
            and loader_class.DEFAULT_SCALAR_TAG == _STR
            and loader_class.resolve is yaml.resolver.BaseResolver.resolve
        )
        found = {first: tuple(pairs) for first, pairs in table.items()} if simple else None
        _resolver_tables[loader_class] = found
    return found  # type: ignore[no-any-return]


def _scalar(loader: Any, tag: str, text: str, constructors: Any = None) -> Any:
    """A scalar of a resolved `tag` (not a string), built by the loader's own constructor."""
    if tag == _STR:
        return text
    if tag == _MERGE:
        raise _Unusual
    table = constructors if constructors is not None else loader.yaml_constructors
    return table[tag](loader, yaml.ScalarNode(tag, text))


class _NoKey:
    __slots__ = ()


_NO_KEY: Any = _NoKey()
_resolver_tables: dict[LoaderClass, dict[str, tuple[tuple[str, re.Pattern[str]], ...]] | None] = {}


def _compose(chunk: Chunk) -> tuple[list[Document], list[Problem]]:
    """PyYAML's composer and constructor on one chunk: duplicates and errors reported with their lines."""
    documents: list[Document] = []
    problems: list[Problem] = []
    loader = chunk.loader(chunk.text)
    nodes: list[yaml.Node] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            nodes.append(node)
            duplicates = _duplicate_keys(chunk, node)
            if duplicates:
                problems.extend(duplicates)
                continue
            data = loader.construct_document(node)
            _collect(data, ChunkLocator(chunk, len(nodes) - 1), documents, problems)
    except yaml.YAMLError as e:
        problems.append(_yaml_error(chunk, e))
    except RecursionError:
        problems.append(Problem(f"{chunk.file}:{chunk.first_line + 1}", "invalid YAML: nested too deeply"))
    finally:
        loader.dispose()
    chunk._nodes = nodes
    return documents, problems


def _duplicate_keys(chunk: Chunk, root: yaml.Node) -> list[Problem]:
    """Mapping keys given twice: Kubernetes rejects them, PyYAML would silently keep the last."""
    problems: list[Problem] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # aliases share nodes, and may be recursive
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, int] = {}
            for key, value in node.value:
                stack.append(value)
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE:
                    continue
                line = chunk.first_line + key.start_mark.line + 1
                if key.value in keys:
                    message = f"duplicate key {key.value!r} (first given on line {keys[key.value]})"
                    problems.append(Problem(f"{chunk.file}:{line}", message))
                else:
                    keys[key.value] = line
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    problems.sort(key=lambda p: int(p.where.rpartition(":")[2]))
    return problems


def _yaml_error(chunk: Chunk, e: yaml.YAMLError) -> Problem:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = f":{chunk.first_line + mark.line + 1}" if mark is not None else ""
    reason = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return Problem(f"{chunk.file}{line}", f"invalid YAML: {reason}" + (f" ({context})" if context else ""))


def _collect(data: Any, locator: ChunkLocator, out: list[Document], problems: list[Problem]) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        what = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        problems.append(locator.problem((), f"a document must be an object (a mapping), not {what}"))
        return
    if data.get("kind") != "List":
        out.append(Document(data, locator))
        return
    items = data.get("items")
    if items is None:
        return
    if not isinstance(items, list):
        problems.append(locator.problem(("items",), "must be a list of objects"))
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(locator.problem(("items", i), "must be an object (a mapping)"))
            continue
        if item.get("kind") == "List":
            problems.append(locator.problem(("items", i, "kind"), "a List cannot contain another List"))
            continue
        out.append(Document(item, locator.item(i)))
