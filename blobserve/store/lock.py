"""
L{StoreLock}: one process at a time works on a store, a running blobserve or
C{blobserve-fsck}, so that neither changes files or rows the other relies on.

The lock is an exclusive C{flock} on the store's directory itself: taking it
needs no file to be created, so a store on a file system without a free
inode can still be locked. The kernel releases it when its holder closes it
or ends, however it ends (C{kill -9} included), so a lock is never left
stale. It belongs to the open directory, not to the process: a daemon that
forks after taking it keeps it, and a second L{StoreLock.acquire} in the
same process is refused like any other. Its holder writes its name in
C{ROOT/lock} for whoever is refused, where it can.
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
        Take the lock of the store at C{root}, without waiting, and say that
        C{holder} (a program's name) has it.

        @raise StoreLocked: if another holder has it.
        @raise OSError: if the directory cannot be opened.
        """
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(root, _holder(root)) from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it is a courtesy for the refused: never worth failing
        # for (a full file system, a file another user made).
        with contextlib.suppress(OSError):
            label = os.open(lock_path(root), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(label, holder.encode("utf-8") + b"\n")
            finally:
                os.close(label)
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


def _holder(root: str) -> str | None:
    """
    The name the holder of the store's lock wrote, if it can be read.
    """
    try:
        with open(lock_path(root), encoding="utf-8", errors="replace") as f:
            recorded = f.read(256).strip()
    except OSError:
        return None
    return recorded if recorded and recorded.isprintable() else None
