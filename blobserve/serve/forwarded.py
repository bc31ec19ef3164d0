"""
L{ForwardedRange}: streams the upstream's answer to one range request through
to one client, without storing it: how a range that lies far beyond the bytes
of a download on disk is answered at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from blobserve.failures import why
from blobserve.oneshot import OneShotEvent
from blobserve.serve.producer import cut_off

log = Logger()


class RangeCutShort(Exception):
    """
    The upstream's answer to a range ended before, or went on after, the
    bytes asked for; or it sent nothing for too long.
    """


@implementer(IPushProducer)
class ForwardedRange:
    """
    Writes the body of an upstream's 206 answer of C{length} bytes to a
    request, as the upstream sends it.

    Its memory is bounded by the transports' buffers: while the client's
    connection is full the upstream's is paused, so the upstream sends no
    faster than the client reads. When the client goes, the upstream
    connection is dropped. When the upstream's answer fails, ends short or
    stalls, the client's connection is cut, so it sees a truncated body,
    never a complete one.
    """

    def __init__(
        self,
        request: Request,
        response: IResponse,
        length: int,
        clock: IReactorTime | None,
        idle_timeout: float = 30.0,
        client_timeout: float | None = None,
        on_first_byte: Callable[[], object] | None = None,
    ) -> None:
        """
        @param clock: times the upstream and the client; L{None}: no timeouts.
        @param idle_timeout: seconds the upstream may send nothing while the
            client waits before both connections are dropped.
        @param client_timeout: seconds a client may take nothing (keep the
            upstream paused) before both are dropped; L{None}: no limit.
        @param on_first_byte: called once the first byte of the body is
            handed to the client's connection.
        """
        self._request = request
        self._response = response
        self._left = length
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._client_timeout = client_timeout
        self._on_first_byte = on_first_byte
        self._upstream: ITransport | None = None
        self._paused = False
        self._timer: IDelayedCall | None = None
        self._released: OneShotEvent[None] = OneShotEvent()

    def start(self) -> None:
        """
        Send the response headers at once, register with the request and
        begin taking the upstream's body.
        """
        if getattr(self._request, "channel", None) is None:
            # The client has gone already: the upstream's body is dropped
            # as soon as it is taken.
            self._release()
            self._response.deliverBody(_Body(self))
            return
        self._request.write(b"")
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._watch()
        # Last: a body the upstream has sent whole already is delivered, and
        # the response finished, within this call.
        self._response.deliverBody(_Body(self))

    def when_released(self) -> Deferred[None]:
        """
        Fire once the response has ended, however, and the upstream
        connection is let go.
        """
        return self._released.observe()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._upstream is not None:
            cast(IPushProducer, self._upstream).pauseProducing()
        self._watch()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._upstream is not None:
            cast(IPushProducer, self._upstream).resumeProducing()
        self._watch()

    def stopProducing(self) -> None:
        """
        The client went away: drop the upstream connection.
        """
        self._release()

    def _connected(self, transport: ITransport) -> None:
        self._upstream = transport
        if self._released.happened:
            cast(IPushProducer, transport).stopProducing()
        elif self._paused:
            cast(IPushProducer, transport).pauseProducing()

    def _received(self, data: bytes) -> None:
        if self._released.happened:
            return
        if len(data) > self._left:
            self._abort(Failure(RangeCutShort("upstream sent more than asked for")))
            return
        self._left -= len(data)
        if self._timer is not None and not self._paused:
            # (While the client is paused, the timer is the client's.)
            self._timer.reset(self._idle_timeout)
        self._request.write(data)
        if data and self._on_first_byte is not None:
            told, self._on_first_byte = self._on_first_byte, None
            told()

    def _ended(self, reason: Failure) -> None:
        if self._released.happened:
            return
        if self._left == 0 and reason.check(ResponseDone, PotentialDataLoss):
            self._release()
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._abort(reason)

    def _watch(self) -> None:
        """
        Time the side that keeps the response waiting: the client while it is
        paused, the upstream while it is not.
        """
        self._cancel_timer()
        if self._released.happened or self._clock is None:
            return
        timeout = self._client_timeout if self._paused else self._idle_timeout
        if timeout is not None:
            self._timer = self._clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        whom = "client took" if self._paused else "upstream sent"
        self._abort(Failure(RangeCutShort(f"{whom} nothing for too long")))

    def _abort(self, reason: Failure) -> None:
        log.warn(
            "cutting off a forwarded range {left} bytes short: {reason}",
            left=self._left,
            reason=why(reason),
        )
        self._release()
        cut_off(self._request, self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        if self._released.happened:
            return
        self._cancel_timer()
        if self._upstream is not None and self._left:
            cast(IPushProducer, self._upstream).stopProducing()
        self._released.succeed_with(None)


class _Body(Protocol):
    """
    Hands the upstream's body to its L{ForwardedRange}.
    """

    def __init__(self, forwarded: ForwardedRange) -> None:
        self._forwarded = forwarded

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._forwarded._connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._forwarded._received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._forwarded._ended(reason)
