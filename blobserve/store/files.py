"""
The content-addressed blob store on a local file system: blob files, their
temporaries, and commits (fsync, rename, directory fsync), told to the
store's index; unfinished downloads kept across restarts, and reopened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import Interface, implementer

from blobserve.digest import Digest, Hasher
from blobserve.oneshot import OneShotEvent
from blobserve.store.index import Origin, PartialEntry, StoreIndex
from blobserve.store.layout import blob_path, blobs_directory, temporary_directory

log = Logger()

_T = TypeVar("_T")

#: Runs a blocking call away from the reactor thread and returns its result.
RunBlocking = Callable[..., "Deferred[Any]"]

#: How much of a kept partial download is read at once to hash it again.
_REHASH_CHUNK = 1024 * 1024


@define
class BlobReader:
    """
    A read handle on one blob file, owned by whoever opened it.

    Reads are positional, so several readers never disturb each other or a
    writer appending to the same file.

    @ivar on_close: called once, when the reader is closed.
    """

    _fd: int
    on_close: Callable[[], object] | None = None
    _closed: bool = field(default=False, init=False)

    def read(self, offset: int, size: int) -> bytes:
        """
        Read up to C{size} bytes at C{offset}; fewer only at the end of the file.
        """
        return os.pread(self._fd, size, offset)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """
        Read up to C{len(buffer)} bytes at C{offset} into C{buffer}, without
        a new object per read; fewer only at the end of the file.

        @return: how many bytes were read.
        """
        return os.preadv(self._fd, [buffer], offset)

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
            try:
                os.close(self._fd)
            finally:
                if self.on_close is not None:
                    self.on_close()


class Pins:
    """
    How many readers each blob has open, so that eviction passes over the
    blobs being read: removing one would free no space until its last reader
    closes.
    """

    def __init__(self) -> None:
        self._readers: Counter[Digest] = Counter()

    def hold(self, digest: Digest) -> Callable[[], None]:
        """
        Pin C{digest} until the returned function is called (calling it again
        does nothing).
        """
        self._readers[digest] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._readers[digest] -= 1
                if not self._readers[digest]:
                    del self._readers[digest]

        return release

    def __contains__(self, digest: object) -> bool:
        return digest in self._readers

    def __len__(self) -> int:
        """
        How many blobs are pinned.
        """
        return len(self._readers)


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
    #: Pins the blob for each reader opened on this file, until it closes.
    _pins: Pins | None = None
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

    def write_at(self, offset: int, data: bytes) -> None:
        """
        Write C{data} at C{offset}, leaving the append position where it is
        (a segment of a blob fetched in parallel).

        @raise OSError: if the file system refuses it.
        """
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def truncate(self, length: int) -> None:
        """
        Cut the file to its first C{length} bytes, and append after them.

        @raise OSError: if the file system refuses it.
        """
        os.ftruncate(self._fd, length)
        os.lseek(self._fd, length, os.SEEK_SET)

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
        fd = os.dup(self._fd)
        if self._pins is None:
            return BlobReader(fd)
        # Pinned: once committed, the file is a blob like any other.
        return BlobReader(fd, self._pins.hold(self.digest))

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

    @property
    def name(self) -> str:
        """
        The file's name in the store's C{tmp/}.
        """
        return os.path.basename(self.path)

    @property
    def closed(self) -> bool:
        """
        Whether the write handle has been released.
        """
        return self._closed

    def close(self) -> None:
        """
        Release the write handle; readers already opened stay valid.
        """
        if not self._closed:
            self._closed = True
            os.close(self._fd)


@frozen
class KeptPartial:
    """
    An unfinished download reopened to resume it.

    @ivar temporary: its file, open for appending; the caller's to end.
    @ivar hasher: the hash of the bytes on disk.
    @ivar written: how many bytes are on disk.
    @ivar origin: where the download came from.
    """

    temporary: TemporaryBlob
    hasher: Hasher
    written: int
    origin: Origin


@frozen
class TemporaryCleanup:
    """
    What L{DirectoryBlobStore.remove_stale_temporaries} found.

    @ivar kept: unfinished downloads kept to be resumed, and their bytes.
    @ivar expired: unfinished downloads removed for their age.
    @ivar unrecorded: temporary files removed that no download was recorded
        for.
    """

    kept: int = 0
    kept_bytes: int = 0
    expired: int = 0
    unrecorded: int = 0


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

    def create_temporary(digest: Digest, origin: Origin | None = None) -> TemporaryBlob:
        """
        Create an empty temporary file for a download of C{digest}. With an
        C{origin}, it is recorded as an unfinished download (see
        L{open_partial}) until it is committed or discarded.

        @raise OSError: if the file cannot be created.
        """

    def open_partial(digest: Digest) -> Deferred[KeptPartial | None]:
        """
        Reopen the recorded unfinished download of C{digest} to resume it: its
        file, open for appending, and the hash of the bytes on disk, read
        away from the reactor thread.

        @return: fires with it, or with L{None} if there is none (or its file
            is gone); fails if the file cannot be read, and then it is
            discarded.
        """

    def keep_partial(temporary: TemporaryBlob) -> None:
        """
        Close the temporary of a download that stops before its end, keeping
        its file and its record, with the length on disk, for
        L{open_partial} in this run or the next. A temporary committed or
        discarded already is only closed.
        """

    def partials() -> Mapping[Digest, PartialEntry]:
        """
        The unfinished downloads recorded, by digest.
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
        or manifest C{digest}, as the upstream said; for as long as the store
        holds C{digest}, across restarts.
        """

    def holds(registry: str, repository: str, digest: Digest) -> bool:
        """
        Whether repository C{repository} of C{registry} is known to hold
        C{digest} (see L{saw}). Answered from memory, at once.
        """

    def discard(temporary: TemporaryBlob) -> None:
        """
        Remove a temporary blob that will not be committed, and its record
        as an unfinished download, and close it. Discarding twice, or after
        a commit, removes nothing more.
        """


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
    @ivar run_blocking: runs the slow parts of a commit (the fsync calls), of
        a removal (the unlink calls) and the hashing of an unfinished download
        away from the reactor thread.
    @ivar on_commit: called with a blob's digest once its commit is durable,
        before the commit's Deferred fires; the blob is pinned while it runs.
    @ivar pins: the blobs that readers have open, and the blob being
        committed.
    @ivar partial_max_age: seconds after its last write that an unfinished
        download is still resumed; an older one is removed.
    """

    root: str
    index: StoreIndex
    run_blocking: RunBlocking = deferToThread
    on_commit: Callable[[Digest], object] | None = None
    partial_max_age: float = 86400.0
    pins: Pins = field(factory=Pins, init=False)
    # The removals under way, by digest: a commit of the same digest waits
    # for its removal, so that an unlink never takes the new file.
    _removals: dict[Digest, OneShotEvent[None]] = field(factory=dict, init=False)
    # The temporaries made or reopened by this run and not yet committed,
    # discarded or kept, by path: no clean-up removes one still open.
    _live: dict[str, TemporaryBlob] = field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        os.makedirs(blobs_directory(self.root), exist_ok=True)
        os.makedirs(temporary_directory(self.root), exist_ok=True)

    def path_for(self, digest: Digest) -> str:
        """
        Where the committed blob C{digest} lives.
        """
        return blob_path(self.root, digest)

    def remove_stale_temporaries(
        self, max_age: float | None = None
    ) -> TemporaryCleanup:
        """
        Remove the temporary files earlier runs left behind, but for the
        unfinished downloads the index records whose file was written to less
        than C{max_age} seconds ago (by default L{partial_max_age}): those
        stay, to be resumed. Records whose file is gone are forgotten. Call
        it once the index knows its unfinished downloads (see
        L{StoreIndex.when_partials_known}); temporaries of this run that are
        still open are left alone.
        """
        if max_age is None:
            max_age = self.partial_max_age
        now = time.time()
        recorded = {entry.name: d for d, entry in self.index.partials().items()}
        for path, temporary in list(self._live.items()):
            if temporary.closed:
                del self._live[path]
        kept, kept_bytes, expired, unrecorded = 0, 0, 0, 0
        present = set()
        for entry in os.scandir(temporary_directory(self.root)):
            if not entry.is_file(follow_symlinks=False) or entry.path in self._live:
                continue
            digest = recorded.get(entry.name)
            if digest is not None:
                stat = entry.stat(follow_symlinks=False)
                if now - stat.st_mtime <= max_age:
                    present.add(entry.name)
                    kept += 1
                    kept_bytes += stat.st_size
                    self.index.update_partial(digest, entry.name, stat.st_size)
                    continue
                expired += 1
            else:
                unrecorded += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        for name, digest in recorded.items():
            path = os.path.join(temporary_directory(self.root), name)
            if name not in present and path not in self._live:
                self.index.remove_partial(digest, name)
        return TemporaryCleanup(kept, kept_bytes, expired, unrecorded)

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
        reader = BlobReader(fd, self.pins.hold(digest))
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

    def create_temporary(
        self, digest: Digest, origin: Origin | None = None
    ) -> TemporaryBlob:
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
        temporary = self._live[path] = TemporaryBlob(digest, path, fd, self.pins)
        if origin is not None:
            # Recorded before a byte is written: after a crash, the record
            # says where the file came from and its size how far it got.
            self.index.add_partial(digest, temporary.name, origin)
        return temporary

    def open_partial(self, digest: Digest) -> Deferred[KeptPartial | None]:
        # Right after a start, the first requests come before the index has
        # read what earlier runs left: wait for that (it is read first).
        known = self.index.when_partials_known()
        return known.addCallback(lambda _: self._reopen(digest))

    def _reopen(self, digest: Digest) -> Deferred[KeptPartial | None]:
        entry = self.index.partial(digest)
        if entry is None:
            return succeed(None)
        path = os.path.join(temporary_directory(self.root), entry.name)
        if path in self._live:
            return succeed(None)  # a download of this run has it open
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.index.remove_partial(digest, entry.name)
            return succeed(None)
        temporary = self._live[path] = TemporaryBlob(digest, path, fd, self.pins)
        try:
            expired = time.time() - os.fstat(fd).st_mtime > self.partial_max_age
        except OSError:
            expired = True
        if expired:
            self.discard(temporary)
            return succeed(None)
        started = time.monotonic()

        def rehash() -> tuple[Hasher, int]:
            hasher = digest.hasher()
            offset = 0
            while chunk := os.pread(fd, _REHASH_CHUNK, offset):
                hasher.update(chunk)
                offset += len(chunk)
            return hasher, offset

        def reopened(result: tuple[Hasher, int]) -> KeptPartial:
            hasher, written = result
            log.info(
                "re-hashed the {written} bytes of the unfinished download of"
                " {digest} in {seconds:.2f}s",
                written=written,
                digest=str(digest),
                seconds=time.monotonic() - started,
            )
            return KeptPartial(temporary, hasher, written, entry.origin)

        def unreadable(reason: Any) -> Any:
            self.discard(temporary)
            return reason

        d: Deferred[tuple[Hasher, int]] = self.run_blocking(rehash)
        return d.addCallbacks(reopened, unreadable)

    def keep_partial(self, temporary: TemporaryBlob) -> None:
        if temporary.moved:
            # Committed or discarded already: nothing is left to keep.
            temporary.close()
            return
        try:
            size: int | None = temporary.size()
        except OSError:
            size = None
        temporary.close()
        self._live.pop(temporary.path, None)
        if size is not None:
            self.index.update_partial(temporary.digest, temporary.name, size)

    def partials(self) -> Mapping[Digest, PartialEntry]:
        return self.index.partials()

    def saw(self, registry: str, repository: str, digest: Digest) -> None:
        self.index.saw(registry, repository, digest)

    def holds(self, registry: str, repository: str, digest: Digest) -> bool:
        return self.index.holds(registry, repository, digest)

    def media_type(self, digest: Digest) -> str | None:
        entry = self.index.get(digest)
        return None if entry is None else entry.media_type

    def _remove(self, digest: Digest) -> Deferred[None]:
        """
        Remove the blob C{digest} (see L{remove}).
        """
        return self.remove([digest])

    def remove(self, digests: list[Digest]) -> Deferred[None]:
        """
        Remove the blobs C{digests}: out of the index at once, their files
        next (in a thread: freeing a large file takes a while), their rows
        last; a crash at any point is finished at the next start (see
        L{StoreIndex.begin_removal}). A commit of one of them meanwhile waits
        until it is gone.

        @return: fires once they are gone; never fails (a failure is logged).
        """
        removal: OneShotEvent[None] = OneShotEvent()
        for digest in digests:
            self._removals[digest] = removal
        paths = [self.path_for(digest) for digest in digests]

        async def run() -> None:
            try:
                await self.index.begin_removal(digests)
                await self.run_blocking(_unlink_all, paths)
                await self.index.end_removal(digests)
            finally:
                for digest in digests:
                    if self._removals.get(digest) is removal:
                        del self._removals[digest]
                removal.succeed_with(None)

        d = Deferred.fromCoroutine(run())
        d.addErrback(
            lambda reason: log.failure(
                "could not remove {digests}",
                reason,
                digests=" ".join(str(digest) for digest in digests),
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
            removal = self._removals.get(digest)
            if removal is not None:
                await removal.observe()
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
            self._forget(temporary)
            if self.on_commit is not None:
                try:
                    self.on_commit(digest)
                except Exception:
                    log.failure("after the commit of {digest}", digest=str(digest))

        # Never evicted half committed.
        release = self.pins.hold(digest)

        def unpin(result: object) -> object:
            release()
            return result

        d = Deferred.fromCoroutine(run())
        d.addBoth(unpin)

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
        self._forget(temporary)
        temporary.close()

    def _forget(self, temporary: TemporaryBlob) -> None:
        """
        Forget a temporary that is no longer at its path, and its record as
        an unfinished download.
        """
        self._live.pop(temporary.path, None)
        self.index.remove_partial(temporary.digest, temporary.name)
