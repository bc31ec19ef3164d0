"""
L{Download}: one fetch of one blob from the upstream into the store.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from blobserve.digest import Digest
from blobserve.oneshot import OneShotEvent
from blobserve.storage import BlobReader, IBlobStore, TemporaryBlob
from blobserve.upstream import IUpstream, response_length
from blobserve.writer import ChunkWriter

log = Logger()


@frozen
class Landing:
    """
    A download whose upstream has answered: what a client needs to follow it.

    @ivar length: the blob's size, if the upstream declared it.
    @ivar progress: tells how much of the blob is on disk, and when it is
        complete and verified.
    """

    length: int | None
    progress: ChunkWriter
    _temporary: TemporaryBlob

    def open_reader(self) -> BlobReader:
        """
        A read handle of the caller's own on the blob as it lands.
        """
        return self._temporary.open_reader()


class Download:
    """
    Fetches one blob once, lands it in a temporary file, and commits it to the
    store when it is complete and verified.

    It runs to its end whether or not anyone is following it: a client that
    goes away never stops it.
    """

    def __init__(
        self,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        store: IBlobStore,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.digest = digest
        self._upstream = upstream
        self._store = store
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._ready: OneShotEvent[Landing] = OneShotEvent()
        self._done: OneShotEvent[None] = OneShotEvent()
        self._started_at = 0.0

    def start(self) -> None:
        """
        Ask the upstream for the blob. Call once.
        """
        self._started_at = self._clock.seconds()
        log.info("fetching {digest} from upstream", digest=str(self.digest))
        d = self._upstream.fetch_blob(self.name, self.digest)
        d.addCallbacks(self._land, self._give_up)

    def when_ready(self) -> Deferred[Landing]:
        """
        Fire with a L{Landing} once the upstream has answered with the blob's
        headers, or fail with the reason there will be no blob (an
        L{blobserve.upstream.UpstreamError}, or an C{OSError} from the store).
        """
        return self._ready.observe()

    def when_done(self) -> Deferred[None]:
        """
        Fire once the download has ended, committed or not. Never fails.
        """
        return self._done.observe()

    def _land(self, response: IResponse) -> None:
        try:
            temporary = self._store.create_temporary(self.digest)
        except OSError:
            self._give_up(Failure())
            # Nobody will read this body: close the connection instead.
            discard = Protocol()
            response.deliverBody(discard)
            if discard.transport is not None:
                IPushProducer(discard.transport).stopProducing()
            return
        length = response_length(response)
        writer = ChunkWriter(temporary, length, self._clock, self._idle_timeout)
        # Followers subscribe before the first byte arrives, so none misses one.
        self._ready.succeed_with(Landing(length, writer, temporary))
        response.deliverBody(writer)
        writer.when_finished().addCallbacks(
            lambda size: self._commit(temporary, size),
            lambda reason: self._discard(temporary, writer.written, reason),
        )

    def _commit(self, temporary: TemporaryBlob, size: int) -> Deferred[None]:
        def committed(_: None) -> None:
            log.info(
                "committed {digest} ({size} bytes) in {seconds:.2f}s",
                digest=str(self.digest),
                size=size,
                seconds=self._clock.seconds() - self._started_at,
            )

        def not_committed(reason: Failure) -> None:
            log.failure("could not commit {digest}", reason, digest=str(self.digest))

        d = self._store.commit(temporary)
        d.addCallbacks(committed, not_committed)
        d.addBoth(lambda _: self._end(temporary))
        return d

    def _discard(self, temporary: TemporaryBlob, written: int, reason: Failure) -> None:
        log.error(
            "download of {digest} failed after {written} bytes: {reason}",
            digest=str(self.digest),
            written=written,
            reason=reason.getErrorMessage(),
        )
        self._store.discard(temporary)
        self._end(temporary)

    def _give_up(self, reason: Failure) -> None:
        log.warn(
            "cannot fetch {digest}: {reason}",
            digest=str(self.digest),
            reason=reason.getErrorMessage(),
        )
        self._ready.fail_with(reason)
        self._done.succeed_with(None)

    def _end(self, temporary: TemporaryBlob) -> None:
        temporary.close()
        self._done.succeed_with(None)
