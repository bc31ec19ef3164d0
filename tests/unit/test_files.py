"""
The directory store: temporaries, atomic commits, lookups.
"""

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.store.files import DirectoryBlobStore, IBlobStore

from fakes import commit_blob, failure_of, result_of, run_now

DATA = b"a layer" * 1000
DIGEST = Digest.of(DATA)


@pytest.fixture
def store(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(str(tmp_path), run_blocking=run_now)


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
    assert store.remove_stale_temporaries() == 2
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


def open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.parametrize(
    "record",
    [b"[1, 2]", b'{"size": "7000"}', b"{}", b"\xff\xfe not json", b"null", None],
)
def test_unreadable_record_is_a_miss_that_is_repaired_and_leaks_nothing(
    store: DirectoryBlobStore, tmp_path: Path, record: bytes | None
) -> None:
    path = commit_blob(store, DATA)
    record_path = tmp_path / "records" / "sha256" / DIGEST.hex[:2] / DIGEST.hex
    record_path.unlink()
    if record is None:
        record_path.mkdir()  # a record that cannot even be opened as a file
    else:
        record_path.write_bytes(record)
    before = open_descriptors()
    assert store.open(DIGEST) is None
    assert store.media_type(DIGEST) is None
    assert open_descriptors() == before
    assert not path.exists()
    # Fetched again, it is a hit.
    if record is None:
        record_path.rmdir()
    commit_blob(store, DATA)
    reader = store.open(DIGEST)
    assert reader is not None
    reader.close()


def test_failed_directory_sync_after_the_rename_leaves_nothing_visible(
    tmp_path: Path,
) -> None:
    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f == DirectoryBlobStore._sync_directories:
            return fail(OSError(errno.EIO, "I/O error"))
        return run_now(f, *args)

    store = DirectoryBlobStore(str(tmp_path), run_blocking=run_blocking)
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    failure_of(store.commit(temporary)).trap(OSError)
    # Reported not committed, and not visible either.
    assert store.open(DIGEST) is None
    assert not Path(store.path_for(DIGEST)).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "records").rglob("*" + DIGEST.hex)) == []


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
