"""
L{LayerPrefetcher}: once an image manifest has been served, fetch the blobs
it names (its config and layers) that the store lacks, before clients ask
for them (C{--prefetch-layers}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from blobserve.digest import Digest
from blobserve.failures import why
from blobserve.fetch.download import Landing
from blobserve.fetch.inflight import IInFlightTable
from blobserve.fetch.slots import UpstreamSlots
from blobserve.prefetch.manifests import (
    MANIFEST_TYPES,
    BadManifest,
    distributable,
    parse_manifest,
)
from blobserve.store.files import IBlobStore
from blobserve.upstream.client import IUpstream, Manifest

log = Logger()

#: How many prefetched downloads run at once, at most, when there is no
#: bound on upstream slots.
AT_ONCE = 2

#: How many blobs may wait to be prefetched; more are not prefetched (a
#: client that asks for one fetches it as usual).
QUEUE_LIMIT = 4096


@frozen
class _Wanted:
    """
    A blob to prefetch from repository C{name} of C{upstream}, the registry
    C{registry}.
    """

    registry: str
    upstream: IUpstream
    name: str
    digest: Digest


class LayerPrefetcher(Service):
    """
    Starts the downloads of the blobs an image manifest names, so that the
    layers of an image being rolled out land while its clients still read
    the manifest and config.

    A prefetch is a download in the single-flight table like any other (a
    client that asks for its blob meanwhile joins it), from the repository
    and upstream the manifest was served for, so the upstream's answer
    confirms that the repository holds the blob. It has no client, yet it is
    never abandoned: the prefetcher waits for it to the end, and it commits
    to the store.

    It yields to downloads clients wait for: at most C{at_once} prefetches
    run at a time (by default half the upstream slots), the rest wait, and
    one starts only when an upstream slot is free and no other download
    waits for one. The blobs of a manifest are prefetched largest first: a
    client asks for an image's blobs in the manifest's order, a few at a
    time, so the small ones it asks for first get downloads of their own at
    once, and the image is pulled when its largest layer has landed. Blobs the
    store holds, blobs in flight, foreign (non-distributable) layers and
    blobs declared larger than C{max_size} are not prefetched. Once stopped,
    it starts no more.
    """

    def __init__(
        self,
        store: IBlobStore,
        downloads: IInFlightTable,
        slots: UpstreamSlots | None = None,
        max_size: int | None = None,
        at_once: int | None = None,
        queue_limit: int = QUEUE_LIMIT,
        started: Callable[[], object] = lambda: None,
    ) -> None:
        """
        @param at_once: how many prefetches may run at once; by default half
            of C{slots} (at least one), leaving the other half to downloads
            clients ask for, or L{AT_ONCE} without slots.
        @param started: called for each prefetch started (for the metrics).
        """
        self._store = store
        self._downloads = downloads
        self._slots = slots
        self._max_size = max_size
        if at_once is None:
            at_once = AT_ONCE if slots is None else max(1, slots.limit // 2)
        self._at_once = at_once
        self._queue_limit = queue_limit
        self._started = started
        self._queue: deque[_Wanted] = deque()
        self._queued: set[Digest] = set()
        self._running = 0
        # Waiting for a slot to come free; at most one wait at a time.
        self._waiting_for_slot: Deferred[None] | None = None
        self._stopped = False

    @property
    def queued(self) -> int:
        """
        How many blobs wait to be prefetched.
        """
        return len(self._queue)

    def served(
        self, registry: str, upstream: IUpstream, name: str, manifest: Manifest
    ) -> None:
        """
        Prefetch what C{manifest}, just served for repository C{name} of
        C{upstream} (the registry C{registry}), names, if it is an image
        manifest; an index, an artifact of another type or a manifest that
        cannot be read starts nothing.
        """
        if self._stopped or manifest.media_type not in MANIFEST_TYPES:
            return
        try:
            parsed = parse_manifest(manifest.content, manifest.media_type)
        except BadManifest as e:
            log.info(
                "not prefetching the blobs of {digest}: {why}",
                digest=str(manifest.digest),
                why=str(e),
            )
            return
        if parsed.is_index:
            return
        largest_first = sorted(parsed.descriptors, key=lambda d: -d.size)
        for descriptor in largest_first:
            digest = descriptor.digest
            if (
                not distributable(descriptor)
                or (self._max_size is not None and descriptor.size > self._max_size)
                or digest in self._queued
                or len(self._queue) >= self._queue_limit
                or not self._lacks(digest)
            ):
                continue
            self._queue.append(_Wanted(registry, upstream, name, digest))
            self._queued.add(digest)
        self._pump()

    def stopService(self) -> None:
        """
        Start no more prefetches; those running stop with the other
        downloads.
        """
        super().stopService()
        self._stopped = True
        self._queue.clear()
        self._queued.clear()
        if self._waiting_for_slot is not None:
            self._waiting_for_slot.cancel()

    def _lacks(self, digest: Digest) -> bool:
        """
        Whether C{digest} is neither stored nor in flight.
        """
        if self._downloads.get(digest) is not None:
            return False
        reader = self._store.open(digest)
        if reader is None:
            return True
        reader.close()
        return False

    def _pump(self) -> None:
        """
        Start the next prefetches while there is room for them.
        """
        while self._queue and self._running < self._at_once and not self._stopped:
            if self._slots is not None and not self._slots.free:
                self._wait_for_slot(self._slots)
                return
            wanted = self._queue.popleft()
            self._queued.discard(wanted.digest)
            if self._lacks(wanted.digest):
                self._start(wanted)

    def _wait_for_slot(self, slots: UpstreamSlots) -> None:
        if self._waiting_for_slot is not None:
            return
        d = self._waiting_for_slot = slots.when_free()

        def free(_: object) -> None:
            self._waiting_for_slot = None
            self._pump()

        d.addCallbacks(free, lambda _: None)

    def _start(self, wanted: _Wanted) -> None:
        # Taken now, in this turn: a free slot goes to this download at once.
        download = self._downloads.join(
            wanted.name, wanted.digest, wanted.upstream, wanted.registry
        )
        self._running += 1
        self._started()
        log.info(
            "prefetching {digest} of {repository}",
            digest=str(wanted.digest),
            repository=wanted.name,
        )

        def answered(_: Landing) -> None:
            # The upstream sent it for this repository: that confirms it.
            self._store.saw(wanted.registry, wanted.name, wanted.digest)

        def refused(reason: Failure) -> None:
            log.info(
                "could not prefetch {digest}: {why}",
                digest=str(wanted.digest),
                why=why(reason),
            )

        # Never cancelled: this wait keeps the download from being abandoned
        # for want of clients.
        download.when_ready().addCallbacks(answered, refused)

        def ended(_: object) -> None:
            self._running -= 1
            self._pump()

        download.when_done().addCallback(ended)
