"""
L{ChunkWriter}, which lands a blob on disk and tells observers how far it got,
and L{BodyReceiver}, the protocol that feeds it one upstream response body.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import Interface, implementer

from blobserve.digest import Digest, Hasher
from blobserve.oneshot import OneShotEvent
from blobserve.store.files import BlobReader, TemporaryBlob

#: How many bytes that landed ahead of the hash are read back and hashed in
#: one job off the reactor thread.
HASH_CHUNK = 4 * 1024 * 1024

#: How many bytes of a hash job are read back from the file at once: the
#: size of the buffer a segmented blob holds while it downloads. 256 KiB
#: reads are few enough (16 a job) and keep 768 KiB of RSS a download off
#: what 1 MiB held.
READ_BACK = 256 * 1024

#: Runs a blocking call off the reactor thread (C{deferToThread}'s shape).
InThread = Callable[[Callable[[], None]], Deferred[None]]


class VerificationFailed(Exception):
    """
    A downloaded body is not the blob it claims to be: wrong length or digest.
    """


class BlobTooLarge(Exception):
    """
    A blob is larger than blobserve is allowed to store.
    """


class UpstreamStalled(Exception):
    """
    The upstream sent no body bytes for longer than the idle timeout.
    """


class IBlobProgress(Interface):
    """
    How much of a blob is on disk, for a reader that follows it.
    """

    def when_beyond(offset: int) -> Deferred[int]:
        """
        Fire with the length on disk once it exceeds C{offset}; once the blob
        is complete and verified, fire with its final length at once, so a
        result that does not exceed C{offset} means "complete, no more bytes".
        Fail if the blob will never be complete. Cancelling unsubscribes.
        """


@implementer(IBlobProgress)
class ChunkWriter:
    """
    Appends a blob's bytes to a L{TemporaryBlob}, hashing them as they come,
    and tells observers how much of it is on disk.

    The bytes may come in several upstream bodies (a transfer resumed after a
    break), each fed by a L{BodyReceiver}. Observers are told the I{state} (a
    length, the end, a failure), never the bytes: they read those from disk.
    The blob is complete only once L{finish} has verified its length and
    digest, so no observer is ever told that an unverified blob is whole; a
    break between bodies is only a pause to them.

    @ivar written: how many bytes are on disk so far.
    """

    def __init__(
        self,
        temporary: TemporaryBlob,
        expected_length: int | None,
        max_length: int | None = None,
    ) -> None:
        """
        @param expected_length: the upstream's C{Content-Length}, if it sent one.
        @param max_length: the most bytes the blob may have: more fail it with
            L{BlobTooLarge}.
        """
        self.written = 0
        self.expected_length = expected_length
        self._max_length = max_length
        self._temporary = temporary
        self._hasher = temporary.digest.hasher()
        self._observers: list[tuple[int, Deferred[int]]] = []
        self._finished: OneShotEvent[int] = OneShotEvent()
        self._complete = False
        self._failure: Failure | None = None
        # Set by segmented(): bytes may then land anywhere, and those that
        # land ahead of the hash are read back and hashed in a thread.
        self._in_thread: InThread | None = None
        self._reader: BlobReader | None = None
        self._read_back = bytearray()
        # Landed ranges beyond the contiguous prefix, [start, end), sorted.
        self._landed: list[tuple[int, int]] = []
        self._hashed = 0
        self._hashing = False
        self._finishing = False

    @classmethod
    def resuming(
        cls,
        temporary: TemporaryBlob,
        hasher: Hasher,
        written: int,
        expected_length: int | None,
        max_length: int | None = None,
    ) -> ChunkWriter:
        """
        A writer that goes on from the C{written} bytes on disk in
        C{temporary} (open for appending), whose hash is C{hasher}: an
        unfinished download of an earlier run. Observers are told of those
        bytes at once; nothing says they are right until L{finish} verifies
        the whole blob.
        """
        writer = cls(temporary, expected_length, max_length)
        writer._hasher = hasher
        writer.written = written
        return writer

    def segmented(self, in_thread: InThread) -> None:
        """
        Let the bytes land at any offset (with L{write_at}), for a blob
        fetched in segments. L{written} stays the contiguous prefix from 0,
        all that observers are told of; bytes that land ahead of the hash
        are read back from the file and hashed in order by C{in_thread}, one
        bounded job at a time, and L{finish} verifies once the hash has
        caught up. Call before any byte lands.

        @raise OSError: if the file cannot be opened for reading back; the
            writer is then unchanged.
        """
        self._reader = self._temporary.open_reader()
        # One buffer for every read-back, reused: a new 1 MiB object per
        # read raises glibc's mmap threshold and leaves the heap, and the
        # process's peak RSS, a few MiB larger (bench: 65 MiB against 69).
        self._read_back = bytearray(READ_BACK)
        self._in_thread = in_thread
        self._hashed = self.written
        self._finished.observe().addBoth(self._close_reader)

    @property
    def received(self) -> int:
        """
        How many bytes of the blob are on disk, the contiguous prefix and
        those landed beyond it.
        """
        return self.written + sum(end - start for start, end in self._landed)

    @property
    def complete(self) -> bool:
        """
        Whether the whole body is on disk and verified.
        """
        return self._complete

    @property
    def observers(self) -> int:
        """
        How many observers wait for bytes beyond the written length.
        """
        return len(self._observers)

    @property
    def failed(self) -> bool:
        """
        Whether the blob will never be complete.
        """
        return self._failure is not None

    def receive(
        self, clock: IReactorTime, idle_timeout: float, skip: int = 0
    ) -> BodyReceiver:
        """
        A protocol to deliver one upstream body to, which appends it to this
        blob after dropping its first C{skip} bytes (already on disk).
        """
        return BodyReceiver(self, clock, idle_timeout, skip)

    def when_beyond(self, offset: int) -> Deferred[int]:
        if self._failure is not None:
            return fail(self._failure)
        if self.written > offset or self._complete:
            return succeed(self.written)

        def cancel(d: Deferred[int]) -> None:
            self._observers.remove((offset, d))

        d: Deferred[int] = Deferred(cancel)
        self._observers.append((offset, d))
        return d

    def when_finished(self) -> Deferred[int]:
        """
        Fire with the final length once the blob is complete and verified, or
        fail with the reason it never will be.
        """
        return self._finished.observe()

    def append(self, data: bytes) -> None:
        """
        Add C{data} at the end of the blob and tell the observers.

        A write error, or more bytes than the expected or the largest length,
        fails the blob.
        """
        if self._complete or self._failure is not None:
            return
        if self._max_length is not None and self.written + len(data) > self._max_length:
            self.fail(
                Failure(
                    BlobTooLarge(
                        f"the blob grows past the limit of {self._max_length} bytes"
                    )
                )
            )
            return
        try:
            self._temporary.write(data)
        except OSError:
            self.fail(Failure())
            return
        self._hasher.update(data)
        self.written += len(data)
        if self.expected_length is not None and self.written > self.expected_length:
            self.fail(
                Failure(
                    VerificationFailed(
                        f"upstream sent more than its Content-Length of"
                        f" {self.expected_length} bytes"
                    )
                )
            )
            return
        self._notify()

    def write_at(self, offset: int, data: bytes) -> None:
        """
        Write C{data} at C{offset} of a L{segmented} blob and tell the
        observers how far the contiguous prefix now reaches.

        Bytes of the contiguous prefix already on disk are not written again:
        they may have been hashed already, and the file must stay what the
        hash saw (a fallback's stream sends them again).

        A write error, or bytes past the expected length, fails the blob.
        """
        if self._complete or self._failure is not None:
            return
        if offset < self.written:
            data = data[self.written - offset :]
            offset = self.written
            if not data:
                return
        end = offset + len(data)
        if self.expected_length is not None and end > self.expected_length:
            self.fail(
                Failure(
                    VerificationFailed(
                        f"upstream sent bytes past its Content-Length of"
                        f" {self.expected_length} bytes"
                    )
                )
            )
            return
        try:
            self._temporary.write_at(offset, data)
        except OSError:
            self.fail(Failure())
            return
        if offset == self._hashed == self.written and not self._hashing:
            # The next bytes of the prefix, in hand: no need to read them back.
            self._hasher.update(data)
            self._hashed = end
        self._land(offset, end)
        self._notify()
        self._hash_ahead()

    def _land(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in self._landed:
            if b < start or a > end:
                merged.append((a, b))
            else:
                start, end = min(a, start), max(b, end)
        merged.append((start, end))
        merged.sort()
        while merged and merged[0][0] <= self.written:
            self.written = max(self.written, merged.pop(0)[1])
        self._landed = merged

    def _hash_ahead(self) -> None:
        """
        Hash the next bytes of the prefix that were not hashed as they came,
        reading them back in a thread; when the hash reaches the end of a
        finished body, verify it.
        """
        if self._hashing or self._in_thread is None or self._reader is None:
            return
        if self._complete or self._failure is not None:
            return
        if self._hashed >= self.written:
            if self._finishing:
                self._finishing = False
                self.finish()
            return
        start = self._hashed
        size = min(HASH_CHUNK, self.written - start)
        reader, hasher = self._reader, self._hasher
        self._hashing = True

        def hashed(_: None) -> None:
            self._job_done()
            self._hashed = start + size
            self._hash_ahead()

        def failed(reason: Failure) -> None:
            self._job_done()
            self.fail(reason)

        # maybeDeferred: a job that cannot even start fails the blob too.
        # addErrback after addCallback: what raises in hashed (the next job
        # refused, the verdict) fails the blob rather than leaving it waiting.
        buffer = self._read_back
        maybeDeferred(
            self._in_thread, lambda: _hash_range(reader, hasher, start, size, buffer)
        ).addCallback(hashed).addErrback(failed)

    def _job_done(self) -> None:
        self._hashing = False
        if self._finished.happened:
            # The blob ended while the job was reading: its turn to close.
            self._close_reader(None)

    def _close_reader(self, _: object) -> None:
        # Its own observer of the end: what the end was is the others' to see.
        if self._hashing:
            # A job reads from it in a thread: closed once the job is done,
            # or its descriptor could be closed, even reused, under the read.
            return
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._read_back = bytearray()

    def verifies(self) -> bool:
        """
        Whether the bytes so far are the whole blob: its length, if known, and
        its digest. Nothing changes: L{finish} still has to say so.
        """
        if self.expected_length not in (None, self.written):
            return False
        return self._hasher.copy().hexdigest() == self._temporary.digest.hex

    def finish(self) -> None:
        """
        The upstream says the body is whole: verify its length and digest, and
        tell everyone the blob is complete, or failed.
        """
        if self._complete or self._failure is not None:
            return
        if self._in_thread is not None and (
            self._hashing or self._hashed < self.written
        ):
            # Segmented, and the hash is behind: verify once it catches up.
            self._finishing = True
            return
        digest = self._temporary.digest
        actual = Digest(digest.algorithm, self._hasher.hexdigest())
        if self.expected_length is not None and self.written != self.expected_length:
            self.fail(
                Failure(
                    VerificationFailed(
                        f"upstream sent {self.written} of {self.expected_length} bytes"
                    )
                )
            )
        elif actual != digest:
            self.fail(
                Failure(
                    VerificationFailed(
                        f"body of {self.written} bytes has digest {actual},"
                        f" not {digest}"
                    )
                )
            )
        else:
            self._complete = True
            self._notify()
            self._finished.succeed_with(self.written)

    def fail(self, reason: Failure) -> None:
        """
        Give the blob up: every observer, present and future, gets C{reason}.
        """
        if self._complete or self._failure is not None:
            return
        self._failure = reason
        waiting, self._observers = self._observers, []
        for _, d in waiting:
            d.errback(reason)
        self._finished.fail_with(reason)

    def _notify(self) -> None:
        if self._complete:
            ready, self._observers = self._observers, []
        else:
            ready = [(o, d) for o, d in self._observers if o < self.written]
            if not ready:
                return
            self._observers = [(o, d) for o, d in self._observers if o >= self.written]
        for _, d in ready:
            d.callback(self.written)


class BodyReceiver(Protocol):
    """
    Receives one upstream response body into a L{ChunkWriter}.

    It drops the connection when the upstream sends nothing for
    C{idle_timeout} seconds, or when the writer has failed. L{ended} says how
    the body ended; the writer is neither finished nor failed by a break, so
    the transfer can be resumed.

    @ivar ended: fires when the body ended cleanly, or fails with the reason
        it broke off (L{UpstreamStalled} after the idle timeout).
    """

    def __init__(
        self, writer: ChunkWriter, clock: IReactorTime, idle_timeout: float, skip: int
    ) -> None:
        self.ended: Deferred[None] = Deferred()
        self._writer = writer
        self._skip = skip
        self._idle_timeout = idle_timeout
        self._stall: Failure | None = None
        self._idle: IDelayedCall | None = clock.callLater(idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._idle is not None:
            self._idle.reset(self._idle_timeout)
        if data:
            self._deliver(data)
        if self._writer.failed:
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.ended.called:
            return
        if self._stall is not None:
            self.ended.errback(self._stall)
        elif reason.check(PotentialDataLoss) and not self._writer.verifies():
            # How a body without Content-Length or chunking ends: by closing,
            # whether it ended or broke. Whole if its digest says so; if not,
            # a break, to resume (an upstream with nothing past it answers the
            # resume with 416).
            self.ended.errback(reason)
        elif not reason.check(ResponseDone, PotentialDataLoss):
            self.ended.errback(reason)
        elif self._skip:
            self.ended.errback(
                Failure(
                    VerificationFailed("upstream body ended before the resumed offset")
                )
            )
        else:
            self.ended.callback(None)

    def _deliver(self, data: bytes) -> None:
        """
        Write C{data}, the next bytes of the body, to the writer.
        """
        self._writer.append(data)

    def stop(self) -> None:
        """
        Drop the upstream connection: the body ends as a break, with the
        bytes received so far written.
        """
        self._stop()

    def _stalled(self) -> None:
        self._idle = None
        self._stall = Failure(
            UpstreamStalled(f"no body bytes from upstream for {self._idle_timeout:g} s")
        )
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


def _hash_range(
    reader: BlobReader, hasher: Hasher, start: int, size: int, buffer: bytearray
) -> None:
    """
    Feed C{hasher} the C{size} bytes of C{reader} from C{start}, read into
    C{buffer} piece by piece. Blocking: run it in a thread.
    """
    view = memoryview(buffer)
    end = start + size
    while start < end:
        count = reader.read_into(start, view[: min(len(view), end - start)])
        if not count:
            raise OSError(f"the temporary file ends at {start}, before {end}")
        hasher.update(view[:count])
        start += count
