"""The ServiceEntry file registry: files on disk → the registry's shard, kept in step by watching.

Data flow:
  configured paths ─scan─> YAML files ─adapters.istio: parse/validate, per file─> objects
      ─adapters.istio.Translation, per changed namespace─> changed services, problems
      ─> shard.upsert/delete(changed services), shard.set_problems(file, problems)
  DestinationRule / VirtualService objects of the same files ─adapters.istio.policy.PolicySet─>
      HostPolicy per host ─> shard.set_policy(host, policy) (same batch as the services)

`FileSet` owns what each file last said. `refresh()` lists the files under
the configured paths (directories recursively, skipping hidden entries and
names that are not `*.yaml`, `*.yml` or `*.json`), re-reads the files that
are new, changed (inode, size, mtime or ctime differ) or named by a watch
event, and forgets the files that are gone. A file that cannot be read,
parsed or validated keeps its last good objects; its problems are reported
until it is fixed. A file that had content and turns empty keeps it for
`EMPTY_GRACE` first. Each file keeps a chunk cache, so that an edit
re-parses and re-validates only the documents whose text changed, and the
translation (`adapters.istio.Translation`, one scope per file) rebuilds only
the namespaces whose objects changed; `take_changed()` names the hostnames
to write.

`FilesRegistry.run()` does one full refresh, publishes it (a `replace`, in
steps that yield to the loop with the index's writers) and marks the shard
synced, then watches with watchfiles (inotify): configured directories
recursively; the parent directory of a configured file, and the nearest
existing ancestor of a path that does not exist yet, non-recursively. Watch
events are only a trigger for `refresh()`, so editors' write-then-rename,
Kubernetes ConfigMap symlink swaps and directories appearing are all handled
the same way. When the set of watched directories must change (a missing
path appeared, a watched directory went away) the watchers are restarted and
one more refresh catches what happened in between. If watching fails, the
shard is marked failing (its content is kept) and watching is retried with
exponential backoff and jitter.

File reads and directory scans run in a worker thread (`asyncio.to_thread`);
every shard write happens on the event loop in `run()`'s task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watchfiles import awatch

from adapters.files.config import FilesConfig
from adapters.istio import ChunkCache, Object, ServiceEntry, Translation, WorkloadEntry
from adapters.istio.policy import DEFAULT_DOMAIN, AnyObject, PolicySet, read_yaml_all
from adapters.istio.yamlread import collector_paused
from adapters.toolkit.sync import replace_all
from discoveryd.model import Hostname, Problem, Service, SourceId
from discoveryd.policy import HostPolicy
from discoveryd.registry import AdapterContext, PolicyWriter, RegistryConfig, ShardWriter
from discoveryd.session import Backoff, SessionState, run_sessions

log = logging.getLogger("discoveryd.adapters.files")

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 16 * 1024 * 1024
"""Larger files are reported, not read: ServiceEntry files are small, anything this big is a mistake."""

# watchfiles groups events until none arrived for STEP_MS (at most DEBOUNCE_MS), so a
# write lands in the index about 2 * STEP_MS after it happens.
STEP_MS = 25
DEBOUNCE_MS = 250

EMPTY_GRACE = 0.3
"""A file that had content and is now empty, or gone, is given this long (in seconds) before its
services are removed: an in-place write (`open(..., "w")`) truncates before it writes, and tools
that delete then re-create a file (`rm` then `cp`, some deploy scripts) leave a moment without
it; a watch event may land in between. A file that is back within the grace is one change (or
none). A file emptied or deleted on purpose still takes effect well within a second."""

WATCH_BACKOFF = Backoff(initial=0.5, maximum=30.0, healthy_after=10.0)
"""When watching fails (the inotify watch limit, a directory gone mid-setup): retry, marked failing meanwhile."""

LOG_LIMIT = 10
"""At most this many lines of one kind (problems, unsafe permissions) per publish; the rest are one summary line.
Every problem stays visible in /debug/registryz and in metrics."""

Signature = tuple[int, int, int, int, int]
"""(device, inode, size, mtime_ns, ctime_ns) of a file, following symlinks."""


@dataclass(slots=True)
class _File:
    signature: Signature | None
    objects: tuple[AnyObject, ...] = ()
    """The last good content; kept while the file is broken."""
    problems: tuple[Problem, ...] = ()
    emptied_at: float | None = None
    """When the file was first seen empty while it had content (see EMPTY_GRACE)."""
    gone_at: float | None = None
    """When the file was first seen gone while it had content (see EMPTY_GRACE)."""
    cache: ChunkCache = field(default_factory=ChunkCache)
    """The documents of the file's last read, by text: an edit re-reads only what changed."""


