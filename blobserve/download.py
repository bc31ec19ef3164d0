"""
L{Download}: one fetch of one blob from the upstream into the store, resumed
where it broke off when the upstream connection fails.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from blobserve.digest import Digest
from blobserve.oneshot import OneShotEvent
from blobserve.slots import UpstreamSlots
from blobserve.store.eviction import Evictor, Reservation
from blobserve.store.files import BlobReader, IBlobStore, TemporaryBlob
from blobserve.upstream import (
    BlobUnknown,
    IUpstream,
    RangeNotSatisfiable,
    UpstreamError,
    response_length,
)
from blobserve.writer import BlobTooLarge, ChunkWriter, VerificationFailed

log = Logger()

_T = TypeVar("_T")

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")

#: The longest pause between two attempts to resume a transfer.
MAX_RETRY_DELAY = 30.0


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

        @raise DownloadFailed: if the blob will never be complete.
        """
        if self.progress.failed:
            raise DownloadFailed("the upstream transfer of this blob failed")
        try:
            return self._temporary.open_reader()
        except ValueError:
            raise DownloadFailed("the download of this blob has ended") from None


class DownloadFailed(UpstreamError):
    """
    A download that had begun failed: its transfer broke for good, or its
    body did not verify.
    """


class Abandoned(CancelledError):
    """
    Every client of a download left before its upstream sent any of the blob.
    """


@frozen
class RetryPolicy:
    """
    How a broken transfer is resumed: up to C{retries} times, waiting
    C{delay} seconds before the first attempt and twice as long before each
    next (at most L{MAX_RETRY_DELAY}).
    """

    retries: int = 5
    delay: float = 0.5

    def pause(self, attempt: int) -> float:
        return float(min(self.delay * 2 ** (attempt - 1), MAX_RETRY_DELAY))


