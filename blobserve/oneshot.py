"""
L{OneShotEvent}: one outcome, told to any number of observers.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

_T = TypeVar("_T")


class OneShotEvent(Generic[_T]):
    """
    Something that happens once, with a result or a failure, and that anyone
    may wait for before or after it happened.

    Each observer gets a Deferred of its own, so one observer's callbacks never
    change what another sees, and cancelling one only unsubscribes it.
    """

    def __init__(self) -> None:
        self._waiting: list[Deferred[_T]] = []
        self._outcome: tuple[_T] | Failure | None = None

    @property
    def happened(self) -> bool:
        """
        Whether L{succeed_with} or L{fail_with} has been called.
        """
        return self._outcome is not None

    @property
    def waiting(self) -> int:
        """
        How many observers wait for the outcome now.
        """
        return len(self._waiting)

    def observe(self) -> Deferred[_T]:
        """
        A Deferred that fires with the outcome, at once if it is already known.
        """
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        if self._outcome is not None:
            return succeed(self._outcome[0])
        d: Deferred[_T] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def succeed_with(self, result: _T) -> None:
        """
        Fire every observer, present and future, with C{result}.
        """
        self._settle((result,))

    def fail_with(self, reason: Failure) -> None:
        """
        Fail every observer, present and future, with C{reason}.
        """
        self._settle(reason)

    def _settle(self, outcome: tuple[_T] | Failure) -> None:
        if self._outcome is not None:
            raise RuntimeError("a one-shot event happens only once")
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome[0])
