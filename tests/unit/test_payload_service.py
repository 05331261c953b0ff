"""PayloadService: deterministic archives, cache hits and misses, versions, cleanup, corruption."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from cronium_nb.model import Event
from cronium_nb.payload import PayloadService, build_archive
from cronium_nb.store import Store


@pytest.fixture
def service(tmp_path: Path):
    store = Store(tmp_path)
    yield PayloadService(store, tmp_path, keep_versions=2, retention_s=3600)
    store.close()


def test_same_event_gives_byte_identical_archives(tmp_path: Path) -> None:
    event = Event(name="hello", script="echo hi\n", type="bash", timeout=30, env={"A": "1"})
    first = build_archive(event.manifest(), event.script)
    second = build_archive(Event(name="hello", script="echo hi\n", timeout=30, env={"A": "1"}).manifest(), "echo hi\n")
    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(first.data), mode="r:gz") as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["manifest.yaml", "script.sh"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "")}


def test_per_run_data_and_secrets_stay_out_of_the_archive() -> None:
    plain = Event(name="e", script="echo", input={"n": 1})
    other = Event(name="e", script="echo", input={"n": 2}, secrets={"TOKEN": "s3cr3t-value"})
    one, two = (build_archive(e.manifest(), e.script) for e in (plain, other))
    assert one.data == two.data
    with tarfile.open(fileobj=io.BytesIO(two.data), mode="r:gz") as archive:
        manifest = archive.extractfile("manifest.yaml").read().decode()
    assert "s3cr3t-value" not in manifest and "TOKEN" not in manifest


def test_cache_hit_miss_and_versions(service: PayloadService) -> None:
    event = Event(name="deploy", script="echo v1")
    first = service.prepare(event)
    assert (first.cache, first.version) == ("new", 1)
    again = service.prepare(Event(name="deploy", script="echo v1", input={"per": "run"}))
    assert (again.cache, again.version, again.path) == ("hit", 1, first.path)
    changed = service.prepare(Event(name="deploy", script="echo v2"))
    assert (changed.cache, changed.version) == ("new", 2)
    settings = service.prepare(Event(name="deploy", script="echo v2", timeout=10))
    assert (settings.cache, settings.version) == ("new", 3)
    rows = service.store.payloads(first.event_id)
    assert [(r.version, r.hash) for r in rows] == [(3, settings.sha256), (2, changed.sha256), (1, first.sha256)]
    assert all(Path(r.path).is_file() and r.size == Path(r.path).stat().st_size for r in rows)
    assert service.store.event_payload_version(first.event_id) == 3
    frame = service.store.payloads_frame()
    assert list(frame["version"]) == [1, 2, 3] and set(frame["event"]) == {"deploy"}


def test_corrupted_or_missing_cache_file_is_rebuilt(service: PayloadService) -> None:
    event = Event(name="fragile", script="echo ok")
    first = service.prepare(event)
    first.path.write_bytes(b"corrupted")
    rebuilt = service.prepare(event)
    assert (rebuilt.cache, rebuilt.version) == ("rebuilt", 1)
    assert hashlib.sha256(rebuilt.path.read_bytes()).hexdigest() == first.sha256 == rebuilt.sha256
    first.path.unlink()
    again = service.prepare(event)
    assert again.cache == "rebuilt" and again.data == first.data and again.path.is_file()
    assert service.prepare(event).cache == "hit"


def test_cleanup_keeps_newest_versions_and_drops_old_files(service: PayloadService, tmp_path: Path) -> None:
    paths = [service.prepare(Event(name="many", script=f"echo {n}")).path for n in range(4)]
    other = service.prepare(Event(name="single", script="echo only"))
    stray = service.directory / "999" / "v1-stray.tar.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")
    removed = service.cleanup()
    assert set(removed) == {paths[0], paths[1], stray}
    assert [r.version for r in service.store.payloads(other.event_id - 1)] == [4, 3]
    assert all(not p.exists() for p in removed) and paths[2].exists() and paths[3].exists()
    # Past the retention age only the newest version of each event stays.
    removed = service.cleanup(now=service.store.payloads()[0].created_at + 2 * 3600)
    assert removed == [paths[2]]
    assert other.path.exists() and paths[3].exists()


def test_payload_files_are_private(service: PayloadService) -> None:
    prepared = service.prepare(Event(name="private", script="echo"))
    assert prepared.path.stat().st_mode & 0o777 == 0o600