class Download:
    """
    Fetches one blob once, lands it in a temporary file, and commits it to the
    store when it is complete and verified.

    When the upstream connection breaks, stalls or is cut short, the transfer
    is resumed from the bytes on disk with a C{Range} request; clients
    following it see a pause, not an error. Once the upstream has answered it
    runs to its end whether or not anyone is following it: a client that goes
    away never stops it. Before that, while it waits for an upstream slot or
    for the upstream's answer, it is abandoned as soon as every client that
    waits for it has gone.
    """

    def __init__(
        self,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        store: IBlobStore,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        slots: UpstreamSlots | None = None,
        max_size: int | None = None,
        evictor: Evictor | None = None,
    ) -> None:
        """
        @param slots: bounds how many downloads talk to upstreams at once; a
            download holds one slot from its first request to its end.
        @param max_size: the largest blob fetched, in bytes: one declared
            larger is refused before anything is written, one without a
            declared length fails once it grows past it.
        @param evictor: makes room in the store for a blob of declared length
            before anything is written, and holds it until the download
            ends; a blob that cannot fit fails the download with
            L{blobserve.store.eviction.StoreFull}.
        """
        self.name = name
        self.digest = digest
        self._upstream = upstream
        self._store = store
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._retry = retry
        self._slots = slots
        self._max_size = max_size
        self._evictor = evictor
        self._ready: OneShotEvent[Landing] = OneShotEvent()
        self._done: OneShotEvent[None] = OneShotEvent()
        self._started_at = 0.0
        # What the download waits for before the upstream answers: a slot,
        # then the upstream's headers. Cancelled when every client has gone.
        self._pending: Deferred[Any] | None = None
        #: The blob's progress, once the upstream has answered.
        self.progress: ChunkWriter | None = None

    def start(self) -> None:
        """
        Ask the upstream for the blob (once a slot is free). Call once.
        """
        self._started_at = self._clock.seconds()
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(lambda reason: log.failure("download failed", reason))
        d.addBoth(lambda _: self._end())

    def when_ready(self) -> Deferred[Landing]:
        """
        Fire with a L{Landing} once the upstream has answered with the blob's
        headers, or fail with the reason there will be no blob (an
        L{blobserve.upstream.UpstreamError}, a L{blobserve.slots.QueueFull},
        an C{OSError} from the store).

        Cancelling the Deferred means its caller has gone: when no caller is
        left waiting, a download that has no answer yet is abandoned.
        """
        d = self._ready.observe()
        if not d.called:
            d.addErrback(self._observer_left)
        return d

    def when_done(self) -> Deferred[None]:
        """
        Fire once the download has ended, committed or not, so that the next
        request for its digest finds the store or starts afresh. A failed
        download ends the moment it fails, before its temporary file is
        removed. Never fails.
        """
        return self._done.observe()

    def _end(self) -> None:
        if not self._done.happened:
            self._done.succeed_with(None)

    def _observer_left(self, reason: Failure) -> Failure:
        if (
            reason.check(CancelledError)
            and not self._ready.happened
            and self._ready.waiting == 0
            and self._pending is not None
        ):
            self._pending.cancel()
        return reason

    async def _before_answer(self, d: Deferred[_T]) -> _T:
        """
        Wait for C{d}, which ends as L{Abandoned} if every client goes first.
        """
        self._pending = d
        try:
            return await d
        except CancelledError:
            if self._ready.waiting == 0:
                raise Abandoned() from None
            raise
        finally:
            self._pending = None

    async def _run(self) -> None:
        if self._slots is not None:
            try:
                await self._before_answer(self._slots.acquire())
            except Exception:
                self._give_up(Failure())
                return
        try:
            await self._fetch()
        finally:
            # Out of the table before the slot goes to the next download:
            # whatever that sets off finds no download that has ended.
            self._end()
            if self._slots is not None:
                self._slots.release()

    async def _fetch(self) -> None:
        log.info("fetching {digest} from upstream", digest=str(self.digest))
        try:
            response = await self._before_answer(
                self._upstream.fetch_blob(self.name, self.digest)
            )
            length = response_length(response)
            if self._max_size is not None and (length or 0) > self._max_size:
                _drop(response)
                raise BlobTooLarge(
                    f"the upstream declares {length} bytes, over the limit of"
                    f" {self._max_size}"
                )
            reservation = await self._reserve(response, length)
        except Exception:
            self._give_up(Failure())
            return
        try:
            temporary = self._store.create_temporary(self.digest)
        except OSError:
            _drop(response)
            self._give_up(Failure())
            if reservation is not None:
                reservation.release()
            return
        try:
            writer = self.progress = ChunkWriter(temporary, length, self._max_size)
            if reservation is not None:
                reservation.follow(lambda: writer.written)

            def failed(_: Failure) -> None:
                # Out of the table first, so that nobody joins a blob that
                # is going; then the file goes at once, not once the
                # upstream connection has closed: by then its followers have
                # been cut off already.
                self._end()
                self._store.discard(temporary)

            writer.when_finished().addErrback(failed)
            # Followers subscribe before the first byte arrives: none misses one.
            self._ready.succeed_with(Landing(length, writer, temporary))
            await self._transfer(writer, response)
            if writer.complete:
                await self._commit(temporary, writer.written)
        finally:
            self._end()
            if reservation is not None:
                reservation.release()
            temporary.close()

    async def _reserve(
        self, response: IResponse, length: int | None
    ) -> Reservation | None:
        """
        Make room in the store for a blob of declared C{length}, or drop
        C{response} and fail if there is none.
        """
        if self._evictor is None or length is None:
            return None
        try:
            return await self._evictor.reserve(self.digest, length)
        except Exception:
            _drop(response)
            raise

    def _give_up(self, reason: Failure) -> None:
        if reason.check(Abandoned):
            log.info(
                "{digest}: every client left before the upstream answered;"
                " not fetching it",
                digest=str(self.digest),
            )
        else:
            log.warn(
                "cannot fetch {digest}: {reason}",
                digest=str(self.digest),
                reason=reason.getErrorMessage(),
            )
        self._ready.fail_with(reason)

    async def _transfer(self, writer: ChunkWriter, response: IResponse | None) -> None:
        """
        Deliver C{response}'s body to C{writer}, resuming as often as the
        policy allows, until the writer is complete or has failed.
        """
        skip = 0
        attempt = 0
        reason = Failure(UpstreamError("no response"))
        while True:
            if response is not None:
                receiver = writer.receive(self._clock, self._idle_timeout, skip)
                response.deliverBody(receiver)
                try:
                    await receiver.ended
                except Exception:
                    reason = Failure()
                else:
                    writer.finish()
                if writer.complete or writer.failed:
                    if writer.failed:
                        self._log_failure(writer)
                    return
            attempt += 1
            if reason.check(RangeNotSatisfiable):
                # The upstream has nothing past the bytes on disk, and they
                # did not verify when its body ended.
                reason = Failure(
                    VerificationFailed(
                        f"body of {writer.written} bytes, all the upstream has,"
                        " does not verify"
                    )
                )
            if attempt > self._retry.retries or reason.check(
                BlobUnknown, VerificationFailed
            ):
                writer.fail(reason)
                self._log_failure(writer)
                return
            pause = self._retry.pause(attempt)
            log.warn(
                "transfer of {digest} broke after {written} bytes ({reason});"
                " resuming in {pause:g}s, attempt {attempt} of {retries}",
                digest=str(self.digest),
                written=writer.written,
                reason=reason.getErrorMessage(),
                pause=pause,
                attempt=attempt,
                retries=self._retry.retries,
            )
            await deferLater(self._clock, pause, lambda: None)
            try:
                response, skip = await self._resume(writer)
            except Exception:
                reason = Failure()
                response = None

    async def _resume(self, writer: ChunkWriter) -> tuple[IResponse, int]:
        """
        Ask the upstream for the rest of the blob, from the bytes on disk.

        @return: the response and how many of its first bytes are on disk
            already: none for a 206 that starts where asked, all before the
            offset for a 200 (an upstream that ignores C{Range}).
        """
        offset = writer.written
        response = await self._upstream.fetch_blob(self.name, self.digest, offset)
        length = response_length(response)
        if response.code == 200:
            if writer.expected_length not in (None, length):
                _drop(response)
                raise UpstreamError(f"upstream now says the blob has {length} bytes")
            return response, offset
        values = response.headers.getRawHeaders(b"content-range") or [b""]
        match = _CONTENT_RANGE.fullmatch(values[0].decode("latin-1"))
        total = writer.expected_length
        if (
            match is None
            or int(match[1]) != offset
            or (total is not None and match[3] not in ("*", str(total)))
        ):
            _drop(response)
            raise UpstreamError(f"upstream answered a range other than {offset}-")
        return response, 0

    async def _commit(self, temporary: TemporaryBlob, size: int) -> None:
        try:
            await self._store.commit(temporary)
        except Exception:
            log.failure("could not commit {digest}", digest=str(self.digest))
            return
        log.info(
            "committed {digest} ({size} bytes) in {seconds:.2f}s",
            digest=str(self.digest),
            size=size,
            seconds=self._clock.seconds() - self._started_at,
        )

    def _log_failure(self, writer: ChunkWriter) -> None:
        def describe(reason: Failure) -> None:
            log.error(
                "download of {digest} from {name} failed after {written} bytes"
                " of {expected}: {reason}",
                digest=str(self.digest),
                name=self.name,
                written=writer.written,
                expected=writer.expected_length,
                reason=reason.getErrorMessage(),
            )

        writer.when_finished().addErrback(describe)


def _drop(response: IResponse) -> None:
    """
    Close the connection of a response whose body nobody will read.
    """
    discard = Protocol()
    response.deliverBody(discard)
    if discard.transport is not None:
        IPushProducer(discard.transport).stopProducing()
