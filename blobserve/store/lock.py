"""
L{StoreLock}: one process at a time works on a store, a running blobserve or
C{blobserve-fsck}, so that neither changes files or rows the other relies on.

The lock is an exclusive C{flock} on C{ROOT/lock}, a file that stays. The
kernel releases it when its holder closes it or ends, however it ends
(C{kill -9} included), so a lock is never left stale. It belongs to the open
file, not to the process: a daemon that forks after taking it keeps it, and a
second L{StoreLock.acquire} in the same process is refused like any other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from blobserve.store.layout import lock_path


class StoreLocked(Exception):
    """
    Another process holds the store's lock.
    """

    def __init__(self, root: str, holder: str | None) -> None:
        self.root = root
        self.holder = holder
        super().__init__(
            f"the store {root} is in use by {holder or 'another process'}:"
            " only one blobserve or blobserve-fsck may use a store at a time"
        )


class StoreLock:
    """
    The lock of one store, held from L{acquire} until L{release} or the end
    of the process.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: str, holder: str) -> StoreLock:
        """
        Take the lock of the store at C{root}, without waiting, and record
        C{holder} (a program's name) in it for whoever is refused.

        @raise StoreLocked: if another holder has it.
        @raise OSError: if the lock file cannot be opened.
        """
        path = lock_path(root)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            writable = True
        except PermissionError:
            # Created by another user (an fsck run as root): locking needs
            # only a read handle; the holder's name goes unrecorded.
            fd = os.open(path, os.O_RDONLY)
            writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _holder(fd)
            os.close(fd)
            raise StoreLocked(root, other) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            # Who holds it is a courtesy for the refused: never worth failing.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode("utf-8") + b"\n", 0)
        return cls(fd)

    @property
    def held(self) -> bool:
        """
        Whether this lock is still held (not yet released).
        """
        return self._fd is not None

    def release(self) -> None:
        """
        Let the store go. Releasing twice is harmless.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _holder(fd: int) -> str | None:
    """
    The name the holder of the lock on C{fd} recorded, if it can be read.
    """
    try:
        recorded = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return None
    return recorded if recorded and recorded.isprintable() else None
