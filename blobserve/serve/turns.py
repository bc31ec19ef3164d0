"""
L{TurnScheduler}: shares the work each turn of the reactor spends sending
blob bodies among every response, so that none waits behind the others.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: The most bytes all responses together send in one turn of the reactor
#: before it goes back to its sockets. A new client's request is read only
#: between turns, so this bounds how long its first byte waits behind others'
#: catching up: sendfile from the page cache to loopback moves about 1 MiB in
#: 0.3-0.5 ms on the benchmark's machine.
BUDGET_PER_TURN = 2 * 1024 * 1024

#: What a response's turn counts against the budget however little it
#: sends: a turn costs a system call and a trip through the producer, and a
#: writer's chunk wakes every client following it.
TURN_COST = 64 * 1024

#: The most a new response's first turn may send: enough for its first
#: bytes to go at once, ahead of those catching up, and not so much that a
#: steady stream of new clients starves them.
FIRST_TURN = 256 * 1024

#: A response's share of a turn: given how many bytes it may send, it sends
#: at most that many and says how many it sent.
Turn = Callable[[int], int]


class TurnScheduler:
    """
    Takes the turns of every response that has bytes to send and serves them
    fairly within a bounded amount of work per turn of the reactor.

    It promises that, within one turn of the reactor, the turns it runs send
    no more than C{budget} bytes together, each turn counting at least
    C{turn_cost}; that a new response's first turn (L{first}) goes before
    any turn of those catching up, and sends at most C{first_turn} bytes, so
    that new clients arriving without end still leave those catching up
    their share; that responses waiting for a turn are
    served in the order they asked, each once before any is served again;
    that a forgotten response is never called again; that a turn that raises
    is logged, counts its cost and keeps no one else waiting; and that
    nothing stays scheduled once there is nothing left to do.
    """

    def __init__(
        self,
        clock: IReactorTime,
        budget: int | None = None,
        turn_cost: int | None = None,
        first_turn: int | None = None,
    ) -> None:
        """
        @param budget: the bytes per turn of the reactor; by default
            L{BUDGET_PER_TURN}.
        @param turn_cost: the least a turn counts; by default L{TURN_COST}.
        @param first_turn: the most a new response's first turn may send; by
            default L{FIRST_TURN}.
        """
        self._clock = clock
        self._budget = BUDGET_PER_TURN if budget is None else budget
        self._turn_cost = TURN_COST if turn_cost is None else turn_cost
        self._first_turn = FIRST_TURN if first_turn is None else first_turn
        self._left = self._budget
        # Insertion-ordered dicts: queues with removal in O(1). New
        # responses' first turns go before those catching up.
        self._new: dict[Turn, None] = {}
        self._waiting: dict[Turn, None] = {}
        self._refill: IDelayedCall | None = None
        self._running = False

    @property
    def waiting(self) -> int:
        """
        How many responses wait for a turn.
        """
        return len(self._new) + len(self._waiting)

    def first(self, turn: Turn) -> None:
        """
        Run the first turn of a new response ahead of everyone waiting: now,
        if this turn of the reactor has work left to give, else first thing
        in the next. A new client's first byte waits behind no one's
        catching up, and a crowd arriving at once is still bounded.
        """
        if self._left > 0 and not self._running:
            self._run(turn, min(self._left, self._first_turn))
        else:
            self._new[turn] = None
            self._schedule()

    def now_or_later(self, turn: Turn) -> None:
        """
        Run C{turn} now, if no one is waiting before it and this turn of the
        reactor has work left to give; otherwise once its own turn comes.
        """
        if turn in self._waiting or turn in self._new:
            return
        if self._new or self._waiting or self._running or self._left <= 0:
            self.later(turn)
        else:
            self._run(turn, self._left)

    def later(self, turn: Turn) -> None:
        """
        Run C{turn} in a later turn of the reactor, after everyone already
        waiting.
        """
        self._waiting[turn] = None
        self._schedule()

    def forget(self, turn: Turn) -> None:
        """
        Never run C{turn} again, unless it asks again; once no one waits and
        nothing was spent, nothing stays scheduled.
        """
        self._new.pop(turn, None)
        self._waiting.pop(turn, None)
        if not self.waiting and self._left >= self._budget:
            self._cancel()

    def _run(self, turn: Turn, allowance: int) -> None:
        self._running = True
        try:
            used = turn(allowance)
        except Exception:
            # A bug in one response: the others queued behind it must still
            # get their turns, so it goes no further than the log.
            log.failure("a response's turn failed")
            used = 0
        finally:
            self._running = False
        self._left -= max(used, self._turn_cost)
        self._schedule()

    def _schedule(self) -> None:
        if self._refill is None and (self.waiting or self._left < self._budget):
            self._refill = self._clock.callLater(0, self._next_turn)

    def _cancel(self) -> None:
        if self._refill is not None:
            if self._refill.active():
                self._refill.cancel()
            self._refill = None

    def _next_turn(self) -> None:
        """
        A new turn of the reactor: a full budget, for new responses' first
        turns, then shared round robin among those waiting, in the order
        they asked.
        """
        self._refill = None
        self._left = self._budget
        for queue in (self._new, self._waiting):
            # Only those waiting now: a turn that asks again goes to the
            # back and waits for the next turn of the reactor.
            for _ in range(len(queue)):
                if self._left <= 0 or not queue:
                    break
                turn = next(iter(queue))
                del queue[turn]
                allowance = self._left
                if queue is self._new:
                    allowance = min(allowance, self._first_turn)
                self._run(turn, allowance)
        self._schedule()
