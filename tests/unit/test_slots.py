"""
UpstreamSlots: a bounded number of downloads at once, a bounded queue, and a
bounded wait in it.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from blobserve.fetch.slots import QueueFull, QueueTimeout, UpstreamSlots

from fakes import failure_of, has_fired


def test_slots_are_taken_then_queued_first_come_first_served() -> None:
    slots = UpstreamSlots(2, queue_limit=5, wait=10, clock=Clock())
    first, second, third, fourth = (slots.acquire() for _ in range(4))
    assert has_fired(first) and has_fired(second)
    assert not has_fired(third) and not has_fired(fourth)
    assert (slots.taken, slots.waiting) == (2, 2)
    slots.release()
    assert has_fired(third) and not has_fired(fourth)


def test_beyond_the_queue_limit_is_refused_at_once() -> None:
    slots = UpstreamSlots(1, queue_limit=1, wait=7.4, clock=Clock())
    slots.acquire()
    slots.acquire()
    refused = failure_of(slots.acquire()).value
    assert isinstance(refused, QueueFull)
    assert refused.retry_after == 7
    assert slots.waiting == 1


def test_waiting_longer_than_allowed_gives_up() -> None:
    clock = Clock()
    slots = UpstreamSlots(1, queue_limit=1, wait=10, clock=clock)
    slots.acquire()
    queued = slots.acquire()
    clock.advance(9.9)
    assert not has_fired(queued)
    clock.advance(0.1)
    failure_of(queued).trap(QueueTimeout)
    assert slots.waiting == 0
    # The slot it never had is not given back by anyone: the next one waits.
    slots.release()
    assert slots.taken == 0


def test_cancelling_a_queued_acquisition_leaves_the_queue() -> None:
    clock = Clock()
    slots = UpstreamSlots(1, queue_limit=1, wait=10, clock=clock)
    slots.acquire()
    queued = slots.acquire()
    queued.cancel()
    failure_of(queued).trap(CancelledError)
    assert slots.waiting == 0
    assert clock.getDelayedCalls() == []
    assert not has_fired(slots.acquire())


def test_when_free_fires_once_a_slot_is_free_and_nobody_waits_for_one() -> None:
    slots = UpstreamSlots(1, queue_limit=5, wait=10, clock=Clock())
    assert has_fired(slots.when_free())
    slots.acquire()
    slots.acquire()
    free = slots.when_free()
    slots.release()
    # The slot went to the download that waited for it.
    assert not has_fired(free)
    slots.release()
    assert has_fired(free) and slots.free


def test_cancelling_when_free_stops_waiting() -> None:
    slots = UpstreamSlots(1, queue_limit=5, wait=10, clock=Clock())
    slots.acquire()
    free = slots.when_free()
    free.cancel()
    assert isinstance(failure_of(free).value, CancelledError)
    slots.release()
    assert slots.free
