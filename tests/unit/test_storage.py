"""
The directory store: temporaries, atomic commits, lookups.
"""

from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.storage import DirectoryBlobStore, IBlobStore

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