@dataclass(frozen=True, slots=True)
class Refreshed:
    changed: bool
    """The services or problems may differ from the previous refresh."""
    recheck_in: float | None = None
    """Run `refresh()` again after this many seconds even without events (an emptied file's grace)."""


@dataclass(frozen=True, slots=True)
class WatchPlan:
    recursive: frozenset[str] = frozenset()
    flat: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Listing:
    files: dict[str, Signature | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unlisted: dict[str, str] = field(default_factory=dict)
    """Directories (or roots) that could not be listed → why."""


class FileSet:
    """What the files under the configured paths say. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        roots: Sequence[Path],
        namespace: str,
        clock: Callable[[], float] = time.monotonic,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self.roots = tuple(str(r) for r in roots)
        self.namespace = namespace
        self.domain = domain
        """Short DestinationRule/VirtualService hosts resolve under this cluster domain."""
        self._clock = clock
        self._files: dict[str, _File] = {}
        self._root_problems: dict[str, tuple[Problem, ...]] = {}
        self._translation = Translation()
        self._policy_set = PolicySet()
        self._changed: set[Hostname] = set()
        self._policy_changed: set[Hostname] = set()
        self._unsafe: set[str] = set()
        """Paths already reported as writable by others (reported once each, again after a fix and relapse)."""

    def refresh(self, named: Collection[str] = ()) -> Refreshed:
        """Re-read files that are new, changed or `named` (by a watch event). Blocking.

        The cyclic garbage collector is paused meanwhile (see `yamlread.collector_paused`).
        """
        with collector_paused():
            return self._refresh(named)

    def _refresh(self, named: Collection[str]) -> Refreshed:
        listing = _scan(self.roots)
        changed = False
        recheck: float | None = None
        for path, gone in list(self._files.items()):
            if path in listing.files or _under_any(path, listing.unlisted):
                continue
            if gone.objects:
                now = self._clock()
                if gone.gone_at is None:
                    gone.gone_at = now
                wait = gone.gone_at + EMPTY_GRACE - now
                if wait > 0:
                    recheck = wait if recheck is None else min(recheck, wait)
                    continue
            del self._files[path]
            self._translation.remove(path)
            self._policy_set.remove(path)
            changed = True
        for path, signature in listing.files.items():
            known = self._files.get(path)
            if known is not None and known.gone_at is not None:
                known.gone_at = None  # back within the grace: read it like a changed file
                known.signature = None
            if (
                known is not None
                and signature is not None
                and known.signature == signature
                and known.emptied_at is None
                and path not in named
            ):
                continue
            if known is None:
                known = self._files[path] = _File(signature)
            objects, problems = load_file(path, self.namespace, known.cache, self.domain)
            known.signature = signature
            if known.objects and not objects and not problems and signature is not None and signature[2] == 0:
                now = self._clock()
                if known.emptied_at is None:
                    known.emptied_at = now
                wait = known.emptied_at + EMPTY_GRACE - now
                if wait > 0:
                    recheck = wait if recheck is None else min(recheck, wait)
                    continue
            known.emptied_at = None
            before = (known.objects, known.problems)
            if problems:
                known.problems = tuple(problems)
            else:
                known.objects, known.problems = tuple(objects), ()
                self._translation.update(path, _registry_objects(known.objects))
                self._policy_set.update(path, known.objects)
            changed = changed or not _same(known.objects, before[0]) or known.problems != before[1]
        root_problems: dict[str, tuple[Problem, ...]] = {
            p: (Problem(p, "does not exist (yet); it is read when it appears"),) for p in listing.missing
        }
        root_problems.update({p: (Problem(p, f"cannot list: {why}"),) for p, why in listing.unlisted.items()})
        if root_problems != self._root_problems:
            self._root_problems = root_problems
            changed = True
        self._changed |= self._translation.build()
        self._policy_changed |= self._policy_set.build()
        self._report_unsafe(listing.files)
        return Refreshed(changed, recheck)

    def _report_unsafe(self, paths: Collection[str]) -> None:
        """Warn about watched files (or their directories) others can write: anyone there can change the mesh."""
        found: list[str] = []
        unsafe: set[str] = set()
        for path in paths:
            why = _writable_by_others(path)
            if why:
                unsafe.add(path)
                if path not in self._unsafe:
                    found.append(why)
        self._unsafe = unsafe
        log_limited(found, "more watched files writable by others")

    def has_content(self, path: str) -> bool:
        known = self._files.get(path)
        return known is not None and bool(known.objects)

    @property
    def services(self) -> Mapping[Hostname, Service]:
        """The services as of the last `refresh()` (a live view: read it before the next refresh)."""
        return self._translation.services

    @property
    def policies(self) -> Mapping[Hostname, HostPolicy]:
        """The traffic policy per host as of the last `refresh()` (a live view, like `services`)."""
        return self._policy_set.policies

    def take_policy_changed(self) -> set[Hostname]:
        """The hosts whose policy changed since the previous call (or since the start)."""
        changed, self._policy_changed = self._policy_changed, set()
        return changed

    def take_changed(self) -> set[Hostname]:
        """The hostnames whose service changed since the previous call (or since the start)."""
        changed, self._changed = self._changed, set()
        return changed

    def problems(self) -> dict[str, tuple[Problem, ...]]:
        """The problems by scope (a file or a configured path), non-empty only. O(problems)."""
        problems: dict[str, list[Problem]] = {}
        for path, known in self._files.items():
            if known.problems:
                problems[path] = list(known.problems)
        for scope, found in self._translation.problems().items():
            problems.setdefault(scope, []).extend(found)
        for scope, found in self._policy_set.problems().items():
            problems.setdefault(scope, []).extend(found)
        out = {scope: tuple(sorted(dict.fromkeys(ps), key=_line)) for scope, ps in sorted(problems.items())}
        out.update(self._root_problems)
        return out

    def result(self) -> tuple[dict[Hostname, Service], dict[str, tuple[Problem, ...]]]:
        """A copy of the services, and the problems by scope (a file or a configured path), both non-empty only."""
        return dict(self._translation.services), self.problems()

    def watch_plan(self) -> WatchPlan:
        """Directories to watch: configured ones recursively; parents / nearest ancestors flat. Blocking."""
        recursive: set[str] = set()
        flat: set[str] = set()
        for root in self.roots:
            if os.path.isdir(root):
                recursive.add(root)
                continue
            parent = os.path.dirname(root)
            while parent != os.path.dirname(parent) and not os.path.isdir(parent):
                parent = os.path.dirname(parent)
            flat.add(parent)
        flat = {d for d in flat if d not in recursive and not _under_any(d, recursive)}
        return WatchPlan(frozenset(recursive), frozenset(flat))


def _registry_objects(objects: Iterable[AnyObject]) -> list[Object]:
    return [o for o in objects if isinstance(o, ServiceEntry | WorkloadEntry)]


def load_file(
    path: str, namespace: str, cache: ChunkCache | None = None, domain: str = DEFAULT_DOMAIN
) -> tuple[list[AnyObject], list[Problem]]:
    """Read, parse and validate one file. Never raises for bad input or I/O errors. Blocking.

    `cache` is the file's own: documents unchanged since its previous read come back as the same objects.
    """
    try:
        # O_NONBLOCK: a FIFO named *.yaml must not hang the reader; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return [], [Problem(path, f"cannot read: {e.strerror or e}")]
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return [], [Problem(path, "not a regular file")]
        if info.st_size > MAX_FILE_BYTES:
            return [], [Problem(path, f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not read")]
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return [], [Problem(path, f"cannot read: {e.strerror or e}")]
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [], [Problem(f"{path}:{line}", "not UTF-8 text")]
    return read_yaml_all(path, text, namespace, cache=cache, domain=domain)


def _writable_by_others(path: str) -> str | None:
    """Why others can change `path`: the file is writable by others, or its directory is (without the sticky bit)."""
    try:
        mode = os.stat(path).st_mode
        parent = os.stat(os.path.dirname(path)).st_mode
    except OSError:
        return None
    if mode & stat.S_IWOTH:
        return f"{_shown(path)} is writable by others (mode {stat.S_IMODE(mode):04o}): anyone on the host can change it"
    if parent & stat.S_IWOTH and not parent & stat.S_ISVTX:
        return f"{_shown(os.path.dirname(path))} is writable by others: anyone on the host can replace {_shown(path)}"
    return None


def _shown(text: str) -> str:
    """Untrusted text (a file name) for a log line: control characters escaped."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def log_limited(lines: Sequence[str], more: str) -> None:
    """Warn with the first `LOG_LIMIT` lines and one summary for the rest (10k bad files: 11 lines, not 10k)."""
    for line in lines[:LOG_LIMIT]:
        log.warning("%s", line)
    if len(lines) > LOG_LIMIT:
        log.warning("... and %d %s (see /debug/registryz)", len(lines) - LOG_LIMIT, more)


def _wanted(name: str) -> bool:
    """YAML/JSON files, not hidden files nor editors' backups and swap files (`.x.swp`, `x~`, `#x#`)."""
    return not name.startswith((".", "#")) and not name.endswith("~") and name.lower().endswith(SUFFIXES)


def _signature(path: str) -> Signature | None:
    """None when the file exists but cannot be stat'ed (it is then read to report why)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _scan(roots: Iterable[str]) -> _Listing:
    listing = _Listing()
    for root in roots:
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except FileNotFoundError:
            listing.missing.append(root)
            continue
        except OSError as e:
            listing.unlisted[root] = e.strerror or str(e)
            continue
        if not is_dir:  # a file named in the config is read whatever its name
            with contextlib.suppress(FileNotFoundError):
                listing.files[root] = _signature(root)
            continue

        _walk(root, listing)
    return listing


def _walk(root: str, listing: _Listing) -> None:
    def failed(e: OSError) -> None:
        listing.unlisted[e.filename or root] = e.strerror or str(e)

    for directory, subdirs, names in os.walk(root, onerror=failed):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if _wanted(name):
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile, or a dangling symlink
                    listing.files[path] = _signature(path)


def _same(a: tuple[AnyObject, ...], b: tuple[AnyObject, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _line(problem: Problem) -> int:
    """The line number of a `file:line` location; 0 for a bare path (sorts first)."""
    line = problem.where.rpartition(":")[2]
    return int(line) if line.isdigit() else 0


def _under_any(path: str, directories: Iterable[str]) -> bool:
    return any(path.startswith(d.rstrip(os.sep) + os.sep) for d in directories)


class FilesRegistry:
    """A `Registry` and `OfflineChecker` over ServiceEntry / WorkloadEntry files."""

    def __init__(self, config: FilesConfig, context: AdapterContext) -> None:
        self.config: RegistryConfig = config
        self.source: SourceId = config.source
        self.files_config = config
        self.roots = config.resolved_paths(context.base_dir)

    def check(self) -> Sequence[Problem]:
        """Every problem in every file, as `discoveryd check` reports them. Blocking; touches no index."""
        files = FileSet(self.roots, self.files_config.namespace, domain=self.files_config.domain)
        files.refresh()
        _, problems = files.result()
        return [p for ps in problems.values() for p in ps]

    async def run(self, shard: ShardWriter) -> None:
        """Load everything, mark synced, then follow changes until cancelled."""
        files = FileSet(self.roots, self.files_config.namespace, domain=self.files_config.domain)
        publisher = _Publisher(shard, files)
        await publisher.refresh()
        shard.mark_synced()

        async def session(state: SessionState) -> None:
            while True:  # a new plan (directories appeared or went away) is no failure
                await self._follow(files, publisher, state)

        await run_sessions(
            shard,
            session,
            backoff=WATCH_BACKOFF,
            describe=lambda e: f"cannot watch files: {e}",
            what="files",
            logger=log,
        )

    async def _follow(self, files: FileSet, publisher: _Publisher, state: SessionState) -> None:
        """Watch the current plan and refresh on every event; return when the plan must change."""
        plan = await asyncio.to_thread(files.watch_plan)
        queue: asyncio.Queue[set[str] | Exception | None] = asyncio.Queue()
        watches = ((plan.recursive, True, None), (plan.flat, False, _leads_to(files.roots)))
        pumps = [
            asyncio.create_task(_pump(dirs, recursive, queue, only), name=f"files-watch:{self.config.source}")
            for dirs, recursive, only in watches
            if dirs
        ]
        try:
            # Pumps add their inotify watches synchronously on their first step, which the event
            # loop runs before resuming here; the refresh below then sees whatever changed before.
            await asyncio.sleep(0)
            recheck = await publisher.refresh()
            publisher.shard.mark_synced()
            state.healthy()
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), recheck)
                except TimeoutError:
                    item = set()
                named: set[str] = set()
                while True:
                    if isinstance(item, Exception):
                        raise item
                    if item is None:
                        return  # a watcher ended: re-plan
                    named |= item
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                recheck = await publisher.refresh(named)
                if await asyncio.to_thread(files.watch_plan) != plan:
                    return
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


def _leads_to(roots: Sequence[str]) -> Callable[[object, str], bool]:
    """A watch filter for the flat watches on parent directories: only paths that lead to a root.

    That is the root itself, a directory on the way to a root that does not
    exist yet, or the first hop of a root that is a symbolic link (a ConfigMap
    file `x.yaml -> ..data/x.yaml`, whose `..data` is swapped). Anything else
    in those parents (another program's files, our own log) is no concern of
    ours and must not cause a refresh.
    """

    def accept(_change: object, path: str) -> bool:
        for root in roots:
            if path == root or root.startswith(path + os.sep):
                return True
            try:
                target = os.readlink(root)
            except OSError:
                continue
            hop = target.split(os.sep, 1)[0]
            if hop and not os.path.isabs(target) and path == os.path.join(os.path.dirname(root), hop):
                return True
        return False

    return accept


async def _pump(
    dirs: Collection[str],
    recursive: bool,
    queue: asyncio.Queue[set[str] | Exception | None],
    only: Callable[[object, str], bool] | None = None,
) -> None:
    """Forward watch events (paths, those `only` accepts) to `queue`; an error, or None when the watch ends.

    Runs until cancelled.
    """
    try:
        watcher = awatch(
            *sorted(dirs),
            watch_filter=only,
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            recursive=recursive,
            ignore_permission_denied=True,
        )
        async with contextlib.aclosing(watcher) as changes:
            async for batch in changes:
                queue.put_nowait({path for _, path in batch})
    except Exception as e:  # handed to the consumer, which retries with backoff
        queue.put_nowait(e)
    else:
        queue.put_nowait(None)


class _Publisher:
    """Writes a `FileSet`'s changes into the shard, only the services that changed, and logs problems once."""

    def __init__(self, shard: ShardWriter, files: FileSet) -> None:
        self.shard = shard
        self.files = files
        self._published = False
        self._problems: dict[str, tuple[Problem, ...]] = {}

    async def refresh(self, named: Collection[str] = ()) -> float | None:
        """Refresh the files (in a worker thread) and publish; returns when to refresh again unprompted."""
        refreshed = await asyncio.to_thread(self.files.refresh, named)
        if refreshed.changed or not self._published:
            await self.publish()
        return refreshed.recheck_in

    async def publish(self) -> None:
        """The changes as one version; the first time, everything, compared and merged by the index in steps
        that yield to the loop when the writer offers it (`SteppedWriter`): 100k services in one `replace`
        would hold DNS and xDS for a quarter of a second or more."""
        changed = self.files.take_changed()
        services = self.files.services
        problems = self.files.problems()
        policy_changed = self.files.take_policy_changed()
        with self.shard.batch():
            if isinstance(self.shard, PolicyWriter):
                for host in sorted(policy_changed):
                    self.shard.set_policy(host, self.files.policies.get(host))
            if not self._published:
                await replace_all(self.shard, list(services.values()))
                self._published = True
            else:
                for host in changed:
                    service = services.get(host)
                    if service is None:
                        self.shard.delete(host)
                    else:
                        self.shard.upsert(service)
            cleared = sorted(self._problems.keys() - problems.keys())
            for scope in cleared:
                self.shard.set_problems(scope, [])
            lines: list[str] = []
            for scope, found in problems.items():
                if self._problems.get(scope) == found:
                    continue
                lines.extend(_shown(str(problem)) for problem in found)
                if self.files.has_content(scope):
                    lines.append(f"{_shown(scope)}: serving the file's last good content")
                self.shard.set_problems(scope, found)
            self._problems = problems
        for scope in cleared[:LOG_LIMIT]:
            log.info("%s: problems cleared", _shown(scope))
        if len(cleared) > LOG_LIMIT:
            log.info("... and problems cleared in %d more files", len(cleared) - LOG_LIMIT)
        log_limited(lines, "more problems")
