"""
L{UpstreamSlots}: how many downloads may talk to upstreams at once, how many
may wait for their turn, and for how long.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure


class QueueFull(Exception):
    """
    Every slot is taken and the queue of downloads waiting for one is full.

    @ivar retry_after: seconds after which a client may try again.
    """

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(QueueFull):
    """
    A download waited longer than allowed for a slot.
    """


class UpstreamSlots:
    """
    A semaphore of C{concurrency} slots with a bounded, timed queue.

    A download takes a slot before its first upstream request and gives it
    back when it ends. Waiting downloads get slots first come first served;
    beyond C{queue_limit} of them a new one is refused at once, and one that
    waited C{wait} seconds gives up, so a client never waits for a queue
    longer than that.
    """

    def __init__(
        self, concurrency: int, queue_limit: int, wait: float, clock: IReactorTime
    ) -> None:
        self._semaphore = DeferredSemaphore(concurrency)
        self._queue_limit = queue_limit
        self._wait = wait
        self._clock = clock
        # Who waits for a slot to be free with no download queued for it.
        self._idle: list[Deferred[None]] = []

    @property
    def waiting(self) -> int:
        """
        How many downloads wait for a slot.
        """
        return len(self._semaphore.waiting)

    @property
    def limit(self) -> int:
        """
        How many slots there are.
        """
        return self._semaphore.limit

    @property
    def taken(self) -> int:
        """
        How many slots are taken.
        """
        return self._semaphore.limit - self._semaphore.tokens

    def acquire(self) -> Deferred[None]:
        """
        Take a slot, now or once one is free.

        @return: fires once the slot is the caller's (give it back with
            L{release}); fails with L{QueueFull} at once if the queue is full,
            with L{QueueTimeout} after C{wait} seconds in the queue.
            Cancelling it leaves the queue.
        """
        semaphore = self._semaphore
        if not semaphore.tokens and len(semaphore.waiting) >= self._queue_limit:
            return fail(
                QueueFull(
                    f"{self._queue_limit} downloads wait for the upstream already",
                    self._retry_after,
                )
            )
        d: Deferred[Any] = semaphore.acquire()
        if not d.called:
            d.addTimeout(self._wait, self._clock, self._timed_out)
        return d.addCallback(lambda _: None)

    def release(self) -> None:
        """
        Give a slot back to the next download waiting, if any.
        """
        self._semaphore.release()
        if self.free:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    @property
    def free(self) -> bool:
        """
        Whether a slot is free and no download waits for one: a download
        that nobody asked for yet may take it without delaying one that a
        client waits for.
        """
        return self._semaphore.tokens > 0 and not self._semaphore.waiting

    def when_free(self) -> Deferred[None]:
        """
        Fire once L{free} is true: at once if it is, else when a slot is
        given back and no download waits for it. Nothing is taken: the
        caller takes a slot (with L{acquire}) in the same turn if it wants
        one. Cancelling it stops waiting.
        """
        if self.free:
            return succeed(None)
        d: Deferred[None] = Deferred(self._idle.remove)
        self._idle.append(d)
        return d

    @property
    def _retry_after(self) -> int:
        return max(1, round(self._wait))

    def _timed_out(self, result: Any, timeout: float) -> Failure:
        return Failure(
            QueueTimeout(
                f"no upstream slot came free within {timeout:g} s", self._retry_after
            )
        )
