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


def test_a_released_lock_is_free_and_the_file_stays(tmp_path: Path) -> None:
    lock = StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    lock.release()
    lock.release()
    assert not lock.held
    assert (tmp_path / "lock").exists()
    again = StoreLock.acquire(str(tmp_path), "blobserve")
    try:
        assert (tmp_path / "lock").read_text() == "blobserve\n"
    finally:
        again.release()


def test_a_holder_that_recorded_nothing_is_another_process(tmp_path: Path) -> None:
    lock = StoreLock.acquire(str(tmp_path), "blobserve")
    (tmp_path / "lock").write_bytes(b"")
    try:
        with pytest.raises(StoreLocked, match="in use by another process"):
            StoreLock.acquire(str(tmp_path), "blobserve-fsck")
    finally:
        lock.release()
