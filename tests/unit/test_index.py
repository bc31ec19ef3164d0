"""
The store's SQLite index: what survives a restart, what a crash leaves
behind, and how a missing, damaged or old-layout index is rebuilt.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from blobserve.digest import Digest
from blobserve.store import index as index_module
from blobserve.store.database import ImmediateDatabase, ThreadedDatabase
from blobserve.store.index import SCHEMA_VERSION, Origin, PartialEntry, StoreIndex
from blobserve.store.layout import blob_path, index_path

from fakes import HeldDatabase, commit_blob, result_of, store_at

DATA = b"a layer" * 1000
DIGEST = Digest.of(DATA)
MANIFEST = b'{"schemaVersion": 2}'
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def reopened(root: Path, clock: Clock | None = None) -> StoreIndex:
    """
    The index of the store at C{root} as a new process would load it.
    """
    index = StoreIndex(
        str(root), ImmediateDatabase(index_path(str(root))), clock or Clock()
    )
    result_of(index.load())
    return index


def rows(root: Path, query: str = "SELECT digest, state FROM blobs") -> list[Any]:
    connection = sqlite3.connect(index_path(str(root)))
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def test_a_new_store_has_an_empty_index_of_the_current_version(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    assert store.index.ready
    assert len(store.index) == 0
    assert rows(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(tmp_path, "PRAGMA journal_mode") == [("wal",)]


def test_committed_blobs_are_known_after_a_restart_without_a_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(tmp_path)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST, MANIFEST_TYPE)

    def no_walk(root: str) -> Any:
        raise AssertionError("an intact index walked the store")

    monkeypatch.setattr(index_module, "_blob_files", no_walk)
    index = reopened(tmp_path)
    entry = index.get(DIGEST)
    assert entry is not None
    assert entry.size == len(DATA)
    manifest = index.get(Digest.of(MANIFEST))
    assert manifest is not None
    assert manifest.media_type == MANIFEST_TYPE
    assert index.size == len(DATA) + len(MANIFEST)


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[:100]),
        lambda path: path.write_bytes(b"not a database at all" * 100),
        lambda path: path.unlink(),
    ],
    ids=["truncated", "garbage", "missing"],
)
def test_a_damaged_or_missing_index_is_rebuilt_from_the_files(
    tmp_path: Path, damage: Any
) -> None:
    store = store_at(tmp_path)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST, MANIFEST_TYPE)
    result_of(store.index.close())
    for suffix in ("-wal", "-shm"):
        Path(index_path(str(tmp_path)) + suffix).unlink(missing_ok=True)
    damage(Path(index_path(str(tmp_path))))
    index = StoreIndex(
        str(tmp_path), ImmediateDatabase(index_path(str(tmp_path))), Clock()
    )
    report = result_of(index.load())
    assert report.rebuilt_because is not None
    assert report.blobs == 2
    entry = index.get(DIGEST)
    assert entry is not None
    assert entry.size == len(DATA)
    assert sorted(rows(tmp_path)) == sorted(
        [(str(DIGEST), "present"), (str(Digest.of(MANIFEST)), "present")]
    )


def test_an_index_of_a_newer_blobserve_is_rebuilt(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    commit_blob(store, DATA)
    result_of(store.index.close())
    connection = sqlite3.connect(index_path(str(tmp_path)))
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    index = StoreIndex(
        str(tmp_path), ImmediateDatabase(index_path(str(tmp_path))), Clock()
    )
    report = result_of(index.load())
    assert report.rebuilt_because is not None
    assert "newer" in report.rebuilt_because
    assert index.get(DIGEST) is not None


def test_a_store_of_the_earlier_layout_is_migrated_once(tmp_path: Path) -> None:
    # The layout before the index: blobs, and a JSON record beside each.
    for data, media_type in ((DATA, None), (MANIFEST, MANIFEST_TYPE)):
        digest = Digest.of(data)
        path = Path(blob_path(str(tmp_path), digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record = tmp_path / "records" / "sha256" / digest.hex[:2] / digest.hex
        record.parent.mkdir(parents=True, exist_ok=True)
        content: dict[str, Any] = {"size": len(data)}
        if media_type:
            content["media_type"] = media_type
        record.write_text(json.dumps(content))
    # One whose record says another size is damaged: it is not taken over.
    damaged = Digest.of(b"damaged")
    path = Path(blob_path(str(tmp_path), damaged))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"damage")
    record = tmp_path / "records" / "sha256" / damaged.hex[:2] / damaged.hex
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"size": 7}))

    store = store_at(tmp_path)
    manifest = store.index.get(Digest.of(MANIFEST))
    assert manifest is not None
    assert manifest.media_type == MANIFEST_TYPE
    assert store.media_type(Digest.of(MANIFEST)) == MANIFEST_TYPE
    assert store.index.get(DIGEST) is not None
    assert store.index.get(damaged) is None
    assert not path.exists()
    assert not (tmp_path / "records").exists()


def test_a_crash_between_the_row_and_the_rename_leaves_no_blob(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    # The row says committing, and the rename never happened.
    result_of(store.index.begin_commit(DIGEST, len(DATA), None))
    index = reopened(tmp_path)
    assert index.get(DIGEST) is None
    assert rows(tmp_path) == []


def test_a_crash_after_the_rename_keeps_the_blob(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    result_of(store.index.begin_commit(DIGEST, len(DATA), None))
    path = Path(store.path_for(DIGEST))
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)
    index = reopened(tmp_path)
    assert index.get(DIGEST) is not None
    assert rows(tmp_path) == [(str(DIGEST), "present")]


def test_a_crash_during_a_removal_finishes_it(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    path = commit_blob(store, DATA)
    # The row says the file is to go, and the process ended there.
    result_of(store.index.begin_removal([DIGEST]))
    assert path.exists()
    index = reopened(tmp_path)
    assert index.get(DIGEST) is None
    assert not path.exists()
    assert rows(tmp_path) == []


def test_accesses_are_written_in_batches_and_kept_in_lru_order(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock=clock)
    other = Digest.of(MANIFEST)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST, MANIFEST_TYPE)
    assert list(store.index.least_recently_used()) == [DIGEST, other]
    clock.advance(100)
    reader = store.open(DIGEST)
    assert reader is not None
    reader.close()
    assert list(store.index.least_recently_used()) == [other, DIGEST]
    # Not written yet: a hit does not wait for the database.
    query = "SELECT last_access, access_count FROM blobs WHERE digest = ?"
    query = query.replace("?", f"'{DIGEST}'")
    assert rows(tmp_path, query) == [(0.0, 0)]
    store.index.saw("docker.io", "library/busybox", DIGEST)
    clock.advance(index_module.FLUSH_INTERVAL)
    assert rows(tmp_path, query) == [(100.0, 1)]
    assert rows(tmp_path, "SELECT * FROM repositories") == [
        ("docker.io", "library/busybox", str(DIGEST))
    ]
    # And the order survives a restart.
    assert list(reopened(tmp_path).least_recently_used()) == [other, DIGEST]


@pytest_twisted.ensureDeferred
async def test_the_database_works_on_a_thread_of_its_own(tmp_path: Path) -> None:
    database = ThreadedDatabase(str(tmp_path / "x.sqlite"), reactor)  # type: ignore[arg-type]
    database.start()
    try:
        name = await database.run(lambda _: threading.current_thread().name)
        assert name != threading.current_thread().name
        assert "blobserve-index" in name
    finally:
        await database.close()


def test_commits_and_removals_while_the_index_loads_stand(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST)
    result_of(store.index.close())
    database = HeldDatabase(index_path(str(tmp_path)))
    index = StoreIndex(str(tmp_path), database, Clock())
    loading = index.load()
    assert not index.ready
    fresh = Digest.of(b"fresh")
    index.add(fresh, 5, None)
    index.begin_removal([Digest.of(MANIFEST)])
    database.release()
    assert result_of(loading).blobs == 2
    assert index.get(fresh) is not None
    assert index.get(Digest.of(MANIFEST)) is None
    assert index.get(DIGEST) is not None
    assert index.size == len(DATA) + 5


def test_settings_are_kept_in_the_index(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    result_of(store.index.record_settings({"max_size": "1024", "min_free": ""}))
    result_of(store.index.record_settings({"max_size": "2048"}))
    assert sorted(rows(tmp_path, "SELECT key, value FROM settings")) == [
        ("max_size", "2048"),
        ("min_free", ""),
    ]


def store_of_version(root: Path, version: int) -> None:
    """
    Make at C{root} a store of one blob whose index is of schema
    C{version} and records repository C{library/x} of C{docker.io} for it.
    """
    connection = sqlite3.connect(index_path(str(root)))
    for step in range(version):
        for statement in index_module.MIGRATIONS[step]:
            connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {version:d}")
    connection.execute(
        "INSERT INTO blobs VALUES (?, ?, NULL, 1.0, 2.0, 3, 'present')",
        (str(DIGEST), len(DATA)),
    )
    connection.execute(
        "INSERT INTO repositories VALUES ('docker.io', 'library/x', ?)",
        (str(DIGEST),),
    )
    connection.commit()
    connection.close()
    path = Path(blob_path(str(root), DIGEST))
    path.parent.mkdir(parents=True)
    path.write_bytes(DATA)


def test_an_index_of_version_1_is_migrated_keeping_its_blobs(
    tmp_path: Path,
) -> None:
    store_of_version(tmp_path, 1)

    index = reopened(tmp_path)
    assert rows(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    entry = index.get(DIGEST)
    assert entry is not None
    assert (entry.size, entry.last_access, entry.access_count) == (len(DATA), 2.0, 3)
    # Rows of version 2 and before were written unconfirmed (see below).
    assert rows(tmp_path, "SELECT * FROM repositories") == []
    assert rows(tmp_path, "SELECT * FROM partials") == []
    assert index.partials() == {}


def test_unfinished_downloads_are_known_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock=clock)
    origin = Origin("docker.io", "library/x", len(DATA), '"etag"')
    result_of(store.index.add_partial(DIGEST, "sha256-x.1", origin))
    clock.advance(10)
    result_of(store.index.update_partial(DIGEST, "sha256-x.1", 100))
    # Another file's record changes nothing.
    result_of(store.index.update_partial(DIGEST, "sha256-x.2", 200))
    result_of(store.index.remove_partial(DIGEST, "sha256-x.2"))

    entry = reopened(tmp_path).partial(DIGEST)
    assert entry == PartialEntry("sha256-x.1", origin, 0.0, 10.0, 100)
    result_of(store.index.remove_partial(DIGEST, "sha256-x.1"))
    assert reopened(tmp_path).partials() == {}


def test_unfinished_downloads_recorded_while_the_index_loads_stand(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    old = Origin("docker.io", "old", None)
    result_of(store.index.add_partial(DIGEST, "old", old))
    result_of(store.index.add_partial(Digest.of(MANIFEST), "gone", old))
    result_of(store.index.close())
    database = HeldDatabase(index_path(str(tmp_path)))
    index = StoreIndex(str(tmp_path), database, Clock())
    loading = index.load()
    new = Origin("docker.io", "new", None)
    index.add_partial(DIGEST, "new", new)
    index.remove_partial(Digest.of(MANIFEST), "gone")
    database.release()
    result_of(loading)
    entry = index.partial(DIGEST)
    assert entry is not None
    assert (entry.name, entry.origin) == ("new", new)
    assert index.partial(Digest.of(MANIFEST)) is None


def test_migrating_to_version_3_forgets_the_unconfirmed_repositories(
    tmp_path: Path,
) -> None:
    """
    Before version 3, every request a blob was served for recorded its
    repository, whether the upstream had said it holds the blob or not:
    none of those rows may let a blob be served under their repository.
    """
    store_of_version(tmp_path, 2)

    index = reopened(tmp_path)
    assert rows(tmp_path, "PRAGMA user_version") == [(3,)]
    assert index.get(DIGEST) is not None
    assert not index.holds("docker.io", "library/x", DIGEST)
    assert rows(tmp_path, "SELECT * FROM repositories") == []


def test_the_repositories_of_a_blob_are_known_again_after_a_restart(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock=clock)
    commit_blob(store, DATA)
    store.saw("docker.io", "library/x", DIGEST)
    store.saw("ghcr.io", "library/x", DIGEST)
    assert store.holds("docker.io", "library/x", DIGEST)
    assert not store.holds("docker.io", "library/y", DIGEST)
    assert not store.holds("quay.io", "library/x", DIGEST)
    result_of(store.index.close())

    index = reopened(tmp_path)
    assert index.holds("docker.io", "library/x", DIGEST)
    assert index.holds("ghcr.io", "library/x", DIGEST)
    assert not index.holds("docker.io", "library/y", DIGEST)


def test_a_blob_removed_takes_its_repositories_with_it(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock=clock)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST)
    other = Digest.of(MANIFEST)
    store.saw("docker.io", "library/x", DIGEST)
    store.saw("docker.io", "library/x", other)
    # Written already, and one waiting for the next batch: both go.
    clock.advance(index_module.FLUSH_INTERVAL)
    store.saw("docker.io", "library/y", DIGEST)
    result_of(store.remove([DIGEST]))
    assert not store.holds("docker.io", "library/x", DIGEST)
    assert not store.holds("docker.io", "library/y", DIGEST)
    result_of(store.index.close())
    assert rows(tmp_path, "SELECT repository, digest FROM repositories") == [
        ("library/x", str(other))
    ]
    index = reopened(tmp_path)
    assert not index.holds("docker.io", "library/x", DIGEST)
    assert index.holds("docker.io", "library/x", other)


def test_repositories_of_blobs_never_stored_are_forgotten_at_start(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    never = Digest.of(b"a download that was answered but never committed")
    store.saw("docker.io", "library/x", never)
    result_of(store.index.close())
    assert rows(tmp_path, "SELECT digest FROM repositories") == [(str(never),)]
    index = reopened(tmp_path)
    assert not index.holds("docker.io", "library/x", never)
    assert rows(tmp_path, "SELECT digest FROM repositories") == []


def test_repositories_seen_while_the_index_loads_stand(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    commit_blob(store, DATA)
    commit_blob(store, MANIFEST)
    store.saw("docker.io", "library/old", DIGEST)
    store.saw("docker.io", "library/old", Digest.of(MANIFEST))
    result_of(store.index.close())
    database = HeldDatabase(index_path(str(tmp_path)))
    index = StoreIndex(str(tmp_path), database, Clock())
    loading = index.load()
    index.saw("docker.io", "library/new", DIGEST)
    index.begin_removal([Digest.of(MANIFEST)])
    database.release()
    result_of(loading)
    assert index.holds("docker.io", "library/new", DIGEST)
    assert index.holds("docker.io", "library/old", DIGEST)
    assert not index.holds("docker.io", "library/old", Digest.of(MANIFEST))
