"""
L{Download}: one fetch of one blob from the upstream into the store, resumed
where it broke off when the upstream connection fails, or where an earlier
run stopped.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import Interface, implementer

from blobserve.digest import Digest
from blobserve.failures import why
from blobserve.fetch.retry import DEFAULT_RETRY, RetryPolicy
from blobserve.fetch.segments import SegmentedTransfer, accepts_ranges
from blobserve.fetch.slots import UpstreamSlots
from blobserve.fetch.writer import (
    BlobTooLarge,
    BodyReceiver,
    ChunkWriter,
    InThread,
    VerificationFailed,
)
from blobserve.oneshot import OneShotEvent
from blobserve.store.eviction import Evictor, Reservation
from blobserve.store.files import BlobReader, IBlobStore, KeptPartial, TemporaryBlob
from blobserve.store.index import Origin
from blobserve.upstream.client import (
    IUpstream,
    RangeNotSatisfiable,
    UpstreamError,
    response_length,
)

log = Logger()

_T = TypeVar("_T")

_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


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


class Stopped(Exception):
    """
    The download was stopped before its end, because blobserve is stopping;
    what it had is kept for the next run.
    """


class Contradicted(UpstreamError):
    """
    The upstream's answer to a request from an offset does not fit the bytes
    on disk: a range that starts elsewhere, or another length of the blob.
    """


class IDownloadEvents(Interface):
    """
    Told how downloads go, for the metrics. Called in the reactor's thread,
    never per chunk.
    """

    def resumed(download: Download, cause: str) -> None:
        """
        C{download} goes on from the bytes on disk: after its transfer broke
        (C{cause} C{"broken"}), or from what an earlier run kept
        (C{"restart"}).
        """

    def digest_failed(download: Download) -> None:
        """
        C{download}'s bytes did not match its digest.
        """

    def retries_exhausted(download: Download) -> None:
        """
        C{download} failed after resuming as often as allowed.
        """

    def ended(download: Download, result: str, seconds: float) -> None:
        """
        C{download} ended C{seconds} after it started, with C{result}:
        C{committed}, C{failed}, C{abandoned} (every client left before the
        upstream answered) or C{stopped} (blobserve is stopping).
        """


@implementer(IDownloadEvents)
class IgnoredEvents:
    """
    Download events nobody is told of.
    """

    def resumed(self, download: Download, cause: str) -> None:
        pass

    def digest_failed(self, download: Download) -> None:
        pass

    def retries_exhausted(self, download: Download) -> None:
        pass

    def ended(self, download: Download, result: str, seconds: float) -> None:
        pass


#: Where a download's events go when nobody listens.
NO_EVENTS = IgnoredEvents()


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

    Its temporary file is recorded in the store as an unfinished download from
    the moment it is created. When the store holds one for the digest (left
    by an earlier run, stopped or killed), the download goes on from it: the
    bytes on disk are hashed again, and the upstream asked for the rest.
    """

    def __init__(
        self,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        store: IBlobStore,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        slots: UpstreamSlots | None = None,
        max_size: int | None = None,
        registry: str | None = None,
        evictor: Evictor | None = None,
        events: IDownloadEvents = NO_EVENTS,
        segments: int = 1,
        segment_size: int = 64 * 1024 * 1024,
        in_thread: InThread | None = None,
    ) -> None:
        """
        @param slots: bounds how many downloads talk to upstreams at once; a
            download holds one slot from its first request to its end.
        @param max_size: the largest blob fetched, in bytes: one declared
            larger is refused before anything is written, one without a
            declared length fails once it grows past it.
        @param registry: the registry C{upstream} is, as C{--upstream} names
            it: recorded with the unfinished download.
        @param evictor: makes room in the store for a blob of declared length
            before anything is written, and holds it until the download
            ends; a blob that cannot fit fails the download with
            L{blobserve.store.eviction.StoreFull}.
        @param events: told how the download goes.
        @param segments: over how many parallel range requests a fresh
            download of a blob larger than C{segment_size} is fetched, when
            its upstream declares the length and honours ranges; each one
            past the first takes an upstream slot of its own, only if one is
            free. 1 fetches every blob over one connection.
        @param segment_size: the size in bytes a blob must exceed to be
            fetched in segments.
        @param in_thread: runs the hashing of segments' bytes read back from
            disk off the reactor thread (default: the reactor's thread
            pool).
        """
        self.name = name
        self.digest = digest
        self.registry = registry
        self._upstream = upstream
        self._store = store
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._retry = retry
        self._slots = slots
        self._max_size = max_size
        self._evictor = evictor
        self._events = events
        self._segment_count = segments
        self._segment_size = segment_size
        self._in_thread = in_thread
        # The segmented transfer under way, if the blob is fetched so.
        self._segments: SegmentedTransfer | None = None
        # How it ends, for the events: failed unless it is found otherwise.
        self._result = "failed"
        # Bytes on disk before this run's first byte arrived (kept by an
        # earlier run): not fetched by this download.
        self._kept_bytes = 0
        # The room held in the store for the blob, once its length is known.
        self._reservation: Reservation | None = None
        self._ready: OneShotEvent[Landing] = OneShotEvent()
        self._done: OneShotEvent[None] = OneShotEvent()
        #: When the download started, in C{clock} seconds.
        self.started_at = 0.0
        #: What the download does now, for the status page: C{"queued"}
        #: (for an upstream slot), C{"connecting"} (waiting for the
        #: upstream's answer), C{"fetching"}, C{"resuming"} (between a broken
        #: transfer and the upstream's answer to the next), C{"committing"}
        #: (every byte in and verified).
        self.state = "queued"
        # What the download waits for before the upstream answers: a slot,
        # then the upstream's headers. Cancelled when every client has gone.
        # After that, the pause before a resume and the upstream's answer to
        # it: cancelled only by stop_and_keep.
        self._pending: Deferred[Any] | None = None
        # The receiver of the upstream body arriving now.
        self._receiver: BodyReceiver | None = None
        self._stopping = False
        #: The blob's progress, once the upstream has answered.
        self.progress: ChunkWriter | None = None

    def start(self) -> None:
        """
        Ask the upstream for the blob (once a slot is free). Call once.
        """
        self.started_at = self._clock.seconds()
        d = Deferred.fromCoroutine(self._run())
        # Not an upstream's failure, which ends the download as a result:
        # a bug, logged with its traceback.
        d.addErrback(
            lambda reason: log.failure(
                "download of {digest} failed", reason, digest=str(self.digest)
            )
        )
        d.addBoth(lambda _: self._end())

    def when_ready(self) -> Deferred[Landing]:
        """
        Fire with a L{Landing} once the upstream has answered with the blob's
        headers, or fail with the reason there will be no blob (an
        L{blobserve.upstream.client.UpstreamError}, a
        L{blobserve.fetch.slots.QueueFull}, an C{OSError} from the store,
        L{Stopped}).

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

    def stop_and_keep(self) -> Deferred[None]:
        """
        End the download early, because blobserve is stopping, keeping what
        it has for the next run: a download whose bytes have all arrived is
        verified and committed still; one whose bytes are arriving drops its
        upstream connection, and its temporary file and record stay in the
        store as an unfinished download (never removed as a failure); one
        still waiting for a slot or for the upstream's answer ends with
        nothing. Whoever still follows it fails with L{Stopped}.

        @return: fires once the download has ended (see L{when_done}).
        """
        self._stopping = True
        if self._pending is not None:
            self._pending.cancel()
        if self._receiver is not None:
            self._receiver.stop()
        if self._segments is not None:
            self._segments.stop()
        return self.when_done()

    @property
    def fetched(self) -> int:
        """
        How many bytes of the blob this download has received from its
        upstream and written (not those kept from an earlier run).
        """
        if self.progress is None:
            return 0
        return self.progress.received - self._kept_bytes

    @property
    def segments(self) -> int:
        """
        How many segments of a segmented download are being fetched (0 when
        it is fetched over one connection).
        """
        return 0 if self._segments is None else self._segments.in_flight

    @property
    def clients_waiting(self) -> int:
        """
        How many clients wait for the upstream's answer (none once it came).
        """
        return self._ready.waiting

    def _end(self) -> None:
        if not self._done.happened:
            self._events.ended(
                self, self._result, self._clock.seconds() - self.started_at
            )
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
        Wait for C{d}, which ends as L{Abandoned} if every client goes first
        (before the upstream has answered), and as L{Stopped} if the download
        is stopped.
        """
        self._pending = d
        try:
            return await d
        except CancelledError:
            if self._stopping:
                raise Stopped() from None
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
        self.state = "connecting"
        try:
            await self._fetch()
        finally:
            # Out of the table before the slot goes to the next download:
            # whatever that sets off finds no download that has ended.
            self._end()
            if self._slots is not None:
                self._slots.release()

    async def _fetch(self) -> None:
        try:
            start = await self._begin()
        except Exception:
            self._give_up(Failure())
            self._release_room()
            return
        temporary, writer = start.temporary, start.writer
        kept = False
        self.state = "fetching"
        try:
            self.progress = writer
            if self._reservation is not None:
                # Every byte landed, ahead of the prefix too, takes room.
                self._reservation.follow(lambda: writer.received)

            def failed(reason: Failure) -> None:
                nonlocal kept
                if reason.check(Stopped):
                    kept = True
                    self._result = "stopped"
                    return
                # Out of the table first, so that nobody joins a blob that
                # is going; then the file goes at once, not once the
                # upstream connection has closed: by then its followers have
                # been cut off already.
                self._end()
                self._store.discard(temporary)

            writer.when_finished().addErrback(failed)
            # Followers subscribe before the first byte arrives: none misses one.
            self._ready.succeed_with(Landing(start.length, writer, temporary))
            if not writer.complete:
                await self._transfer_any(start)
            if writer.complete:
                self.state = "committing"
                await self._commit(temporary, writer.written)
        finally:
            if kept:
                self._store.keep_partial(temporary)
            self._end()
            temporary.close()
            self._release_room()

    async def _reserve(self, response: IResponse, length: int | None) -> None:
        """
        Make room in the store for a blob of declared C{length}, or drop
        C{response} and fail if there is none.
        """
        if self._evictor is None or length is None:
            return
        try:
            self._reservation = await self._evictor.reserve(self.digest, length)
        except Exception:
            _drop(response)
            raise

    def _release_room(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    async def _begin(self) -> _Start:
        """
        Go on from the unfinished download the store holds for the digest,
        if it has one the upstream agrees with; else ask for the whole blob.
        """
        try:
            kept = await self._store.open_partial(self.digest)
        except Exception:
            log.failure(
                "cannot read the unfinished download of {digest}: starting afresh",
                digest=str(self.digest),
            )
            kept = None
        if kept is not None:
            try:
                start = await self._resume_kept(kept)
            except BaseException:
                # Nothing says its bytes are wrong: a later try goes on
                # from them.
                self._store.keep_partial(kept.temporary)
                raise
            if start is not None:
                self._kept_bytes = kept.written
                return start
        if self._stopping:
            raise Stopped()
        log.info("fetching {digest} from upstream", digest=str(self.digest))
        response = await self._before_answer(
            self._upstream.fetch_blob(self.name, self.digest)
        )
        length = response_length(response)
        self._check_size(response, length)
        await self._reserve(response, length)
        try:
            temporary = self._store.create_temporary(
                self.digest,
                Origin(self.registry, self.name, length, _header(response, b"etag")),
            )
        except OSError:
            _drop(response)
            raise
        writer = ChunkWriter(temporary, length, self._max_size)
        return _Start(temporary, writer, response, 0, length)

    async def _resume_kept(self, kept: KeptPartial) -> _Start | None:
        """
        Ask the upstream for what the unfinished download C{kept} lacks.

        @return: how to go on, or L{None} if the upstream contradicts the
            bytes on disk (it has nothing past them, or says the blob has
            another length): they are discarded.
        """
        if self._stopping:
            raise Stopped()
        origin = kept.origin
        expected = origin.expected_length
        writer = ChunkWriter.resuming(
            kept.temporary, kept.hasher, kept.written, expected, self._max_size
        )
        if writer.verifies():
            # Every byte had arrived: nothing to ask the upstream.
            log.info(
                "{digest} was whole on disk: committing it", digest=str(self.digest)
            )
            writer.finish()
            return _Start(kept.temporary, writer, None, 0, writer.written)
        self.state = "resuming"
        log.info(
            "resuming {digest} from byte {offset}, kept from a download from"
            " {registry}/{repository}",
            digest=str(self.digest),
            offset=kept.written,
            registry=origin.registry,
            repository=origin.repository,
        )
        try:
            if expected is not None and kept.written > expected:
                raise Contradicted(f"{kept.written} bytes on disk, over {expected}")
            answer = await self._before_answer(
                Deferred.fromCoroutine(self._ask_from(kept.written, expected))
            )
        except (Contradicted, RangeNotSatisfiable) as e:
            log.warn(
                "the unfinished download of {digest} cannot be resumed ({why}):"
                " starting afresh",
                digest=str(self.digest),
                why=str(e),
            )
            self._store.discard(kept.temporary)
            return None
        self._events.resumed(self, "restart")
        length = expected if expected is not None else answer.total
        try:
            self._check_size(answer.response, length)
        except BlobTooLarge:
            self._store.discard(kept.temporary)
            raise
        await self._reserve(answer.response, length)
        if length != expected:
            writer = ChunkWriter.resuming(
                kept.temporary, kept.hasher, kept.written, length, self._max_size
            )
        return _Start(kept.temporary, writer, answer.response, answer.skip, length)

    def _check_size(self, response: IResponse, length: int | None) -> None:
        if self._max_size is not None and (length or 0) > self._max_size:
            _drop(response)
            raise BlobTooLarge(
                f"the upstream declares {length} bytes, over the limit of"
                f" {self._max_size}"
            )

    def _give_up(self, reason: Failure) -> None:
        if reason.check(Abandoned):
            self._result = "abandoned"
            log.info(
                "{digest}: every client left before the upstream answered;"
                " not fetching it",
                digest=str(self.digest),
            )
        elif reason.check(Stopped):
            self._result = "stopped"
            log.info(
                "{digest}: stopped before the upstream answered",
                digest=str(self.digest),
            )
        else:
            log.warn(
                "cannot fetch {digest} of {repository} from {upstream}: {reason}",
                digest=str(self.digest),
                repository=self.name,
                upstream=self._upstream.base_url,
                reason=why(reason),
            )
        self._ready.fail_with(reason)

    async def _transfer(
        self, writer: ChunkWriter, response: IResponse | None, skip: int = 0
    ) -> None:
        """
        Deliver C{response}'s body to C{writer}, after dropping its first
        C{skip} bytes, resuming as often as the policy allows, until the
        writer is complete or has failed (with L{Stopped} when the download
        is stopped).
        """
        attempt = 0
        reason = Failure(UpstreamError("no response"))
        while True:
            if response is not None:
                receiver = self._receiver = writer.receive(
                    self._clock, self._idle_timeout, skip
                )
                response.deliverBody(receiver)
                try:
                    await receiver.ended
                except Exception:
                    reason = Failure()
                else:
                    writer.finish()
                finally:
                    self._receiver = None
                if writer.complete or writer.failed:
                    if writer.failed:
                        self._log_failure(writer)
                    return
            if self._stopping:
                self._keep(writer)
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
            if self._retry.gives_up(attempt, reason):
                if self._retry.exhausted(attempt):
                    self._events.retries_exhausted(self)
                writer.fail(reason)
                self._log_failure(writer)
                return
            pause = self._retry.pause(attempt)
            self._events.resumed(self, "broken")
            self.state = "resuming"
            log.warn(
                "transfer of {digest} of {repository} from {upstream} broke after"
                " {written} bytes ({reason}); resuming in {pause:g}s, attempt"
                " {attempt} of {retries}",
                digest=str(self.digest),
                repository=self.name,
                upstream=self._upstream.base_url,
                written=writer.written,
                reason=why(reason),
                pause=pause,
                attempt=attempt,
                retries=self._retry.retries,
            )
            try:
                await self._before_answer(deferLater(self._clock, pause, lambda: None))
                answer = await self._before_answer(
                    Deferred.fromCoroutine(
                        self._ask_from(writer.written, writer.expected_length)
                    )
                )
                response, skip = answer.response, answer.skip
                self.state = "fetching"
            except Exception:
                reason = Failure()
                response = None

    async def _transfer_any(self, start: _Start) -> None:
        """
        Deliver the blob over several segments if it is fresh, large, of
        declared length from an upstream that honours ranges, and upstream
        slots are free for the extra segments; else over one stream, as
        L{_transfer}.
        """
        response, length = start.response, start.length
        if (
            self._segment_count <= 1
            or response is None
            or response.code != 200
            or start.skip
            or self._kept_bytes
            or length is None
            or length <= self._segment_size
            or not accepts_ranges(response)
        ):
            await self._transfer(start.writer, response, start.skip)
            return
        segments = SegmentedTransfer(
            self._upstream,
            self.name,
            self.digest,
            start.writer,
            self._clock,
            self._idle_timeout,
            self._retry,
            self._slots,
            resumed=lambda: self._events.resumed(self, "broken"),
            exhausted=lambda: self._events.retries_exhausted(self),
        )
        extra = segments.take_slots(self._segment_count - 1)
        if extra:
            try:
                start.writer.segmented(self._in_thread or deferToThread)
            except OSError as e:
                segments.give_back(extra)
                extra = 0
                log.warn(
                    "cannot read {digest} back to hash its segments ({why}):"
                    " fetching it over one connection",
                    digest=str(self.digest),
                    why=str(e),
                )
        if not extra:
            await self._transfer(start.writer, response, start.skip)
            return
        self._segments = segments
        try:
            await segments.run(response, length, extra)
        finally:
            self._segments = None
        writer = start.writer
        if writer.failed:
            self._log_failure(writer)
        elif self._stopping and not writer.complete:
            # Only the contiguous prefix is worth keeping: the next run
            # resumes from its end over one stream.
            try:
                start.temporary.truncate(writer.written)
            except OSError:
                writer.fail(Failure())
                return
            self._keep(writer)

    def _keep(self, writer: ChunkWriter) -> None:
        """
        Stop C{writer} short for the next run to go on from its bytes.
        """
        log.info(
            "stopped {digest} after {written} bytes of {expected}: kept for"
            " the next start",
            digest=str(self.digest),
            written=writer.written,
            expected=writer.expected_length,
        )
        writer.fail(Failure(Stopped("blobserve is stopping")))

    async def _ask_from(self, offset: int, expected_length: int | None) -> _Answer:
        """
        Ask the upstream for the blob from byte C{offset} on (the bytes on
        disk), whose length is C{expected_length} if known.

        @return: the response, how many of its first bytes are on disk
            already (none for a 206 that starts where asked, all before the
            offset for a 200: an upstream that ignores C{Range}), and the
            blob's length if the upstream says it.
        @raise Contradicted: if the upstream answers a range that does not
            start at C{offset}, or says the blob has another length.
        """
        response = await self._upstream.fetch_blob(self.name, self.digest, offset)
        length = response_length(response)
        if response.code == 200:
            if expected_length not in (None, length):
                _drop(response)
                raise Contradicted(f"upstream now says the blob has {length} bytes")
            return _Answer(response, offset, length)
        values = response.headers.getRawHeaders(b"content-range") or [b""]
        match = _CONTENT_RANGE.fullmatch(values[0].decode("latin-1"))
        if (
            match is None
            or int(match[1]) != offset
            or (
                expected_length is not None
                and match[3] not in ("*", str(expected_length))
            )
        ):
            _drop(response)
            raise Contradicted(f"upstream answered a range other than {offset}-")
        total = None if match[3] == "*" else int(match[3])
        return _Answer(response, 0, total)

    async def _commit(self, temporary: TemporaryBlob, size: int) -> None:
        try:
            await self._store.commit(temporary)
        except OSError as e:
            # The disk's failure (full, read-only), not blobserve's: one line.
            log.error(
                "could not commit {digest}: {reason}",
                digest=str(self.digest),
                reason=why(e),
            )
            return
        except Exception:
            log.failure("could not commit {digest}", digest=str(self.digest))
            return
        self._result = "committed"
        log.info(
            "committed {digest} ({size} bytes) in {seconds:.2f}s",
            digest=str(self.digest),
            size=size,
            seconds=self._clock.seconds() - self.started_at,
        )

    def _log_failure(self, writer: ChunkWriter) -> None:
        def describe(reason: Failure) -> None:
            if reason.check(Stopped):
                return
            if reason.check(VerificationFailed):
                self._events.digest_failed(self)
            log.error(
                "download of {digest} of {repository} from {upstream} failed"
                " after {written} bytes of {expected}: {reason}",
                digest=str(self.digest),
                repository=self.name,
                upstream=self._upstream.base_url,
                written=writer.written,
                expected=writer.expected_length,
                reason=why(reason),
            )

        writer.when_finished().addErrback(describe)


@frozen
class _Start:
    """
    How a download goes on once the upstream has answered (or once the
    store is found to hold the whole blob: then there is no response).
    """

    temporary: TemporaryBlob
    writer: ChunkWriter
    response: IResponse | None
    skip: int
    length: int | None


@frozen
class _Answer:
    """
    The upstream's answer to a request from an offset (see
    L{Download._ask_from}).
    """

    response: IResponse
    skip: int
    total: int | None


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _drop(response: IResponse) -> None:
    """
    Close the connection of a response whose body nobody will read.
    """
    discard = Protocol()
    response.deliverBody(discard)
    if discard.transport is not None:
        IPushProducer(discard.transport).stopProducing()
