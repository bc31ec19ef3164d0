"""
L{FollowingProducer}: streams one blob from disk to one HTTP request, following
the file as it grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from blobserve.failures import why
from blobserve.fetch.writer import IBlobProgress
from blobserve.oneshot import OneShotEvent
from blobserve.serve.turns import TurnScheduler
from blobserve.serve.zerocopy import IZeroCopySink, SocketSink
from blobserve.store.files import BlobReader

log = Logger()

#: The most a producer reads from disk at once: its whole memory per client,
#: beside the transport's own buffer. Each chunk costs a pause, a resume and
#: a trip through the reactor; at 256 KiB that overhead is small beside the
#: copies (bench/: warm throughput +10-15 % over 128 KiB, RSS unchanged).
CHUNK_SIZE = 256 * 1024

#: The most read into the chunk that waits in the transport for a full
#: socket, when the rest goes with C{sendfile} but the sink cannot have the
#: producer wait for room itself (the transport holds bytes, such as a
#: part's head): that chunk is only there so that the transport pauses this
#: producer and resumes it once the socket has drained, and the socket's own
#: buffer keeps the client busy meanwhile. Just over the 64 KiB Twisted's
#: transports buffer before they pause a producer, so one chunk does it. 32
#: clients catching up at once from the page cache each held a chunk: at 256
#: KiB the heap peaked 4.5 MiB higher (bench/'s cold 256 MiB with 4
#: segments: 65-66 MiB of RSS, 61 with 80 KiB).
FULL_SOCKET_CHUNK = 80 * 1024

#: The largest body sent through the transport, behind its headers, where
#: C{sendfile} could send it: one write of both is one system call and,
#: for the 4 KiB of a config blob, one packet, where C{sendfile} after the
#: headers makes two of each.
SMALL_BODY = 16 * 1024

#: The most a producer sends with C{sendfile} in one of its turns: on a cold
#: page cache that reads from disk in the reactor's thread, and a client that
#: takes everything at once must not keep the others waiting. (What all
#: producers together send in one turn of the reactor is bounded by their
#: L{TurnScheduler}.)
SEND_PER_TURN = 1024 * 1024


@implementer(IBlobProgress)
@frozen
class CompleteBlob:
    """
    The progress of a blob that is already whole, such as a committed one.
    """

    length: int

    def when_beyond(self, offset: int) -> Deferred[int]:
        return succeed(self.length)


@frozen
class Span:
    """
    One stretch of a response body: C{head}, bytes written as they are, then
    the blob's bytes from C{start} up to, not including, C{end}.
    """

    head: bytes
    start: int
    end: int


class ClientStalled(Exception):
    """
    A client stopped reading its response for longer than the client timeout.
    """


class ShortRead(Exception):
    """
    The file on disk ended before the length it was said to have.
    """


def cut_off(request: Request, producer: IPushProducer) -> None:
    """
    Cut the connection of C{request}, whose body C{producer} was writing, so
    the client sees a truncated body rather than a complete one.
    """
    if request.producer is producer and request.channel is not None:
        request.unregisterProducer()
    transport = request.transport
    if transport is not None:
        cast(ITCPTransport, transport).abortConnection()


@implementer(IPushProducer)
class FollowingProducer:
    """
    Writes a blob to a request from a L{BlobReader}, in chunks of at most
    L{CHUNK_SIZE}, as fast as the client takes them and no faster.

    It reads only while the request's transport wants data, so a slow client
    costs one chunk of memory, never more. Where the connection allows it
    (see L{blobserve.serve.zerocopy}), whatever the socket takes goes with
    C{sendfile}, straight from the page cache, and a full socket pauses the
    producer until it has room, with nothing read into this process. It sends
    the last byte of a blob of known length only once the blob is verified, so
    a blob that fails verification never reaches a client as a complete body:
    the connection is aborted instead. It owns its reader and closes it when
    it stops, for whatever reason.
    """

    def __init__(
        self,
        request: Request,
        reader: BlobReader,
        progress: IBlobProgress,
        start: int = 0,
        end: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        clock: IReactorTime | None = None,
        client_timeout: float | None = None,
        sink_for: Callable[[Request], IZeroCopySink | None] = SocketSink.under,
        on_first_byte: Callable[[], object] | None = None,
        spans: Sequence[Span] = (),
        tail: bytes = b"",
        hold_back: bool = True,
        turns: TurnScheduler | None = None,
    ) -> None:
        """
        @param start: the offset of the first byte to send.
        @param end: the offset just past the last byte to send, if the blob's
            length is known; the response must declare C{end - start} as its
            C{Content-Length}. L{None} sends everything up to the blob's end.
        @param spans: more stretches of the body, sent one after the other
            once the bytes up to C{end} are sent (as in a multipart body).
        @param tail: bytes written once everything else is sent.
        @param hold_back: whether the byte at the blob's end (C{end} of the
            last span) waits until the blob is verified. Without it each byte
            goes as soon as it is on disk, and the body may end before the
            blob is verified.
        @param turns: shares each turn of the reactor among this response and
            the others that send bodies; without it, one of its own on
            C{clock}, and with neither, each turn sends what it can at once.
        @param client_timeout: seconds a client may take nothing (keep the
            producer paused) before its connection is dropped; needs C{clock}.
        @param sink_for: finds where the request's body may be sent without
            passing through this process, once its headers are written.
        @param on_first_byte: called once the first byte of the body is
            handed to the connection.
        """
        self._request = request
        self._reader = reader
        self._progress = progress
        self._end = end
        self._chunk_size = chunk_size
        self._offset = start
        # Body bytes handed to the connection so far, to share out turns.
        self._sent = 0
        # Whether a turn is asking for progress, which may answer at once.
        self._in_turn = False
        self._available = 0
        self._complete = False
        self._paused = False
        self._stopped = False
        self._waiting: Deferred[int] | None = None
        self._clock = clock
        self._client_timeout = client_timeout
        self._stalled_client: IDelayedCall | None = None
        self._released: OneShotEvent[None] = OneShotEvent()
        self._sink_for = sink_for
        self._sink: IZeroCopySink | None = None
        # Where a small body, sent through the transport, is flushed.
        self._flushed: IZeroCopySink | None = None
        if turns is None and clock is not None:
            turns = TurnScheduler(clock)
        self._turns = turns
        self._on_first_byte = on_first_byte
        self._spans = list(spans)
        self._tail = tail
        self._hold_back = hold_back

    def start(self) -> None:
        """
        Send the response headers at once, register with the request and
        begin writing the body.
        """
        if self._request.channel is None:
            # The client has gone already: notifyFinish would never fire.
            self._release()
            return
        try:
            # Clients give up on a response whose headers do not come: send
            # them now, not with the first body byte.
            self._request.write(b"")
            sink = self._sink_for(self._request)
            if sink is not None and self._small():
                # A small body goes through the transport behind its headers,
                # and both in one write at the end of the turn: sendfile
                # would cost a system call and a packet of its own.
                self._flushed = sink
            elif sink is not None:
                # The headers on the wire now, not in the reactor's next
                # round: the first bytes of the body can then follow them
                # with the sink in this one.
                self._sink = sink
                sink.flush()
            self._request.registerProducer(self, True)
        except BaseException:
            self._release()
            raise
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        if self._turns is None:
            self._take_turn(SEND_PER_TURN)
        else:
            # A new client's first bytes wait behind no one's catching up.
            self._turns.first(self._take_turn)

    def when_released(self) -> Deferred[None]:
        """
        Fire once the response has ended, however, and the producer has let
        go of its reader and subscription.
        """
        return self._released.observe()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._turns is not None:
            self._turns.forget(self._take_turn)
        if (
            self._clock is not None
            and self._client_timeout is not None
            and self._stalled_client is None
            and not self._stopped
        ):
            self._stalled_client = self._clock.callLater(
                self._client_timeout, self._client_stalled
            )

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_client_timer()
        self._pump()

    def stopProducing(self) -> None:
        """
        The client went away: stop, and release the reader and any
        subscription.
        """
        if not self._stopped:
            self._release()

    def _pump(self) -> None:
        """
        Send what may be sent now, or once this response's turn comes.
        """
        if self._turns is None:
            self._take_turn(SEND_PER_TURN)
        else:
            self._turns.now_or_later(self._take_turn)

    def _take_turn(self, allowance: int) -> int:
        """
        Send what may be sent, C{allowance} bytes at most with the sink; on an
        error (a failed read), abort.

        @return: how many bytes went.
        """
        before = self._sent
        try:
            self._send_available(before + min(allowance, SEND_PER_TURN))
            if self._flushed is not None:
                self._flushed.flush()
        except Exception:
            self._abort(Failure())
        return self._sent - before

    def _small(self) -> bool:
        """
        Whether the body is no more than L{SMALL_BODY} bytes, in one stretch.
        """
        return (
            self._end is not None
            and not self._spans
            and self._end - self._offset <= SMALL_BODY
        )

    def _send_available(self, until: int) -> None:
        """
        Send bytes until the body is sent, the socket is full, the bytes
        on disk run out, or L{_sent} reaches C{until} with the sink.
        """
        while not self._paused and not self._stopped:
            limit = self._available
            if self._end is not None:
                # Hold the last byte back until the blob is verified.
                held = self._hold_back and not self._complete and not self._spans
                limit = min(limit, self._end - 1 if held else self._end)
            left = until - self._sent
            if self._offset < limit and left <= 0 and self._turns is not None:
                # The socket takes more, but this turn is spent: the next one
                # comes once the reactor has served everyone else.
                self._turns.later(self._take_turn)
                return
            if self._sink is not None and left > 0:
                if self._send_from_page_cache(
                    self._sink, min(limit, self._offset + left)
                ):
                    continue
                if self._offset < limit and self._sink.wait_for_room():
                    # The socket is full: paused until it has room again,
                    # with nothing read into the process meanwhile.
                    return
            if self._offset < limit:
                size = min(self._chunk_size, limit - self._offset)
                if self._sink is not None:
                    size = min(size, FULL_SOCKET_CHUNK)
                if self._turns is not None:
                    # A chunk is part of this turn's share like the sink's
                    # bytes: beyond it, the reactor's turn is not bounded.
                    size = min(size, left)
                data = self._reader.read(self._offset, size)
                if not data:
                    self._abort(Failure(ShortRead(f"file ends at {self._offset}")))
                    return
                self._offset += len(data)
                self._sent += len(data)
                if self._on_first_byte is not None:
                    self._first_byte()
                self._request.write(data)
            elif self._offset == self._end and self._spans:
                span = self._spans.pop(0)
                self._offset, self._end = span.start, span.end
                self._request.write(span.head)
            elif self._offset == self._end or self._complete:
                self._finish()
                return
            else:
                if self._waiting is None:
                    # Bytes before the offset are of no use to this response:
                    # wake once those at the offset are there.
                    wanted = max(self._available, self._offset)
                    self._waiting = self._progress.when_beyond(wanted)
                    self._in_turn = True
                    try:
                        self._waiting.addCallbacks(self._advanced, self._failed)
                    finally:
                        self._in_turn = False
                    if self._waiting is None:
                        # It was there already: go on in this turn.
                        continue
                return

    def _send_from_page_cache(self, sink: IZeroCopySink, limit: int) -> bool:
        """
        Send what the socket takes at once, up to C{limit}, with the sink.
        When the socket is full, the sink has this producer paused until the
        socket has room again; where it cannot, what is left goes as a chunk
        through the transport, which waits for the socket and resumes this
        producer once it has drained.

        @return: whether the socket took any of it: if so, the caller asks
            again, and the sink's next answer tells a full socket (nothing,
            and it can wait for room) from a file that ended (nothing, and
            the read that follows finds it short).
        """
        count = limit - self._offset
        if count <= 0:
            return False
        sent = sink.send(self._reader, self._offset, count)
        self._offset += sent
        self._sent += sent
        if sent and self._on_first_byte is not None:
            self._first_byte()
        return sent > 0

    def _first_byte(self) -> None:
        told, self._on_first_byte = self._on_first_byte, None
        if told is not None:
            told()

    def _advanced(self, available: int) -> None:
        self._waiting = None
        if available <= self._available:
            self._complete = True
        else:
            self._available = available
        if self._in_turn or self._paused or self._stopped:
            return
        # The writer wakes every follower in its own turn as each chunk lands:
        # those beyond this turn's budget wait for a later one, and take the
        # chunks that landed meanwhile together.
        self._pump()

    def _failed(self, reason: Failure) -> None:
        self._waiting = None
        if reason.check(CancelledError) and self._stopped:
            return
        self._abort(reason)

    def _finish(self) -> None:
        if self._end is not None and self._offset != self._end:
            self._abort(
                Failure(ShortRead(f"blob ends at {self._offset}, not {self._end}"))
            )
            return
        self._release()
        self._request.unregisterProducer()
        if self._tail:
            self._request.write(self._tail)
        self._request.finish()

    def _abort(self, reason: Failure) -> None:
        """
        Cut the connection, so the client sees a truncated body rather than a
        complete one.
        """
        log.warn(
            "aborting response after {offset} bytes: {reason}",
            offset=self._offset,
            reason=why(reason),
        )
        self._release()
        cut_off(self._request, self)

    def _client_stalled(self) -> None:
        self._stalled_client = None
        self._abort(
            Failure(
                ClientStalled(f"client took nothing for {self._client_timeout:g} s")
            )
        )

    def _cancel_client_timer(self) -> None:
        if self._stalled_client is not None:
            if self._stalled_client.active():
                self._stalled_client.cancel()
            self._stalled_client = None

    def _release(self) -> None:
        if self._released.happened:
            return
        self._cancel_client_timer()
        if self._turns is not None:
            self._turns.forget(self._take_turn)
        self._stopped = True
        self._reader.close()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        self._released.succeed_with(None)
