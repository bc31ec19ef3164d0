"""
The content-addressed blob store on a local file system.

Committed blobs live at C{ROOT/blobs/<algorithm>/<first two hex>/<hex>}, with
a record of their size (and media type, for manifests) at the same place
under C{ROOT/records/};
downloads in progress are written to C{ROOT/tmp/}, on the same file system, so
that a commit is a rename.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from blobserve.digest import Digest

log = Logger()

_T = TypeVar("_T")

#: Runs a blocking call away from the reactor thread and returns its result.
RunBlocking = Callable[..., "Deferred[Any]"]


@define
class BlobReader:
    """
    A read handle on one blob file, owned by whoever opened it.

    Reads are positional, so several readers never disturb each other or a
    writer appending to the same file.
    """

    _fd: int
    _closed: bool = field(default=False, init=False)

    def read(self, offset: int, size: int) -> bytes:
        """
        Read up to C{size} bytes at C{offset}; fewer only at the end of the file.
        """
        return os.pread(self._fd, size, offset)

    def fileno(self) -> int:
        """
        The file descriptor, for calls such as C{sendfile} that read the file
        themselves. It stays the reader's own: do not close it.
        """
        return self._fd

    def size(self) -> int:
        """
        The file's current length.
        """
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """
        Release the handle. Closing twice is harmless.
        """
        if not self._closed:
            self._closed = True
            os.close(self._fd)


@define
class TemporaryBlob:
    """
    A blob being written: a file under C{ROOT/tmp/} that is not yet trusted.

    Its owner (the download) writes to it, opens readers on it for clients that
    follow the download, and ends it with L{IBlobStore.commit} or
    L{IBlobStore.discard}.
    """

    digest: Digest
    path: str
    _fd: int
    _closed: bool = field(default=False, init=False)
    #: Whether the file is no longer at L{path}: renamed into the store, or
    #: removed. Nothing is unlinked at C{path} after that.
    moved: bool = field(default=False, init=False)

    def write(self, data: bytes) -> None:
        """
        Append C{data}.

        @raise OSError: if the file system refuses it (a full disk, an I/O error).
        """
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def open_reader(self) -> BlobReader:
        """
        A new, independent read handle on this file. It stays valid after the
        file is committed (renamed) or discarded (removed).

        @raise ValueError: if this temporary has been closed.
        """
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        # A duplicate of the read-write descriptor: it needs no path, so the
        # rename in commit cannot race with a reader opening the file.
        return BlobReader(os.dup(self._fd))

    def fsync(self) -> None:
        """
        Make the written bytes durable. Blocking: call it from a thread.
        """
        os.fsync(self._fd)

    def size(self) -> int:
        """
        How many bytes are written.
        """
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """
        Release the write handle; readers already opened stay valid.
        """
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class IBlobStore(Interface):
    """
    Where verified blobs are kept, addressed by their digest.
    """

    def open(digest: Digest) -> BlobReader | None:
        """
        Open the committed blob C{digest} for reading, or return L{None} if the
        store does not hold it. A blob whose size is not the size it was
        committed with is damaged: it is removed, and L{None} returned.
        """

    def create_temporary(digest: Digest) -> TemporaryBlob:
        """
        Create an empty temporary file for a download of C{digest}.

        @raise OSError: if the file cannot be created.
        """

    def media_type(digest: Digest) -> str | None:
        """
        The media type committed with the blob C{digest}, if any (manifests
        have one).
        """

    def commit(
        temporary: TemporaryBlob, media_type: str | None = None
    ) -> Deferred[None]:
        """
        Make a fully written and verified temporary blob durable and visible to
        L{open} under its digest, atomically: a reader sees the whole blob or
        none. The temporary's write handle is left open for its owner to close.
        A C{media_type} is recorded durably before the blob becomes visible.

        @return: fires once the blob is visible and its rename durable, or
            fails if the file system refuses; then neither the temporary nor
            the blob is left visible.
        """

    def discard(temporary: TemporaryBlob) -> None:
        """
        Remove a temporary blob that will not be committed, and close it.
        Discarding twice, or after a commit, removes nothing more.
        """


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IBlobStore)
@define
class DirectoryBlobStore:
    """
    An L{IBlobStore} in a directory of the local file system.

    @ivar root: the store's directory.
    @ivar run_blocking: runs the slow parts of a commit (the fsync calls) away
        from the reactor thread.
    """

    root: str
    run_blocking: RunBlocking = deferToThread

    def __attrs_post_init__(self) -> None:
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)

    @property
    def _blobs(self) -> str:
        return os.path.join(self.root, "blobs")

    @property
    def _tmp(self) -> str:
        return os.path.join(self.root, "tmp")

    def path_for(self, digest: Digest) -> str:
        """
        Where the committed blob C{digest} lives.
        """
        return os.path.join(self._blobs, digest.algorithm, digest.hex[:2], digest.hex)

    def remove_stale_temporaries(self) -> int:
        """
        Remove the temporary files a previous run left behind, and say how many.
        """
        removed = 0
        for entry in os.scandir(self._tmp):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def open(self, digest: Digest) -> BlobReader | None:
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return None
        reader = BlobReader(fd)
        try:
            damage = self._damage(digest, reader.size())
        except BaseException:
            reader.close()
            raise
        if damage is not None:
            # Never serve it; the next request fetches it again.
            log.warn(
                "{digest} {damage}: removing it", digest=str(digest), damage=damage
            )
            reader.close()
            self._remove(digest)
            return None
        return reader

    def _damage(self, digest: Digest, size: int) -> str | None:
        """
        What is wrong with the committed blob C{digest} of C{size} bytes on
        disk, judged by its record, or L{None} if nothing is.
        """
        try:
            record = self._record(digest)
        except OSError as e:
            return f"has an unreadable record ({e.strerror})"
        if record is None:
            return None
        if record.get("size") != size:
            return f"has {size} bytes on disk, not the {record.get('size')} committed"
        return None

    def create_temporary(self, digest: Digest) -> TemporaryBlob:
        fd = -1
        for attempt in range(100):
            path = os.path.join(
                self._tmp, f"{digest.algorithm}-{digest.hex}.{os.urandom(4).hex()}"
            )
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if attempt == 99:
                    raise
                continue
            break
        return TemporaryBlob(digest, path, fd)

    def _record_path(self, digest: Digest) -> str:
        return os.path.join(
            self.root, "records", digest.algorithm, digest.hex[:2], digest.hex
        )

    def _record(self, digest: Digest) -> dict[str, Any] | None:
        """
        What was recorded of the blob C{digest} when it was committed: its
        C{size}, and its C{media_type} if it has one; L{None} if nothing was.

        @raise OSError: if the record is there but cannot be read, or is not a
            record.
        """
        try:
            with open(self._record_path(digest), encoding="utf-8") as f:
                record = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            raise OSError(errno.EINVAL, "not JSON") from None
        if not isinstance(record, dict) or type(record.get("size")) is not int:
            raise OSError(errno.EINVAL, "not a record of a size")
        return record

    def media_type(self, digest: Digest) -> str | None:
        try:
            record = self._record(digest)
        except OSError:
            return None  # open() finds the damage and repairs it
        media_type = None if record is None else record.get("media_type")
        return media_type if isinstance(media_type, str) else None

    def _write_record(self, digest: Digest, record: dict[str, Any]) -> None:
        # Blocking: fsync and rename, so a crash leaves the old record or the
        # new, never a torn one.
        path = self._record_path(digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.urandom(4).hex()}"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(partial, path)
        _fsync_directory(os.path.dirname(path))

    def _remove(self, digest: Digest) -> None:
        for path in (self.path_for(digest), self._record_path(digest)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                log.failure("could not remove {path}", path=path)

    def commit(
        self, temporary: TemporaryBlob, media_type: str | None = None
    ) -> Deferred[None]:
        final = self.path_for(temporary.digest)
        directory = os.path.dirname(final)

        def rename(_: object) -> Deferred[None]:
            # In the reactor thread, so that whoever looks the digest up next
            # finds either the in-flight download or the committed file.
            created = not os.path.isdir(directory)
            os.makedirs(directory, exist_ok=True)
            os.rename(temporary.path, final)
            temporary.moved = True
            synced = self.run_blocking(self._sync_directories, directory, created)
            return synced.addErrback(withdraw)

        def withdraw(reason: Any) -> Any:
            # The rename may not last: take the blob out again, so that what
            # is visible is what is reported committed.
            self._remove(temporary.digest)
            return reason

        def failed(reason: Any) -> Any:
            self.discard(temporary)
            return reason

        def prepare() -> None:
            temporary.fsync()
            record: dict[str, Any] = {"size": temporary.size()}
            if media_type is not None:
                record["media_type"] = media_type
            self._write_record(temporary.digest, record)

        d: Deferred[None] = self.run_blocking(prepare)
        d.addCallback(rename)
        d.addErrback(failed)
        return d

    @staticmethod
    def _sync_directories(directory: str, created: bool) -> None:
        _fsync_directory(directory)
        if created:
            _fsync_directory(os.path.dirname(directory))

    def discard(self, temporary: TemporaryBlob) -> None:
        if not temporary.moved:
            temporary.moved = True
            try:
                os.unlink(temporary.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.failure("could not remove {path}", path=temporary.path)
        temporary.close()
