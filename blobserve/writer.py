"""
L{ChunkWriter}: the protocol that lands an upstream body on disk.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import Interface, implementer

from blobserve.digest import Digest
from blobserve.oneshot import OneShotEvent
from blobserve.storage import TemporaryBlob


class VerificationFailed(Exception):
    """
    A downloaded body is not the blob it claims to be: wrong length or digest.
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
class ChunkWriter(Protocol):
    """
    Receives an upstream response body, appends it to a L{TemporaryBlob},
    hashes it as it goes, and tells observers how much of it is on disk.

    Observers are told the I{state} (a length, the end, a failure), never the
    bytes: they read those from disk. The blob is complete only once its length
    and digest have been verified, so no observer is ever told that an
    unverified blob is whole.

    @ivar written: how many bytes are on disk so far.
    """

    written: int = 0

    def __init__(
        self,
        temporary: TemporaryBlob,
        expected_length: int | None,
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        """
        @param expected_length: the upstream's C{Content-Length}, if it sent one.
        @param idle_timeout: seconds without body bytes after which the upstream
            connection is dropped and the download fails.
        """
        self._temporary = temporary
        self._expected_length = expected_length
        self._hasher = temporary.digest.hasher()
        self._observers: list[tuple[int, Deferred[int]]] = []
        self._finished: OneShotEvent[int] = OneShotEvent()
        self._complete = False
        self._failure: Failure | None = None
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = clock.callLater(idle_timeout, self._stalled)

    @property
    def complete(self) -> bool:
        """
        Whether the whole body is on disk and verified.
        """
        return self._complete

    def when_beyond(self, offset: int) -> Deferred[int]:
        """
        Fire with the written length once it exceeds C{offset}.

        Once the blob is complete, fire with its final length straight away, so
        a result that does not exceed C{offset} means "no more bytes will come".
        Fail with the reason if the download fails. Cancelling the Deferred
        unsubscribes.
        """
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
        Fire with the final length once the body is complete and verified, or
        fail with the reason the download failed.
        """
        return self._finished.observe()

    def dataReceived(self, data: bytes) -> None:
        if self._complete or self._failure is not None:
            return
        try:
            self._temporary.write(data)
        except OSError:
            self._abandon(Failure())
            return
        self._hasher.update(data)
        self.written += len(data)
        if self._expected_length is not None and self.written > self._expected_length:
            self._abandon(
                Failure(
                    VerificationFailed(
                        f"upstream sent more than its Content-Length of"
                        f" {self._expected_length} bytes"
                    )
                )
            )
            return
        if self._idle is not None:
            self._idle.reset(self._idle_timeout)
        self._notify()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._complete or self._failure is not None:
            return
        self._cancel_idle_timer()
        if not reason.check(ResponseDone):
            self._fail(reason)
            return
        digest = self._temporary.digest
        actual = Digest(digest.algorithm, self._hasher.hexdigest())
        if self._expected_length is not None and self.written != self._expected_length:
            self._fail(
                Failure(
                    VerificationFailed(
                        f"upstream sent {self.written} of {self._expected_length} bytes"
                    )
                )
            )
        elif actual != digest:
            self._fail(
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

    def _stalled(self) -> None:
        self._idle = None
        self._abandon(
            Failure(
                UpstreamStalled(
                    f"no body bytes from upstream for {self._idle_timeout:g} s"
                )
            )
        )

    def _abandon(self, reason: Failure) -> None:
        """
        Fail, and stop the upstream from sending more.
        """
        self._fail(reason)
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def _cancel_idle_timer(self) -> None:
        if self._idle is not None:
            if self._idle.active():
                self._idle.cancel()
            self._idle = None

    def _fail(self, reason: Failure) -> None:
        self._cancel_idle_timer()
        self._failure = reason
        waiting, self._observers = self._observers, []
        for _, d in waiting:
            d.errback(reason)
        self._finished.fail_with(reason)
