"""
The directory store: temporaries, atomic commits, lookups.
"""

import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.store.database import ImmediateDatabase
from blobserve.store.files import DirectoryBlobStore, IBlobStore, TemporaryCleanup
from blobserve.store.index import Origin, StoreIndex
from blobserve.store.layout import index_path

from fakes import (
    HeldDatabase,
    commit_blob,
    failure_of,
    open_descriptors,
    result_of,
    run_now,
    store_at,
)

DATA = b"a layer" * 1000
DIGEST = Digest.of(DATA)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryBlobStore:
    return store_at(str(tmp_path))


def test_provides_interface(store: DirectoryBlobStore) -> None:
    assert verifyObject(IBlobStore, store)


def test_missing_blob_opens_as_none(store: DirectoryBlobStore) -> None:
    assert store.open(DIGEST) is None


def test_commit_makes_blob_visible_at_its_digest_path(
    store: DirectoryBlobStore, tmp_path: Path
) -> None:
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    assert store.open(DIGEST) is None
    result_of(store.commit(temporary))
    temporary.close()

    path = tmp_path / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex
    assert path.read_bytes() == DATA
    assert list((tmp_path / "tmp").iterdir()) == []
    reader = store.open(DIGEST)
    assert reader is not None
    assert reader.size() == len(DATA)
    assert reader.read(2, 5) == DATA[2:7]
    reader.close()


def test_reader_of_temporary_survives_commit_and_discard(
    store: DirectoryBlobStore, tmp_path: Path
) -> None:
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA[:10])
    reader = temporary.open_reader()
    temporary.write(DATA[10:])
    assert reader.read(0, len(DATA)) == DATA
    store.discard(temporary)
    assert reader.read(5, 5) == DATA[5:10]
    reader.close()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_closed_temporary_opens_no_reader(store: DirectoryBlobStore) -> None:
    temporary = store.create_temporary(DIGEST)
    store.discard(temporary)
    with pytest.raises(ValueError):
        temporary.open_reader()


def test_failed_commit_removes_temporary(
    store: DirectoryBlobStore, tmp_path: Path
) -> None:
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    # A file where the blob's directory should be: the rename cannot work.
    blocked = tmp_path / "blobs" / "sha256" / DIGEST.hex[:2]
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"")
    failure_of(store.commit(temporary)).trap(OSError)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.open(DIGEST) is None


def test_stale_temporaries_are_removed(
    store: DirectoryBlobStore, tmp_path: Path
) -> None:
    store.create_temporary(DIGEST).close()
    store.create_temporary(DIGEST).close()
    assert store.remove_stale_temporaries(3600).unrecorded == 2
    assert list((tmp_path / "tmp").iterdir()) == []


def test_media_type_is_committed_with_the_blob(store: DirectoryBlobStore) -> None:
    assert store.media_type(DIGEST) is None
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    result_of(store.commit(temporary, "application/vnd.oci.image.index.v1+json"))
    temporary.close()
    assert store.media_type(DIGEST) == "application/vnd.oci.image.index.v1+json"


def test_blob_of_the_wrong_size_is_removed_as_damaged(
    store: DirectoryBlobStore,
) -> None:
    path = commit_blob(store, DATA)
    path.write_bytes(DATA[:-1])
    assert store.open(DIGEST) is None
    assert not path.exists()
    # And is then missing, to be fetched again.
    assert store.open(DIGEST) is None
    path = commit_blob(store, DATA)
    reader = store.open(DIGEST)
    assert reader is not None
    reader.close()


def test_blob_gone_from_disk_is_a_miss_and_forgotten(
    store: DirectoryBlobStore,
) -> None:
    path = commit_blob(store, DATA)
    path.unlink()
    before = open_descriptors(store.root)
    assert store.open(DIGEST) is None
    assert open_descriptors(store.root) == before
    assert store.index.get(DIGEST) is None
    assert index_rows(store) == []


def test_index_that_is_not_loaded_yet_serves_from_the_files(
    tmp_path: Path,
) -> None:
    commit_blob(store_at(tmp_path), DATA)
    index = StoreIndex(
        str(tmp_path), ImmediateDatabase(index_path(str(tmp_path))), Clock()
    )
    loading = DirectoryBlobStore(str(tmp_path), index, run_now)
    assert not index.ready
    reader = loading.open(DIGEST)
    assert reader is not None
    assert reader.read(0, len(DATA)) == DATA
    reader.close()
    assert loading.open(Digest.of(b"other")) is None


def index_rows(store: DirectoryBlobStore) -> list[tuple[str, str]]:
    connection = sqlite3.connect(index_path(store.root))
    try:
        return connection.execute("SELECT digest, state FROM blobs").fetchall()
    finally:
        connection.close()


def test_failed_directory_sync_after_the_rename_leaves_nothing_visible(
    tmp_path: Path,
) -> None:
    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f == DirectoryBlobStore._sync_directories:
            return fail(OSError(errno.EIO, "I/O error"))
        return run_now(f, *args)

    store = store_at(tmp_path, run_blocking)
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    failure_of(store.commit(temporary)).trap(OSError)
    # Reported not committed, and not visible either.
    assert store.open(DIGEST) is None
    assert not Path(store.path_for(DIGEST)).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.index.get(DIGEST) is None
    assert index_rows(store) == []


