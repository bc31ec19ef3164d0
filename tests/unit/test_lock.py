"""
The store's lock: one holder at a time, told to whoever is refused, free
again once released.
"""

from pathlib import Path

import pytest

from blobserve.store.lock import StoreLock, StoreLocked


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    lock = StoreLock.acquire(str(tmp_path), "blobserve")
    try:
        # A new open file, even in this process, is another holder.
        with pytest.raises(StoreLocked, match="in use by blobserve:") as refused:
            StoreLock.acquire(str(tmp_path), "blobserve-fsck")
        assert refused.value.holder == "blobserve"
        assert lock.held
    finally:
        lock.release()


def test_a_released_lock_is_free_again(tmp_path: Path) -> None:
    lock = StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    lock.release()
    lock.release()
    assert not lock.held
    again = StoreLock.acquire(str(tmp_path), "blobserve")
    try:
        assert (tmp_path / "lock").read_text() == "blobserve\n"
    finally:
        again.release()


def test_the_lock_needs_no_file_of_its_own(tmp_path: Path) -> None:
    # Where the holder's name cannot be written (here a directory stands in
    # the way; on a full file system there is no inode for it), the store is
    # locked all the same, by an unnamed holder.
    (tmp_path / "lock").mkdir()
    lock = StoreLock.acquire(str(tmp_path), "blobserve")
    try:
        with pytest.raises(StoreLocked, match="in use by another process"):
            StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    finally:
        lock.release()
