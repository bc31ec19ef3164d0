"""
L{Evictor}: keeps the store within C{--max-size} and its file system above
C{--min-free} by removing the least recently used blobs that nobody reads,
and refuses a download that would not fit even then.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import NoReturn

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from blobserve.digest import Digest
from blobserve.store.files import DirectoryBlobStore

log = Logger()

#: Once over C{--max-size}, blobs are evicted until the store holds at most
#: this share of it: one eviction makes room for several commits, not one.
LOW_WATER = 0.95

#: Once free space is under C{--min-free}, blobs are evicted until this share
#: of it more is free.
MIN_FREE_MARGIN = 0.05


class StoreFull(Exception):
    """
    A blob does not fit in the store, even with every blob that nobody reads
    evicted.
    """


def free_space(path: str) -> int:
    """
    The bytes an unprivileged process may still write on the file system
    holding C{path}.
    """
    figures = os.statvfs(path)
    return figures.f_bavail * figures.f_frsize


class Reservation:
    """
    Room held for a download that declared its length: it counts against the
    limits until the blob is committed or the download ends.
    """

    def __init__(
        self, digest: Digest, size: int, on_release: Callable[[Reservation], object]
    ) -> None:
        self.digest = digest
        self.size = size
        self._on_release = on_release
        self._written: Callable[[], int] = lambda: 0
        self.released = False

    def follow(self, written: Callable[[], int]) -> None:
        """
        Learn how to tell how many of the bytes are on disk already: those
        take free space now, and are not counted twice against C{--min-free}.
        """
        self._written = written

    def to_come(self) -> int:
        """
        How many of the reserved bytes are not on disk yet.
        """
        return max(self.size - self._written(), 0)

    def release(self) -> None:
        """
        Give the room back. Releasing twice does nothing more.
        """
        if not self.released:
            self.released = True
            self._on_release(self)


class Evictor:
    """
    The store's size policy: after each commit, and before a download of
    known length starts, blobs are evicted, least recently used first, until
    the store holds at most L{LOW_WATER} of C{max_size} and at least
    C{min_free} (and L{MIN_FREE_MARGIN} of it more) is free on its file
    system, counting what downloads in flight have reserved.

    A blob that a reader has open, or that is being committed, is pinned
    (L{blobserve.store.files.Pins}) and never evicted. When only pinned blobs
    are left, the store stays over its limit and serves on; that is logged
    once, until it is back within its limits.

    Evictions run one at a time. Until the store's index is ready, nothing
    is evicted and every reservation is granted: sizes are not known yet.

    It watches the store's commits (L{DirectoryBlobStore.on_commit}) from
    the moment it is made.
    """

    def __init__(
        self,
        store: DirectoryBlobStore,
        max_size: int | None = None,
        min_free: int | None = None,
        free: Callable[[], int] | None = None,
    ) -> None:
        """
        @param max_size: the most bytes of blobs the store may hold.
        @param min_free: the fewest bytes that must stay free on the store's
            file system.
        @param free: tells the free bytes on the store's file system; by
            default, C{statvfs} of its directory.
        """
        self.max_size = max_size
        self.min_free = min_free
        self._store = store
        self._free = free or (lambda: free_space(store.root))
        self._lock = DeferredLock()
        self._reservations: set[Reservation] = set()
        self._stuck = False
        #: How many blobs were evicted since start, and their bytes.
        self.evictions = 0
        self.evicted_bytes = 0
        store.on_commit = self.after_commit

    @property
    def reserved(self) -> int:
        """
        The bytes reserved by downloads in flight.
        """
        return sum(reservation.size for reservation in self._reservations)

    def status(self) -> dict[str, int | None]:
        """
        The store's figures, for the status page.
        """
        return {
            "size": self._store.index.size,
            "max_size": self.max_size,
            "min_free": self.min_free,
            "free": self._free(),
            "blobs": len(self._store.index),
            "pinned": len(self._store.pins),
            "reserved": self.reserved,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
        }

    def after_commit(self, digest: Digest) -> Deferred[int]:
        """
        A blob was committed: its reservation, if any, is now its size in
        the store. Evict what the limits ask for.
        """
        for reservation in [r for r in self._reservations if r.digest == digest]:
            reservation.release()
        return self.make_room()

    def make_room(self) -> Deferred[int]:
        """
        Evict what the limits ask for now.

        @return: fires with the bytes evicted; never fails (a failure is
            logged).
        """

        def failed(reason: Failure) -> int:
            log.failure("could not evict", reason)
            return 0

        d = self._lock.run(lambda: Deferred.fromCoroutine(self._make_room(0)))
        return d.addErrback(failed)

    def reserve(self, digest: Digest, size: int) -> Deferred[Reservation]:
        """
        Make room for a blob of C{size} bytes about to be written, evicting
        if need be, and hold it until the reservation is released.

        @return: fires with the reservation once the room is there (evicted
            files are gone), or fails with L{StoreFull}, having evicted
            nothing, if the blob cannot fit.
        """

        async def reserve() -> Reservation:
            await self._make_room(size, digest)
            reservation = Reservation(digest, size, self._reservations.discard)
            self._reservations.add(reservation)
            return reservation

        return self._lock.run(lambda: Deferred.fromCoroutine(reserve()))

    def _shortfall(self, extra: int) -> tuple[int, int]:
        """
        How many bytes must go for C{extra} bytes more to be within the
        limits, and how many to be back at the low-water marks.
        """
        must = wanted = 0
        if self.max_size is not None:
            used = self._store.index.size + self.reserved + extra
            if used > self.max_size:
                must = used - self.max_size
                wanted = used - int(self.max_size * LOW_WATER)
        if self.min_free is not None:
            to_come = sum(r.to_come() for r in self._reservations)
            free = self._free() - to_come - extra
            if free < self.min_free:
                must = max(must, self.min_free - free)
                margin = int(self.min_free * MIN_FREE_MARGIN)
                wanted = max(wanted, self.min_free + margin - free)
        return must, wanted

    def _victims(self, wanted: int) -> tuple[list[Digest], int]:
        """
        The least recently used blobs that nobody reads, as many as it takes
        to free C{wanted} bytes (or all of them), and their bytes.
        """
        index = self._store.index
        victims: list[Digest] = []
        freed = 0
        for digest in index.least_recently_used():
            if freed >= wanted:
                break
            entry = index.get(digest)
            if entry is None or digest in self._store.pins:
                continue
            victims.append(digest)
            freed += entry.size
        return victims, freed

    async def _make_room(self, extra: int, digest: Digest | None = None) -> int:
        if not self._store.index.ready:
            return 0
        if self.max_size is not None and extra > self.max_size:
            self._refuse(digest, extra, f"over --max-size ({self.max_size} bytes)")
        must, wanted = self._shortfall(extra)
        if must <= 0:
            self._within_limits()
            return 0
        victims, freed = self._victims(wanted)
        if freed < must:
            if extra:
                # Evicting would not make it fit: keep the blobs.
                self._refuse(
                    digest,
                    extra,
                    "with every blob not in use evicted it would still not be"
                    f" within {self._limits()} ({len(self._store.pins)} blobs"
                    " in use)",
                )
            if not self._stuck:
                self._stuck = True
                log.warn(
                    "the store is over {limits} by {over} bytes, and the blobs"
                    " left are in use: serving on, and evicting again after"
                    " the next commit",
                    limits=self._limits(),
                    over=must - freed,
                )
        if victims:
            started = time.monotonic()
            await self._store.remove(victims)
            self.evictions += len(victims)
            self.evicted_bytes += freed
            log.info(
                "evicted {count} least recently used blobs ({size} bytes) in"
                " {seconds:.3f}s; {left} bytes in {blobs} blobs left",
                count=len(victims),
                size=freed,
                seconds=time.monotonic() - started,
                left=self._store.index.size,
                blobs=len(self._store.index),
            )
        if freed >= must:
            self._within_limits()
        return freed

    def _within_limits(self) -> None:
        if self._stuck:
            self._stuck = False
            log.info("the store is within {limits} again", limits=self._limits())

    def _limits(self) -> str:
        limits = []
        if self.max_size is not None:
            limits.append(f"--max-size ({self.max_size} bytes)")
        if self.min_free is not None:
            limits.append(f"--min-free ({self.min_free} bytes)")
        return " and ".join(limits)

    def _refuse(self, digest: Digest | None, size: int, why: str) -> NoReturn:
        message = f"the cache has no room for a blob of {size} bytes: {why}"
        log.warn(
            "not fetching {digest}: {message}", digest=str(digest), message=message
        )
        raise StoreFull(message)