def test_a_temporary_is_unlinked_once_whoever_discards_it(
    store: DirectoryBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink(path: str) -> None:
        unlinked.append(path)
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    committed = store.create_temporary(DIGEST)
    committed.write(DATA)
    result_of(store.commit(committed))
    store.discard(committed)
    assert Path(store.path_for(DIGEST)).exists()
    dropped = store.create_temporary(Digest.of(b"other"))
    store.discard(dropped)
    store.discard(dropped)
    assert unlinked == [dropped.path]


def test_a_commit_of_a_blob_being_removed_waits_until_its_file_is_gone(
    tmp_path: Path,
) -> None:
    unlinks: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if getattr(f, "__name__", "") == "_unlink_all":
            d: Deferred[Any] = Deferred()
            unlinks.append((f, args, d))
            return d
        return run_now(f, *args)

    store = store_at(tmp_path, run_blocking)
    commit_blob(store, DATA)
    removed = store.remove([DIGEST])
    # Out of the index at once, its file not unlinked yet: fetched again.
    assert store.open(DIGEST) is None
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    committed = store.commit(temporary)
    assert not committed.called

    f, args, d = unlinks.pop()
    d.callback(f(*args))
    assert removed.called
    result_of(committed)
    temporary.close()
    assert Path(store.path_for(DIGEST)).read_bytes() == DATA
    assert index_rows(store) == [(str(DIGEST), "present")]
    reader = store.open(DIGEST)
    assert reader is not None
    reader.close()


def test_readers_pin_their_blob_until_they_close(store: DirectoryBlobStore) -> None:
    commit_blob(store, DATA)
    first = store.open(DIGEST)
    second = store.open(DIGEST)
    assert first is not None and second is not None
    assert DIGEST in store.pins
    first.close()
    first.close()
    assert DIGEST in store.pins
    second.close()
    assert DIGEST not in store.pins
    assert len(store.pins) == 0


ORIGIN = Origin("docker.io", "library/x", len(DATA), None)


def kept(store: DirectoryBlobStore, data: bytes) -> Path:
    """
    An unfinished download of DATA in C{store} with C{data} on disk, kept as
    a stopping download keeps it.
    """
    temporary = store.create_temporary(DIGEST, ORIGIN)
    temporary.write(data)
    store.keep_partial(temporary)
    return Path(temporary.path)


def test_an_unfinished_download_is_reopened_with_the_hash_of_its_bytes(
    tmp_path: Path,
) -> None:
    path = kept(store_at(tmp_path), DATA[:1000])
    store = store_at(tmp_path)
    partial = result_of(store.open_partial(DIGEST))
    assert partial is not None
    assert (partial.written, partial.origin) == (1000, ORIGIN)
    expected = DIGEST.hasher()
    expected.update(DATA[:1000])
    assert partial.hasher.hexdigest() == expected.hexdigest()
    # Open for appending.
    partial.temporary.write(DATA[1000:])
    assert path.read_bytes() == DATA
    result_of(store.commit(partial.temporary))
    assert store.partials() == {}
    assert store_at(tmp_path).partials() == {}


def test_an_unfinished_download_whose_file_is_gone_is_forgotten(
    tmp_path: Path,
) -> None:
    kept(store_at(tmp_path), DATA[:1000]).unlink()
    store = store_at(tmp_path)
    assert result_of(store.open_partial(DIGEST)) is None
    assert store_at(tmp_path).partials() == {}


def test_a_discarded_download_is_no_longer_recorded(store: DirectoryBlobStore) -> None:
    temporary = store.create_temporary(DIGEST, ORIGIN)
    assert DIGEST in store.partials()
    store.discard(temporary)
    assert store.partials() == {}
    assert store_at(store.root).partials() == {}


def test_stale_temporaries_go_and_young_unfinished_downloads_stay(
    tmp_path: Path,
) -> None:
    young = kept(store_at(tmp_path), DATA[:1000])
    other = Digest.of(b"other")
    earlier = store_at(tmp_path)
    old = earlier.create_temporary(other, ORIGIN)
    old.write(b"old")
    earlier.keep_partial(old)
    day_ago = time.time() - 86400
    os.utime(old.path, (day_ago, day_ago))
    gone = Digest.of(b"gone")
    earlier.keep_partial(earlier.create_temporary(gone, ORIGIN))
    (tmp_path / "tmp" / earlier.partials()[gone].name).unlink()
    stray = tmp_path / "tmp" / "sha256-stray.1234"
    stray.write_bytes(b"no record")

    store = store_at(tmp_path)
    # This run's own, still open, unrecorded: left alone.
    own = store.create_temporary(Digest.of(b"own"))
    cleanup = store.remove_stale_temporaries(3600)
    assert cleanup == TemporaryCleanup(kept=1, kept_bytes=1000, expired=1, unrecorded=1)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(
        [young.name, own.name]
    )
    assert set(store_at(tmp_path).partials()) == {DIGEST}
    assert store.partials()[DIGEST].written == 1000


def test_an_unfinished_download_is_reopened_once_the_index_has_read_it(
    tmp_path: Path,
) -> None:
    kept(store_at(tmp_path), DATA[:1000])
    database = HeldDatabase(index_path(str(tmp_path)))
    index = StoreIndex(str(tmp_path), database, Clock())
    store = DirectoryBlobStore(str(tmp_path), index, run_now)
    loading = index.load()
    # A request right after a start, before the index has read anything.
    reopened = store.open_partial(DIGEST)
    assert not reopened.called
    database.release()
    result_of(loading)
    partial = result_of(reopened)
    assert partial is not None
    assert partial.written == 1000


def test_an_unfinished_download_past_its_age_is_not_resumed(tmp_path: Path) -> None:
    path = kept(store_at(tmp_path), DATA[:1000])
    day_ago = time.time() - 86400 - 60
    os.utime(path, (day_ago, day_ago))
    store = store_at(tmp_path)
    assert result_of(store.open_partial(DIGEST)) is None
    assert not path.exists()
    assert store_at(tmp_path).partials() == {}
