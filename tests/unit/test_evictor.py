"""
The store's size policy: least recently used blobs go first, down to a
low-water mark; blobs in use are pinned; a download that cannot fit is
refused; --min-free counts what downloads in flight have still to write.

What a crash between the two steps of an eviction leaves is settled at the
next start: see test_index's test_a_crash_during_a_removal_finishes_it (a row
marked for removal whose file is still there) and
test_blob_gone_from_disk_is_a_miss_and_forgotten in test_files (a file gone
whose row is still there).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from blobserve.digest import Digest
from blobserve.store import eviction as eviction_module
from blobserve.store.eviction import Evictor, StoreFull, free_space
from blobserve.store.files import BlobReader, DirectoryBlobStore
from blobserve.store.layout import index_path

from fakes import (
    LoggedEvents,
    commit_blob,
    failure_of,
    has_fired,
    result_of,
    run_now,
    store_at,
)


def blob(n: int, size: int = 100) -> bytes:
    """
    The C{n}th test blob: C{size} bytes, different from every other.
    """
    return (b"%08d" % n * (size // 8 + 1))[:size]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> DirectoryBlobStore:
    return store_at(tmp_path, clock=clock)


def stored(store: DirectoryBlobStore) -> list[bytes]:
    """
    The test blobs in the store, least recently used first.
    """
    return [
        Path(store.path_for(digest)).read_bytes()
        for digest in store.index.least_recently_used()
    ]


def read(store: DirectoryBlobStore, data: bytes) -> BlobReader:
    """
    Open the blob C{data} as a response would (and so touch it).
    """
    reader = store.open(Digest.of(data))
    assert reader is not None
    return reader


def reread(store: DirectoryBlobStore, clock: Clock, data: bytes) -> None:
    clock.advance(1)
    read(store, data).close()


def rows(store: DirectoryBlobStore) -> set[str]:
    connection = sqlite3.connect(index_path(store.root))
    try:
        return {digest for (digest,) in connection.execute("SELECT digest FROM blobs")}
    finally:
        connection.close()


def test_least_recently_used_go_first_and_a_reread_blob_survives(
    store: DirectoryBlobStore, clock: Clock
) -> None:
    Evictor(store, max_size=350)
    for n in range(3):
        clock.advance(1)
        commit_blob(store, blob(n))
    # Blob 0 came first, but is read again: blob 1 is the least recently used.
    reread(store, clock, blob(0))
    commit_blob(store, blob(3))

    assert stored(store) == [blob(2), blob(0), blob(3)]
    assert not Path(store.path_for(Digest.of(blob(1)))).exists()
    assert rows(store) == {str(Digest.of(blob(n))) for n in (0, 2, 3)}


def test_eviction_goes_down_to_the_low_water_mark(store: DirectoryBlobStore) -> None:
    evictor = Evictor(store, max_size=1000)
    for n in range(10):
        commit_blob(store, blob(n))
    # At the limit is within it.
    assert evictor.evictions == 0
    commit_blob(store, blob(10))
    # 1100 bytes: one blob out would be enough for the limit, two are out for
    # the low-water mark (950), so the next commit needs no eviction.
    assert store.index.size == 900
    assert (evictor.evictions, evictor.evicted_bytes) == (2, 200)
    assert stored(store)[0] == blob(2)
    commit_blob(store, blob(11))
    assert evictor.evictions == 2


def test_a_blob_being_read_is_never_evicted(
    store: DirectoryBlobStore, clock: Clock
) -> None:
    evictor = Evictor(store, max_size=300)
    for n in range(3):
        commit_blob(store, blob(n))
    reader = read(store, blob(0))
    reread(store, clock, blob(1))
    reread(store, clock, blob(2))
    # Blob 0 is the least recently used, and open: the next two go.
    commit_blob(store, blob(3))
    assert stored(store) == [blob(0), blob(3)]
    assert reader.read(0, 100) == blob(0)
    assert evictor.status()["pinned"] == 1

    reader.close()
    assert evictor.status()["pinned"] == 0
    commit_blob(store, blob(4))
    commit_blob(store, blob(5))
    assert stored(store) == [blob(4), blob(5)]


def test_a_blob_followed_as_it_landed_is_pinned_once_committed(
    store: DirectoryBlobStore, clock: Clock
) -> None:
    Evictor(store, max_size=300)
    data = blob(0)
    temporary = store.create_temporary(Digest.of(data))
    follower = temporary.open_reader()
    temporary.write(data)
    result_of(store.commit(temporary))
    temporary.close()
    for n in (1, 2, 3):
        clock.advance(1)
        commit_blob(store, blob(n))
    assert stored(store) == [blob(0), blob(3)]

    follower.close()
    commit_blob(store, blob(4))
    commit_blob(store, blob(5))
    assert stored(store) == [blob(4), blob(5)]


def test_a_blob_being_committed_is_not_evicted(tmp_path: Path) -> None:
    syncs: list[Deferred[None]] = []

    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f == DirectoryBlobStore._sync_directories:
            d: Deferred[None] = Deferred()
            syncs.append(d)
            return d
        return run_now(f, *args)

    store = store_at(tmp_path, run_blocking=run_blocking)
    evictor = Evictor(store, max_size=150)
    store.run_blocking = run_now
    commit_blob(store, blob(0))
    reader = read(store, blob(0))
    store.run_blocking = run_blocking
    data = blob(1)
    temporary = store.create_temporary(Digest.of(data))
    temporary.write(data)
    committing = store.commit(temporary)
    # Renamed and in the index, its directory not synced yet: over the limit,
    # and the only blob not in use is the one being committed.
    assert store.index.get(Digest.of(data)) is not None
    assert result_of(evictor.make_room()) == 0
    syncs[0].callback(None)
    result_of(committing)
    assert len(store.index) == 2
    reader.close()


def test_with_nothing_to_evict_the_store_serves_on_and_says_so_once(
    store: DirectoryBlobStore,
) -> None:
    Evictor(store, max_size=150)
    with LoggedEvents() as logged:
        commit_blob(store, blob(0))
        readers = [read(store, blob(0))]
        commit_blob(store, blob(1))
        readers.append(read(store, blob(1)))
        commit_blob(store, blob(2))
        readers.append(read(store, blob(2)))
        over = [m for m in logged.messages() if "blobs left are in use" in m]
        assert len(over) == 1, logged.messages()
        assert "over --max-size (150 bytes) by 50 bytes" in over[0]
        assert store.index.size == 300
        assert [r.read(0, 100) for r in readers] == [blob(0), blob(1), blob(2)]

        for reader in readers:
            reader.close()
        commit_blob(store, blob(3))
        assert store.index.size == 100
        assert "the store is within --max-size (150 bytes) again" in (logged.messages())
    assert logged.failures() == []


def test_a_blob_that_cannot_fit_is_refused_and_nothing_is_evicted(
    store: DirectoryBlobStore,
) -> None:
    evictor = Evictor(store, max_size=250)
    commit_blob(store, blob(0))
    commit_blob(store, blob(1))
    reader = read(store, blob(0))
    with LoggedEvents() as logged:
        too_big = failure_of(evictor.reserve(Digest.of(b"x"), 251))
        held = failure_of(evictor.reserve(Digest.of(b"y"), 200))
    assert too_big.check(StoreFull)
    assert "over --max-size (250 bytes)" in too_big.getErrorMessage()
    # Evicting blob 1 would leave 300 bytes: it is kept.
    assert held.check(StoreFull)
    assert "1 blobs in use" in held.getErrorMessage()
    assert len(store.index) == 2
    assert evictor.evictions == 0
    assert evictor.reserved == 0
    assert [m for m in logged.messages() if "not fetching" in m] == [
        f"not fetching {Digest.of(b'x')}: {too_big.getErrorMessage()}",
        f"not fetching {Digest.of(b'y')}: {held.getErrorMessage()}",
    ]
    reader.close()


def test_a_reservation_makes_room_and_counts_until_its_commit(
    store: DirectoryBlobStore,
) -> None:
    evictor = Evictor(store, max_size=300)
    for n in range(3):
        commit_blob(store, blob(n))
    landing = blob(10)
    first = result_of(evictor.reserve(Digest.of(landing), 100))
    # Made room before a byte was written: 400 bytes in all, evicted down to
    # the low-water mark (285).
    assert stored(store) == [blob(2)]
    assert evictor.reserved == 100
    second = result_of(evictor.reserve(Digest.of(blob(11)), 100))
    assert evictor.reserved == 200
    assert stored(store) == [blob(2)]
    third = failure_of(evictor.reserve(Digest.of(blob(12)), 200))
    assert third.check(StoreFull)

    # The commit turns the reservation into the blob: no eviction.
    commit_blob(store, landing)
    assert evictor.reserved == 100
    assert stored(store) == [blob(2), landing]
    first.release()
    assert evictor.reserved == 100
    second.release()
    second.release()
    assert evictor.reserved == 0
    assert evictor.evictions == 2


def test_min_free_evicts_until_a_margin_more_is_free(
    store: DirectoryBlobStore,
) -> None:
    free = [10_000]
    evictor = Evictor(store, min_free=1000, free=lambda: free[0])
    for n in range(6):
        commit_blob(store, blob(n, 30))
    assert evictor.evictions == 0
    free[0] = 960
    commit_blob(store, blob(6, 30))
    # 40 bytes short, and 5 % of --min-free (50) more: three blobs of 30.
    assert evictor.evictions == 3
    assert stored(store)[0] == blob(3, 30)
    refused = failure_of(evictor.reserve(Digest.of(b"x"), 2000))
    assert refused.check(StoreFull)
    assert "--min-free (1000 bytes)" in refused.getErrorMessage()


def test_min_free_counts_only_the_bytes_a_download_has_still_to_write(
    store: DirectoryBlobStore,
) -> None:
    free = [1600]
    evictor = Evictor(store, min_free=1000, free=lambda: free[0])
    for n in range(3):
        commit_blob(store, blob(n))
    reservation = result_of(evictor.reserve(Digest.of(b"x"), 500))
    assert evictor.evictions == 0
    written = [400]
    reservation.follow(lambda: written[0])
    # 400 bytes landed, and took free space: 100 are still to come.
    free[0] = 1200
    commit_blob(store, blob(3))
    assert evictor.evictions == 0
    reservation.release()


def test_an_index_not_loaded_yet_evicts_nothing_and_grants_room(
    tmp_path: Path,
) -> None:
    store = store_at(tmp_path)
    commit_blob(store, blob(0))
    commit_blob(store, blob(1))
    store.index.ready = False
    evictor = Evictor(store, max_size=100)
    assert has_fired(evictor.reserve(Digest.of(b"x"), 100))
    assert result_of(evictor.make_room()) == 0
    assert len(store.index) == 2


def test_status_says_size_limits_use_and_evictions(
    store: DirectoryBlobStore, tmp_path: Path
) -> None:
    evictor = Evictor(store, max_size=250, min_free=1)
    for n in range(3):
        commit_blob(store, blob(n))
    reader = read(store, blob(2))
    result_of(evictor.reserve(Digest.of(b"x"), 50))
    status = evictor.status()
    free = status.pop("free")
    assert isinstance(free, int)
    assert abs(free - free_space(str(tmp_path))) < 1024 * 1024
    assert status == {
        "size": 200,
        "max_size": 250,
        "min_free": 1,
        "blobs": 2,
        "pinned": 1,
        "reserved": 50,
        "evictions": 1,
        "evicted_bytes": 100,
    }
    reader.close()


def test_the_low_water_mark_is_a_share_of_the_limit(
    store: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eviction_module, "LOW_WATER", 0.5)
    Evictor(store, max_size=400)
    for n in range(5):
        commit_blob(store, blob(n))
    assert store.index.size == 200
