"""
Turns of the reactor shared among responses: a new client's first bytes wait
behind no one, all responses together send a bounded amount per turn of the
reactor, those catching up are served round robin, and a response that
pauses or stops leaves nothing behind.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.fetch.inflight import InFlightTable
from blobserve.serve.producer import CHUNK_SIZE, CompleteBlob, FollowingProducer
from blobserve.serve.turns import Turn, TurnScheduler
from blobserve.serve.zerocopy import IZeroCopySink
from blobserve.store.files import BlobReader, DirectoryBlobStore, TemporaryBlob
from blobserve.upstream.client import Upstreams
from blobserve.web.manifests import ManifestCache
from blobserve.web.resource import RegistryResource

from fakes import (
    ClientTransport,
    Connection,
    FakeUpstream,
    LoggedEvents,
    commit_blob,
    connect,
    store_at,
)

DATA = os.urandom(12800)
DIGEST = Digest.of(DATA)
#: These tests pin how bodies go with the sink (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("sink_for_every_body")
#: What each response may send in one of its turns, in these tests.
SHARE = 4000


def reactor_turn(clock: Clock) -> None:
    """
    Run the calls due now, but not those they schedule in turn: as one turn
    of a real reactor does before it polls its sockets again.
    """
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        if call.active():
            clock.calls.remove(call)  # type: ignore[arg-type]
            call.called = 1  # type: ignore[attr-defined]
            call.func(*call.args, **call.kw)  # type: ignore[attr-defined]


class Greedy:
    """
    A response whose socket takes everything: each turn it sends all it may,
    records it, and asks for another.
    """

    def __init__(
        self, name: str, scheduler: TurnScheduler, log: list[str], wants: int = SHARE
    ) -> None:
        self.name = name
        self.scheduler = scheduler
        self.log = log
        self.wants = wants

    def __call__(self, allowance: int) -> int:
        used = min(allowance, self.wants)
        self.log.append(self.name)
        self.scheduler.later(self)
        return used


def test_a_turn_of_the_reactor_is_shared_round_robin_within_the_budget() -> None:
    clock = Clock()
    scheduler = TurnScheduler(clock, budget=2 * SHARE, turn_cost=1)
    served: list[str] = []
    for name in "abc":
        scheduler.later(Greedy(name, scheduler, served))

    turns = []
    for _ in range(6):
        before = len(served)
        reactor_turn(clock)
        turns.append("".join(served[before:]))
    # Two of three a turn, in the order they asked, none left out.
    assert turns == ["ab", "ca", "bc", "ab", "ca", "bc"]


def test_a_turn_counts_its_cost_however_little_it_sends() -> None:
    clock = Clock()
    scheduler = TurnScheduler(clock, budget=3 * SHARE, turn_cost=SHARE)
    served: list[str] = []
    for name in "abcde":
        scheduler.later(Greedy(name, scheduler, served, wants=1))

    reactor_turn(clock)
    assert served == ["a", "b", "c"]
    reactor_turn(clock)
    assert served == ["a", "b", "c", "d", "e", "a"]


def test_forgotten_turns_are_not_run_and_nothing_stays_scheduled() -> None:
    clock = Clock()
    scheduler = TurnScheduler(clock, budget=2 * SHARE, turn_cost=1)
    served: list[str] = []
    turns = [Greedy(name, scheduler, served) for name in "ab"]
    for turn in turns:
        scheduler.later(turn)
    reactor_turn(clock)
    for turn in turns:
        scheduler.forget(turn)
    clock.advance(0)

    assert served == ["a", "b"]
    assert scheduler.waiting == 0
    assert not clock.getDelayedCalls()


def broken_turn(allowance: int) -> int:
    raise RuntimeError("a bug in a response's turn")


def test_a_turn_that_raises_is_logged_and_keeps_no_one_waiting() -> None:
    clock = Clock()
    scheduler = TurnScheduler(clock, budget=2 * SHARE, turn_cost=1)
    served: list[str] = []
    scheduler.later(broken_turn)
    scheduler.later(Greedy("a", scheduler, served))
    scheduler.later(Greedy("b", scheduler, served))

    with LoggedEvents() as logged:
        reactor_turn(clock)
        reactor_turn(clock)
        # The others had their turns, in this turn of the reactor and the
        # next.
        assert served == ["a", "b", "a", "b"]
        # Nor does a new response whose first turn raises block the next.
        scheduler.first(broken_turn)
        scheduler.first(Greedy("c", scheduler, served))
        reactor_turn(clock)
    assert served == ["a", "b", "a", "b", "c", "a"]
    assert [f.getErrorMessage() for f in logged.failures()] == [
        "a bug in a response's turn"
    ] * 2


@implementer(IZeroCopySink)
class WideSink:
    """
    A socket that takes everything it is given, straight onto the wire.
    """

    def __init__(self, transport: ClientTransport) -> None:
        self._transport = transport
        self.sent = 0

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        data = os.pread(reader.fileno(), count, offset)
        self._transport.io.write(data)
        self.sent += len(data)
        return len(data)

    def wait_for_room(self) -> bool:
        return False

    def flush(self) -> None:
        pass


class SharedTurnsResource(Resource):
    """
    Serves one complete blob to each request, with producers that share one
    L{TurnScheduler} and sinks that take everything they are given.
    """

    isLeaf = True

    def __init__(
        self, temporary: TemporaryBlob, clock: Clock, turns: TurnScheduler
    ) -> None:
        super().__init__()
        self.temporary = temporary
        self.clock = clock
        self.turns = turns
        self.sinks: list[WideSink] = []
        self.producers: list[FollowingProducer] = []
        # Without zero copy, every byte goes as a chunk through the transport.
        self.zero_copy = True
        self.chunk_size = CHUNK_SIZE

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"Content-Length", b"%d" % len(DATA))
        # The headers go at once, and off the wire: what it holds is the body.
        request.write(b"")
        transport = request.channel.transport
        assert isinstance(transport, ClientTransport)
        transport.clear()
        sink = WideSink(transport)
        self.sinks.append(sink)
        producer = FollowingProducer(
            request,
            self.temporary.open_reader(),
            CompleteBlob(len(DATA)),
            end=len(DATA),
            clock=self.clock,
            turns=self.turns,
            sink_for=lambda _: sink if self.zero_copy else None,
            chunk_size=self.chunk_size,
        )
        self.producers.append(producer)
        producer.start()
        return NOT_DONE_YET


@pytest.fixture
def resource(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> SharedTurnsResource:
    monkeypatch.setattr("blobserve.serve.producer.SEND_PER_TURN", SHARE)
    store: DirectoryBlobStore = store_at(str(tmp_path))
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    clock = Clock()
    return SharedTurnsResource(
        temporary, clock, TurnScheduler(clock, budget=2 * SHARE, turn_cost=1)
    )


def clients(resource: SharedTurnsResource, count: int) -> list[Connection]:
    connections = [connect(resource) for _ in range(count)]
    for connection in connections:
        connection.request("GET", "/blob")
    return connections


def sent(resource: SharedTurnsResource) -> list[int]:
    return [sink.sent for sink in resource.sinks]


def test_all_responses_together_send_at_most_the_budget_a_turn(
    resource: SharedTurnsResource,
) -> None:
    clients(resource, 3)
    # Two first turns spent this turn of the reactor.
    assert sent(resource) == [SHARE, SHARE, 0]

    before = sum(sent(resource))
    reactor_turn(resource.clock)
    assert sum(sent(resource)) - before == 2 * SHARE


def test_chunks_through_the_transport_count_within_the_budget_too(
    resource: SharedTurnsResource,
) -> None:
    resource.zero_copy = False
    resource.chunk_size = 3 * SHARE
    connections = clients(resource, 2)

    def body() -> int:
        return sum(len(c.transport.value()) for c in connections)

    # Each first turn sends its share, not a whole chunk, so the two spend
    # this turn of the reactor between them; the next sends no more either.
    assert body() == 2 * SHARE
    reactor_turn(resource.clock)
    assert body() == 4 * SHARE
    resource.clock.advance(0)
    assert [c.transport.value() for c in connections] == [DATA] * 2


def test_responses_catching_up_are_served_round_robin(
    resource: SharedTurnsResource,
) -> None:
    resource.turns = TurnScheduler(resource.clock, budget=SHARE, turn_cost=1)
    connections = clients(resource, 3)

    progressed = []
    for _ in range(6):
        before = sent(resource)
        reactor_turn(resource.clock)
        after = sent(resource)
        progressed.append([i for i in range(3) if after[i] > before[i]])
    # The first client's first turn went at once; the others' went first
    # in the next turns of the reactor, then each in turn.
    assert progressed == [[1], [2], [0], [1], [2], [0]]
    resource.clock.advance(0)
    assert [c.transport.value() for c in connections] == [DATA] * 3


def test_a_new_clients_first_bytes_go_before_others_catching_up(
    resource: SharedTurnsResource,
) -> None:
    clients(resource, 2)
    # This turn of the reactor is spent, and both wait for their next turn.
    assert resource.turns.waiting == 2
    waiting = sent(resource)

    # The third comes when this turn of the reactor is spent: its first
    # bytes go first thing in the next, before the others' next turns.
    clients(resource, 1)
    assert sent(resource) == [*waiting, 0]
    reactor_turn(resource.clock)
    assert sent(resource) == [waiting[0] + SHARE, waiting[1], SHARE]


def test_a_crowd_arriving_at_once_shares_the_budget_too(
    resource: SharedTurnsResource,
) -> None:
    clients(resource, 5)
    # Two first turns spend this turn of the reactor; the next gives the
    # three others theirs, and then those catching up.
    assert sent(resource) == [SHARE, SHARE, 0, 0, 0]
    reactor_turn(resource.clock)
    assert sent(resource) == [SHARE, SHARE, SHARE, SHARE, 0]
    reactor_turn(resource.clock)
    assert sent(resource) == [2 * SHARE, SHARE, SHARE, SHARE, SHARE]


def test_a_paused_or_stopped_response_leaves_the_queue_and_nothing_behind(
    resource: SharedTurnsResource,
) -> None:
    connections = clients(resource, 2)
    assert resource.turns.waiting == 2
    paused, _ = resource.producers
    paused.pauseProducing()
    connections[1].disconnect()
    assert resource.turns.waiting == 0

    resource.clock.advance(0)
    assert sent(resource) == [SHARE, SHARE]
    assert not resource.clock.getDelayedCalls()

    paused.resumeProducing()
    resource.clock.advance(0)
    assert connections[0].transport.value() == DATA
    assert resource.turns.waiting == 0
    assert not resource.clock.getDelayedCalls()


def test_the_responses_of_one_registry_share_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blobserve.serve.producer.SEND_PER_TURN", SHARE)
    monkeypatch.setattr("blobserve.serve.turns.BUDGET_PER_TURN", 2 * SHARE)
    monkeypatch.setattr("blobserve.serve.turns.TURN_COST", 1)
    store = store_at(str(tmp_path))
    commit_blob(store, DATA)
    store.saw("docker.io", "library/busybox", DIGEST)
    clock = Clock()
    sinks: list[WideSink] = []

    def sink_for(request: Request) -> WideSink:
        transport = request.channel.transport
        assert isinstance(transport, ClientTransport)
        transport.clear()
        sinks.append(WideSink(transport))
        return sinks[-1]

    resource = RegistryResource(
        store,
        InFlightTable(partial(Download, store=store, clock=clock)),
        ManifestCache(store, clock, ttl=60),
        Upstreams({"docker.io": FakeUpstream()}, "docker.io"),
        clock=clock,
        sink_for=sink_for,
    )
    for _ in range(3):
        connect(resource).request("GET", f"/v2/library/busybox/blobs/{DIGEST}")
    assert [sink.sent for sink in sinks] == [SHARE, SHARE, 0]

    reactor_turn(clock)
    assert sum(sink.sent for sink in sinks) == 4 * SHARE


def test_new_clients_arriving_without_end_leave_those_catching_up_a_share() -> None:
    clock = Clock()
    scheduler = TurnScheduler(
        clock, budget=2 * SHARE, turn_cost=1, first_turn=SHARE // 2
    )
    served: list[str] = []
    scheduler.later(Greedy("old", scheduler, served))

    def arrival() -> Turn:
        def turn(allowance: int) -> int:
            # A small response, whole in its first turn, taking all it may.
            served.append("new")
            return allowance

        return turn

    for _ in range(5):
        before = len(served)
        for _ in range(3):
            scheduler.first(arrival())
        reactor_turn(clock)
        # Three new clients a turn, each first, and the old one still served.
        assert served[before:].count("new") == 3
        assert "old" in served[before:]
