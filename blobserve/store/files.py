"""
The content-addressed blob store on a local file system: blob files, their
temporaries, and commits (fsync, rename, directory fsync), told to the
store's index.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from blobserve.digest import Digest
from blobserve.store.index import StoreIndex
from blobserve.store.layout import blob_path, blobs_directory, temporary_directory

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

    def saw(registry: str, repository: str, digest: Digest) -> None:
        """
        Remember that repository C{repository} of C{registry} holds the blob
        or manifest C{digest}.
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
    An L{IBlobStore} in a directory of the local file system (see
    L{blobserve.store.layout}), with an L{StoreIndex} of what it holds.

    @ivar root: the store's directory.
    @ivar index: what the store holds; until it is ready, the files say.
    @ivar run_blocking: runs the slow parts of a commit (the fsync calls) away
        from the reactor thread.
    """

    root: str
    index: StoreIndex
    run_blocking: RunBlocking = deferToThread

    def __attrs_post_init__(self) -> None:
        os.makedirs(blobs_directory(self.root), exist_ok=True)
        os.makedirs(temporary_directory(self.root), exist_ok=True)

    def path_for(self, digest: Digest) -> str:
        """
        Where the committed blob C{digest} lives.
        """
        return blob_path(self.root, digest)

    def remove_stale_temporaries(self) -> int:
        """
        Remove the temporary files a previous run left behind, and say how many.
        """
        removed = 0
        for entry in os.scandir(temporary_directory(self.root)):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def open(self, digest: Digest) -> BlobReader | None:
        entry = self.index.get(digest)
        if entry is None and self.index.ready:
            return None
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            if entry is not None:
                log.warn(
                    "{digest} is gone from disk: forgetting it", digest=str(digest)
                )
                self._remove(digest)
            return None
        reader = BlobReader(fd)
        try:
            size = reader.size()
        except BaseException:
            reader.close()
            raise
        if entry is not None and entry.size != size:
            # Damaged since it was committed: never serve it; fetch it again.
            log.warn(
                "{digest} has {actual} bytes on disk, not the {size} committed:"
                " removing it",
                digest=str(digest),
                actual=size,
                size=entry.size,
            )
            reader.close()
            self._remove(digest)
            return None
        self.index.touch(digest)
        return reader

    def create_temporary(self, digest: Digest) -> TemporaryBlob:
        fd = -1
        for attempt in range(100):
            path = os.path.join(
                temporary_directory(self.root),
                f"{digest.algorithm}-{digest.hex}.{os.urandom(4).hex()}",
            )
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if attempt == 99:
                    raise
                continue
            break
        return TemporaryBlob(digest, path, fd)

    def saw(self, registry: str, repository: str, digest: Digest) -> None:
        self.index.saw(registry, repository, digest)

    def media_type(self, digest: Digest) -> str | None:
        entry = self.index.get(digest)
        return None if entry is None else entry.media_type

    def _remove(self, digest: Digest) -> Deferred[None]:
        """
        Remove the blob C{digest}: out of the index at once, its file next,
        its row last.
        """
        d = self.index.begin_removal([digest])

        def unlink(_: object) -> Deferred[None]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_for(digest))
            return self.index.end_removal([digest])

        d.addCallback(unlink)
        d.addErrback(
            lambda reason: log.failure(
                "could not remove {digest}", reason, digest=str(digest)
            )
        )
        return d

    def commit(
        self, temporary: TemporaryBlob, media_type: str | None = None
    ) -> Deferred[None]:
        digest = temporary.digest
        final = self.path_for(digest)
        directory = os.path.dirname(final)

        def prepare() -> int:
            temporary.fsync()
            return temporary.size()

        async def run() -> None:
            size = await self.run_blocking(prepare)
            await self.index.begin_commit(digest, size, media_type)
            # In the reactor thread, so that whoever looks the digest up next
            # finds either the in-flight download or the committed file.
            created = not os.path.isdir(directory)
            os.makedirs(directory, exist_ok=True)
            os.rename(temporary.path, final)
            temporary.moved = True
            self.index.add(digest, size, media_type)
            try:
                await self.run_blocking(self._sync_directories, directory, created)
                await self.index.end_commit(digest)
            except BaseException:
                # The rename may not last: take the blob out again, so that
                # what is visible is what is reported committed.
                await self._remove(digest)
                raise

        d = Deferred.fromCoroutine(run())

        def failed(reason: Any) -> Any:
            self.discard(temporary)
            return reason

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
