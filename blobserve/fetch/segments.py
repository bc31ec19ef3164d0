"""
L{SegmentedTransfer}: one large blob fetched over several parallel range
requests, each landing its bytes at their offsets through a L{ChunkWriter}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from attrs import define
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from blobserve.digest import Digest
from blobserve.failures import why
from blobserve.fetch.retry import RetryPolicy
from blobserve.fetch.slots import UpstreamSlots
from blobserve.fetch.writer import BodyReceiver, ChunkWriter
from blobserve.upstream.client import (
    IUpstream,
    RangeIgnored,
    UpstreamError,
)

log = Logger()

_T = TypeVar("_T")


def plan_segments(length: int, count: int) -> list[tuple[int, int]]:
    """
    Split C{[0, length)} (C{length} > 0) into at most C{count} adjacent,
    non-empty ranges C{[start, end)}, the first starting at 0 and the last
    ending at C{length}, all of C{ceil(length / count)} bytes but the last,
    which may be shorter; fewer than C{count} when ranges of that size reach
    the end sooner (5 bytes in 4 go as 2, 2 and 1).
    """
    # Rounded up: ceil(length / step) ranges, never more than count.
    step = -(-length // count)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def accepts_ranges(response: IResponse) -> bool:
    """
    Whether C{response} says its upstream honours byte ranges.
    """
    values = response.headers.getRawHeaders(b"accept-ranges") or []
    return any(
        token.strip().lower() == b"bytes"
        for value in values
        for token in value.split(b",")
    )


@define
class _Segment:
    """
    One range of the blob, C{[pos, end)} still to fetch; C{slot} if it holds
    an upstream slot of its own.
    """

    index: int
    pos: int
    end: int
    slot: bool

    @property
    def done(self) -> bool:
        return self.pos >= self.end


class SegmentReceiver(BodyReceiver):
    """
    Receives the body of one segment into a segmented L{ChunkWriter}, at the
    segment's offsets, and drops the connection once the segment's end is
    reached (the first segment is the start of a whole-blob response).
    """

    def __init__(
        self,
        writer: ChunkWriter,
        clock: IReactorTime,
        idle_timeout: float,
        segment: _Segment,
        skip: int = 0,
    ) -> None:
        super().__init__(writer, clock, idle_timeout, skip)
        self._segment = segment

    def _deliver(self, data: bytes) -> None:
        segment = self._segment
        data = data[: max(0, segment.end - segment.pos)]
        if data:
            self._writer.write_at(segment.pos, data)
            segment.pos += len(data)
        if segment.done:
            self.stop()


class SegmentedTransfer:
    """
    Fetches a blob of known length over several connections at once.

    The first segment is the body of the upstream's answer to the plain
    request, cut where the second begins; each other one is a C{Range}
    request holding an upstream slot of its own. A segment that breaks is
    resumed on its own from where it stopped, as a single transfer is; when
    the retries run out, the blob fails. When the upstream answers a segment
    with the whole blob or another range, the transfer falls back to a
    single stream: the first segment runs to the end if it is still
    receiving, else one request goes on from the contiguous prefix.
    """

    def __init__(
        self,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        writer: ChunkWriter,
        clock: IReactorTime,
        idle_timeout: float,
        retry: RetryPolicy,
        slots: UpstreamSlots | None,
        resumed: Callable[[], None],
        exhausted: Callable[[], None],
    ) -> None:
        self._upstream = upstream
        self._name = name
        self._digest = digest
        self._writer = writer
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._retry = retry
        self._slots = slots
        self._resumed = resumed
        self._exhausted = exhausted
        self._segments: list[_Segment] = []
        self._receivers: dict[int, BodyReceiver] = {}
        self._pending: dict[int, Deferred[Any]] = {}
        self._single = False
        self._stopping = False

    @property
    def in_flight(self) -> int:
        """
        How many segments are receiving or asking for bytes.
        """
        return sum(1 for segment in self._segments if not segment.done)

    def take_slots(self, wanted: int) -> int:
        """
        Take up to C{wanted} upstream slots for extra segments, only those
        free now (never queuing ahead of downloads clients wait for).

        @return: how many were taken.
        """
        taken = 0
        while taken < wanted and (self._slots is None or self._slots.free):
            if self._slots is not None:
                self._slots.acquire()
            taken += 1
        return taken

    def give_back(self, count: int) -> None:
        """
        Give back C{count} of the slots L{take_slots} took, unused.
        """
        if self._slots is not None:
            for _ in range(count):
                self._slots.release()

    async def run(self, response: IResponse, length: int, extra: int) -> None:
        """
        Fetch the blob over C{1 + extra} segments (C{extra} slots taken with
        L{take_slots}), the first being C{response}'s body, until every
        segment is in or the writer has failed, then finish the writer and
        wait for its verdict. Stopped by L{stop}.
        """
        bounds = plan_segments(length, 1 + extra)
        self._segments = [
            _Segment(index, start, end, index > 0)
            for index, (start, end) in enumerate(bounds)
        ]
        # A blob too short for as many segments as slots were taken.
        self.give_back(1 + extra - len(self._segments))
        log.info(
            "fetching {digest} ({length} bytes) over {count} segments",
            digest=str(self._digest),
            length=length,
            count=len(self._segments),
        )
        self._writer.when_finished().addErrback(lambda _: self.stop())
        fetches = [
            Deferred.fromCoroutine(
                self._fetch(segment, response if segment.index == 0 else None)
            )
            for segment in self._segments
        ]
        await DeferredList(fetches, consumeErrors=True)
        if self._stopping or self._writer.failed:
            return
        self._writer.finish()
        try:
            await self._writer.when_finished()
        except Exception:
            return

    def stop(self) -> None:
        """
        Drop every segment's connection and request.
        """
        self._stopping = True
        for d in list(self._pending.values()):
            d.cancel()
        for receiver in list(self._receivers.values()):
            receiver.stop()

    async def _wait(self, segment: _Segment, d: Deferred[_T]) -> _T:
        self._pending[segment.index] = d
        try:
            return await d
        finally:
            self._pending.pop(segment.index, None)

    async def _fetch(self, segment: _Segment, response: IResponse | None) -> None:
        try:
            await self._fetch_segment(segment, response)
        except Exception:
            # Not an upstream's doing (those end the segment as a result): a
            # bug. Said with its traceback, and the blob fails with it, not
            # later as a hole mistaken for a short body.
            reason = Failure()
            log.failure(
                "segment {segment} of {digest} failed",
                reason,
                segment=segment.index,
                digest=str(self._digest),
            )
            self._writer.fail(reason)
        finally:
            if segment.slot and self._slots is not None:
                segment.slot = False
                self._slots.release()

    async def _fetch_segment(
        self, segment: _Segment, response: IResponse | None
    ) -> None:
        writer = self._writer
        attempt = 0
        skip = 0
        reason = Failure(UpstreamError("no response"))
        while True:
            if response is None:
                response, skip, reason = await self._ask(segment, attempt, reason)
            if response is not None:
                reason = await self._receive(segment, response, skip)
                response = None
            if segment.done or writer.failed or writer.complete or self._stopping:
                return
            attempt += 1
            if self._retry.gives_up(attempt, reason):
                if self._retry.exhausted(attempt):
                    self._exhausted()
                writer.fail(reason)
                return
            self._resumed()
            log.warn(
                "segment {segment} of {digest} broke at byte {offset} ({reason});"
                " resuming in {pause:g}s, attempt {attempt} of {retries}",
                segment=segment.index,
                digest=str(self._digest),
                offset=segment.pos,
                reason=why(reason),
                pause=self._retry.pause(attempt),
                attempt=attempt,
                retries=self._retry.retries,
            )

    async def _receive(
        self, segment: _Segment, response: IResponse, skip: int
    ) -> Failure:
        """
        Deliver C{response}'s body to C{segment}, after dropping its first
        C{skip} bytes.

        @return: why it ended, should the segment not be done.
        """
        receiver = SegmentReceiver(
            self._writer, self._clock, self._idle_timeout, segment, skip
        )
        self._receivers[segment.index] = receiver
        response.deliverBody(receiver)
        try:
            await receiver.ended
        except Exception:
            return Failure()
        finally:
            del self._receivers[segment.index]
        return Failure(UpstreamError(f"segment body ended at byte {segment.pos}"))

    async def _ask(
        self, segment: _Segment, attempt: int, reason: Failure
    ) -> tuple[IResponse | None, int, Failure]:
        """
        Ask the upstream for the rest of C{segment}, after the pause before
        attempt C{attempt} (none before the first).

        @return: the response, if any, how many of its first bytes to skip,
            and why there is none.
        """
        try:
            if attempt:
                await self._wait(
                    segment,
                    deferLater(self._clock, self._retry.pause(attempt), lambda: None),
                )
            if segment.done or self._stopping:
                return None, 0, reason
            if not self._single:
                response = await self._wait(
                    segment,
                    self._upstream.fetch_blob(
                        self._name, self._digest, segment.pos, segment.end
                    ),
                )
                return response, 0, reason
            # The single stream after a fallback: from the offset on, a 200
            # read past what is on disk.
            response = await self._wait(
                segment,
                self._upstream.fetch_blob(self._name, self._digest, segment.pos),
            )
            return response, segment.pos if response.code == 200 else 0, reason
        except RangeIgnored:
            pass
        except Exception:
            # Cancelled too: the segment has ended, or the transfer stops.
            return None, 0, Failure()
        try:
            rest, skip = await self._fall_back(segment)
        except Exception:
            return None, 0, Failure()
        return rest, skip, reason

    async def _fall_back(self, segment: _Segment) -> tuple[IResponse | None, int]:
        """
        The upstream ignored C{segment}'s range: let one stream fetch the
        rest, and end every other segment.

        @return: what C{segment} goes on with: no response if the first
            segment carries the rest (C{segment} ends), else the answer to
            a request from the contiguous prefix, with how many of its
            first bytes to skip.
        """
        log.warn(
            "the upstream ignored the range of segment {segment} of {digest}:"
            " fetching the rest over one connection",
            segment=segment.index,
            digest=str(self._digest),
        )
        self._single = True
        length = self._segments[-1].end
        first = self._segments[0]
        carrier = first if not first.done else segment
        for other in self._segments:
            if other is not carrier:
                other.end = other.pos
                receiver = self._receivers.get(other.index)
                if receiver is not None:
                    receiver.stop()
                pending = self._pending.get(other.index)
                if pending is not None:
                    pending.cancel()
        carrier.end = length
        if carrier is first:
            return None, 0
        segment.pos = self._writer.written
        response = await self._wait(
            segment, self._upstream.fetch_blob(self._name, self._digest, segment.pos)
        )
        return response, segment.pos if response.code == 200 else 0
