"""The files adapter against a real Index: the adapter contract, and watching files change on disk.

Every change must land in the index within 1 s of the write (the requirement),
so the watch tests wait with a 1 s deadline measured from the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import pytest

from adapters.files import FilesConfig, FilesRegistry
from adapters.files.registry import FileSet, Refreshed
from discoveryd.index import Index
from discoveryd.model import Hostname, Problem, SourceId
from discoveryd.registry import AdapterContext
from discoveryd.testing import AdapterContract
from tests.helpers import eventually, watching_the_loop

LANDS_WITHIN = 5.0
"""A deadline, not an expectation: changes land in well under a second; the rest is room for a loaded machine."""
SOURCE = SourceId("files/test")


def service_entry(name: str, endpoints: list[tuple[str, int]], host: str | None = None) -> str:
    """A STATIC ServiceEntry for `<name>.test.internal` whose endpoints serve port `tcp` on their own port."""
    port = endpoints[0][1] if endpoints else 80
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        "metadata:",
        f"  name: {name}",
        "spec:",
        f"  hosts: [{host or f'{name}.test.internal'}]",
        "  location: MESH_INTERNAL",
        "  resolution: STATIC",
        "  ports:",
        f"    - {{number: {port}, name: tcp, protocol: TCP}}",
        "  endpoints:",
    ]
    lines += [f"    - {{address: {ip}, ports: {{tcp: {p}}}}}" for ip, p in endpoints]
    return "\n".join(lines) + "\n"


def registry(base: Path, *paths: str) -> FilesRegistry:
    config = FilesConfig(kind="files", name="test", paths=list(paths))
    return FilesRegistry(config, AdapterContext(base_dir=base))


class FilesHarness:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "serviceentries"
        self.dir.mkdir()

    def registry(self) -> FilesRegistry:
        return registry(self.base, "serviceentries/")

    async def put(self, service: str, endpoints: list[tuple[str, int]]) -> Hostname:
        (self.dir / f"{service}.yaml").write_text(service_entry(service, endpoints))
        return Hostname(f"{service}.test.internal")

    async def remove(self, service: str) -> None:
        (self.dir / f"{service}.yaml").unlink()

    async def put_broken(self, service: str) -> None:
        (self.dir / f"{service}.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: [\n")


class TestFilesContract(AdapterContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> FilesHarness:
        return FilesHarness(tmp_path)


def addresses(index: Index, host: str) -> set[str] | None:
    svc = index.snapshot.services.get(Hostname(host))
    return None if svc is None else {ep.address for ep in svc.endpoints}


def problems(index: Index) -> tuple[Problem, ...]:
    return index.snapshot.shards[SOURCE].problems


@contextlib.asynccontextmanager
async def running(reg: FilesRegistry) -> AsyncIterator[Index]:
    index = Index()
    task = asyncio.create_task(reg.run(index.writer(SOURCE)))
    try:
        await eventually(lambda: index.snapshot.ready, what="first sync")
        yield index
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[Path, Index]]:
    """A running registry over `<tmp>/se/`, holding `a.yaml` (host a.test.internal, 10.0.0.1)."""
    directory = tmp_path / "se"
    directory.mkdir()
    (directory / "a.yaml").write_text(service_entry("a", [("10.0.0.1", 80)]))
    async with running(registry(tmp_path, "se")) as index:
        assert addresses(index, "a.test.internal") == {"10.0.0.1"}
        yield directory, index


async def test_create_lands_within_a_second(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    (directory / "b.yaml").write_text(service_entry("b", [("10.0.1.1", 80)]))
    await eventually(lambda: addresses(index, "b.test.internal") == {"10.0.1.1"}, LANDS_WITHIN, what="create")


async def test_modify_lands_within_a_second(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    (directory / "a.yaml").write_text(service_entry("a", [("10.0.0.1", 80), ("10.0.0.2", 80)]))
    want = {"10.0.0.1", "10.0.0.2"}
    await eventually(lambda: addresses(index, "a.test.internal") == want, LANDS_WITHIN, what="modify")


async def test_delete_lands_within_a_second(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    (directory / "a.yaml").unlink()
    await eventually(lambda: addresses(index, "a.test.internal") is None, LANDS_WITHIN, what="delete")


async def test_emptying_a_file_removes_its_services_within_a_second(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    (directory / "a.yaml").write_text("")
    await eventually(lambda: addresses(index, "a.test.internal") is None, LANDS_WITHIN, what="emptied")


async def test_rename_out_of_and_back_into_the_watched_names(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    os.rename(directory / "a.yaml", directory / "a.yaml.disabled")
    await eventually(lambda: addresses(index, "a.test.internal") is None, LANDS_WITHIN, what="renamed away")
    os.rename(directory / "a.yaml.disabled", directory / "renamed.yml")
    await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.1"}, LANDS_WITHIN, what="renamed back")


async def test_atomic_replace_lands_within_a_second(watched: tuple[Path, Index]) -> None:
    """Editors and config tools write a temporary file and rename it over the original."""
    directory, index = watched
    temp = directory / ".a.yaml.tmp"
    temp.write_text(service_entry("a", [("10.0.0.9", 80)]))
    os.replace(temp, directory / "a.yaml")
    await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.9"}, LANDS_WITHIN, what="replace")


async def test_file_in_a_new_subdirectory_lands(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    sub = directory / "team" / "payments"
    sub.mkdir(parents=True)
    (sub / "c.yaml").write_text(service_entry("c", [("10.0.2.1", 80)]))
    await eventually(lambda: addresses(index, "c.test.internal") == {"10.0.2.1"}, LANDS_WITHIN, what="subdir")


async def test_editor_temp_and_hidden_files_are_ignored(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    for name in (".a.yaml.swp", "a.yaml~", "#a.yaml#", "notes.txt", ".hidden.yaml"):
        (directory / name).write_text(service_entry("ignored", [("10.9.9.9", 80)]))
    (directory / "z.yaml").write_text(service_entry("z", [("10.0.3.1", 80)]))
    await eventually(lambda: addresses(index, "z.test.internal") == {"10.0.3.1"}, LANDS_WITHIN, what="z")
    assert addresses(index, "ignored.test.internal") is None
    assert not problems(index)


async def test_broken_file_keeps_last_good_content_until_fixed(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    path = directory / "a.yaml"
    path.write_text(service_entry("a", [("10.0.0.1", 80)]).replace("protocol: TCP", "protocol: SMTP"))
    found = await eventually(lambda: problems(index), LANDS_WITHIN, what="problem reported")
    assert [(p.where, p.field) for p in found] == [(f"{path}:10", "spec.ports[0].protocol")]
    assert "unsupported protocol 'SMTP'" in found[0].message
    assert addresses(index, "a.test.internal") == {"10.0.0.1"}  # the last good content

    path.write_text("kind: ServiceEntry\napiVersion: networking.istio.io/v1\nspec: {hosts: [a.test.internal\n")
    await eventually(lambda: problems(index) and "invalid YAML" in problems(index)[0].message, LANDS_WITHIN)
    assert problems(index)[0].where.startswith(f"{path}:")
    assert addresses(index, "a.test.internal") == {"10.0.0.1"}

    path.write_text(service_entry("a", [("10.0.0.5", 80)]))
    await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.5"}, LANDS_WITHIN, what="fixed")
    await eventually(lambda: not problems(index), LANDS_WITHIN, what="problems cleared")


async def test_deleting_a_broken_file_clears_its_problems(watched: tuple[Path, Index]) -> None:
    directory, index = watched
    (directory / "broken.yaml").write_text("kind: [\n")
    await eventually(lambda: problems(index), LANDS_WITHIN, what="problem reported")
    (directory / "broken.yaml").unlink()
    await eventually(lambda: not problems(index), LANDS_WITHIN, what="problems cleared")
    assert addresses(index, "a.test.internal") == {"10.0.0.1"}


async def test_missing_directory_is_reported_and_picked_up_when_created(tmp_path: Path) -> None:
    async with running(registry(tmp_path, "later/")) as index:
        [problem] = problems(index)
        assert problem.where == str(tmp_path / "later")
        assert "does not exist" in problem.message
        (tmp_path / "later").mkdir()
        (tmp_path / "later" / "a.yaml").write_text(service_entry("a", [("10.0.0.1", 80)]))
        await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.1"}, LANDS_WITHIN, what="appeared")
        await eventually(lambda: not problems(index), LANDS_WITHIN, what="problem cleared")
        # Now watched recursively like any configured directory.
        (tmp_path / "later" / "b.yaml").write_text(service_entry("b", [("10.0.0.2", 80)]))
        await eventually(lambda: addresses(index, "b.test.internal") == {"10.0.0.2"}, LANDS_WITHIN, what="b")


async def test_other_files_beside_a_missing_path_cause_no_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent of a missing path is watched flat; only the path leading to the root concerns us.
    named: list[set[str]] = []
    refresh = FileSet.refresh

    def recording(self: FileSet, paths: Collection[str] = ()) -> Refreshed:
        named.append(set(paths))
        return refresh(self, paths)

    monkeypatch.setattr(FileSet, "refresh", recording)
    async with running(registry(tmp_path, "later/")) as index:
        for i in range(5):
            (tmp_path / "daemon.log").write_text("x" * i)
        (tmp_path / "later").mkdir()
        (tmp_path / "later" / "a.yaml").write_text(service_entry("a", [("10.0.0.1", 80)]))
        await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.1"}, LANDS_WITHIN, what="appeared")
    assert str(tmp_path / "later") in set().union(*named)
    assert not any(str(tmp_path / "daemon.log") in paths for paths in named)


async def test_configured_file_is_followed_through_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(service_entry("a", [("10.0.0.1", 80)]))
    (tmp_path / "other.yaml").write_text(service_entry("other", [("10.0.0.7", 80)]))
    async with running(registry(tmp_path, "mesh.yaml")) as index:
        assert addresses(index, "a.test.internal") == {"10.0.0.1"}
        assert addresses(index, "other.test.internal") is None  # only the configured file
        for ip in ("10.0.0.2", "10.0.0.3"):
            temp = tmp_path / "mesh.yaml.new"
            temp.write_text(service_entry("a", [(ip, 80)]))
            os.replace(temp, path)
            await eventually(lambda ip=ip: addresses(index, "a.test.internal") == {ip}, LANDS_WITHIN, what=ip)


async def test_configmap_symlink_swap_lands(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as `x.yaml -> ..data/x.yaml`, `..data -> ..<timestamp>/`, swapped atomically."""
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(version: str, ip: str) -> None:
        (mount / version).mkdir()
        (mount / version / "mesh.yaml").write_text(service_entry("a", [(ip, 80)]))
        os.symlink(version, mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("..v1", "10.0.0.1")
    os.symlink("..data/mesh.yaml", mount / "mesh.yaml")
    async with running(registry(tmp_path, "mount")) as index:
        assert addresses(index, "a.test.internal") == {"10.0.0.1"}
        publish("..v2", "10.0.0.2")
        await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.2"}, LANDS_WITHIN, what="swap")
    # The file itself configured: its directory is watched flat, and the `..data` hop must get through.
    async with running(registry(tmp_path, "mount/mesh.yaml")) as index:
        assert addresses(index, "a.test.internal") == {"10.0.0.2"}
        publish("..v3", "10.0.0.3")
        await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.3"}, LANDS_WITHIN, what="file swap")


async def test_watch_failure_marks_the_shard_failing_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapters.files.registry as registry_module

    real_awatch = registry_module.awatch
    failures = [OSError(28, "inotify watch limit reached")]

    def flaky_awatch(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return real_awatch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry_module, "awatch", flaky_awatch)
    directory = tmp_path / "se"
    directory.mkdir()
    (directory / "a.yaml").write_text(service_entry("a", [("10.0.0.1", 80)]))
    async with running(registry(tmp_path, "se")) as index:
        status = await eventually(lambda: index.snapshot.shards[SOURCE].stale and index.snapshot.shards[SOURCE])
        assert "inotify watch limit reached" in (status.last_error or "")
        assert addresses(index, "a.test.internal") == {"10.0.0.1"}  # content kept while failing
        await eventually(lambda: not index.snapshot.shards[SOURCE].stale, 5.0, what="recovered")
        (directory / "a.yaml").write_text(service_entry("a", [("10.0.0.2", 80)]))
        await eventually(lambda: addresses(index, "a.test.internal") == {"10.0.0.2"}, LANDS_WITHIN, what="watching")


async def test_delete_then_recreate_never_loses_the_service(watched: tuple[Path, Index]) -> None:
    """`rm` then `cp` 50 ms later, again and again (a deploy script): every published version keeps the service."""
    directory, index = watched
    host = Hostname("a.test.internal")
    lost: list[int] = []
    stop = asyncio.Event()

    async def observe() -> None:
        version = index.snapshot.version
        while not stop.is_set():
            snapshot = await index.wait(version)
            version = snapshot.version
            if host not in snapshot.services:
                lost.append(version)

    observer = asyncio.create_task(observe())
    try:
        path = directory / "a.yaml"
        for i in range(20):
            path.unlink()
            await asyncio.sleep(0.05)
            path.write_text(service_entry("a", [(f"10.0.1.{i}", 80)]))
            await eventually(lambda i=i: addresses(index, "a.test.internal") == {f"10.0.1.{i}"}, LANDS_WITHIN, what=i)
    finally:
        stop.set()
        path.write_text(service_entry("a", [("10.0.0.9", 80)]))  # wakes the observer
        await asyncio.wait_for(observer, 5)
    assert not lost, f"versions without the service: {lost}"


async def test_many_bad_files_are_summarised_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "se"
    directory.mkdir()
    for i in range(300):
        (directory / f"bad-{i:03d}.yaml").write_text(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nspec: [\n"
        )
    caplog.set_level(logging.WARNING, logger="discoveryd.adapters.files")
    async with running(registry(tmp_path, "se")) as index:
        files_with_problems = {p.where.rpartition(":")[0] for p in problems(index)}
        assert len(files_with_problems) == 300, "every file's problem is still reported"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 11, [r.getMessage() for r in warnings]
    assert warnings[-1].getMessage() == "... and 290 more problems (see /debug/registryz)"


async def test_a_watched_file_writable_by_others_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "se"
    directory.mkdir()
    path = directory / "a.yaml"
    path.write_text(service_entry("a", [("10.0.0.1", 80)]))
    path.chmod(0o666)
    caplog.set_level(logging.WARNING, logger="discoveryd.adapters.files")
    files = FileSet((directory,), "default")
    files.refresh()
    files.refresh(named={str(path)})
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [f"{path} is writable by others (mode 0666): anyone on the host can change it"]
    path.chmod(0o644)
    files.refresh()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_the_first_publication_of_many_services_keeps_the_loop_serving(tmp_path: Path) -> None:
    # 1000 ServiceEntries of 100 hosts (100k services): the files are read and translated as the registry
    # does it (in a worker thread), then the first publication replaces the shard in steps.
    from adapters.files.registry import _Publisher

    directory = tmp_path / "se"
    directory.mkdir()
    n, hosts = 1000, 100
    for f in range(10):
        docs = []
        for i in range(f * n // 10, (f + 1) * n // 10):
            names = ", ".join(f"h{i}-{k}.test.internal" for k in range(hosts))
            docs.append(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
                f"metadata: {{name: e{i}, namespace: ns{i % 20}}}\n"
                f"spec: {{hosts: [{names}], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: DNS}}\n"
            )
        (directory / f"f{f}.yaml").write_text("---\n".join(docs))
    index = Index([SOURCE])
    files = FileSet((directory,), "default")
    files.refresh()
    publisher = _Publisher(index.writer(SOURCE), files)
    async with watching_the_loop(index) as watch:
        await publisher.publish()
    assert watch.longest < 0.1, f"the loop was held for {watch.longest * 1000:.0f} ms of CPU"
    assert len(watch.gaps) > 20, "the publication never yielded to the loop"
    assert [len(s.services) for s in watch.seen] == [0, n * hosts]
    assert watch.seen[1].version == watch.seen[0].version + 1
