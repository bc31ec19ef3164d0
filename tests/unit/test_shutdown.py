"""
How blobserve stops: its services one after another, and its clients and
downloads within the grace period, the downloads keeping what they have.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.fetch.inflight import InFlightTable
from blobserve.shutdown import GracefulStop, StopInOrder
from blobserve.web.site import IConnections

from fakes import FakeResponse, FakeUpstream, has_fired, store_at

DATA = bytes(range(256)) * 64
DIGEST = Digest.of(DATA)
GRACE = 10.0


@define
class Recorded(Service):
    name: str
    stopped: list[str]
    until: Deferred[None] | None = None

    def stopService(self) -> Deferred[None] | None:
        self.stopped.append(self.name)
        return self.until


def test_services_stop_one_after_another_the_last_started_first() -> None:
    stopped: list[str] = []
    slow: Deferred[None] = Deferred()
    services = StopInOrder()
    for name, until in (("index", None), ("downloads", slow), ("listener", None)):
        Recorded(name, stopped, until).setServiceParent(services)
    services.startService()
    done = services.stopService()
    assert stopped == ["listener", "downloads"]
    slow.callback(None)
    assert stopped == ["listener", "downloads", "index"]
    assert has_fired(done)


@implementer(IConnections)
@define
class Connections:
    """
    Connections that drain when the test says so.
    """

    drained: Deferred[None] = field(factory=Deferred)
    cuts: int = 0

    def drain(self) -> Deferred[None]:
        return self.drained

    def cut(self) -> int:
        self.cuts += 1
        return 1


@define
class Stopping:
    service: GracefulStop
    connections: Connections
    clock: Clock
    upstream: FakeUpstream
    body: FakeResponse
    root: Path


def stopping(tmp_path: Path) -> Stopping:
    """
    A service with one download landing its first bytes, told to stop.
    """
    clock = Clock()
    upstream = FakeUpstream()
    store = store_at(tmp_path, clock=clock)
    table = InFlightTable(partial(Download, store=store, clock=clock))
    table.join("library/x", DIGEST, upstream, "docker.io")
    body = FakeResponse(length=len(DATA))
    upstream.fetches[0][2].callback(body)
    assert body.protocol is not None
    body.protocol.dataReceived(DATA[:1000])
    connections = Connections()
    service = GracefulStop(connections, table, GRACE, clock)
    service.startService()
    return Stopping(service, connections, clock, upstream, body, tmp_path)


def end_body(subject: Stopping) -> None:
    """
    End the upstream body as Twisted does once its connection is dropped.
    """
    assert subject.body.transport.producerState == "stopped"
    assert subject.body.protocol is not None
    subject.body.protocol.connectionLost(Failure(ConnectionLost()))


def test_responses_end_before_the_downloads_stop_and_keep_their_bytes(
    tmp_path: Path,
) -> None:
    subject = stopping(tmp_path)
    stopped = subject.service.stopService()
    subject.clock.advance(GRACE - 1)
    # Responses in progress still follow the download.
    assert subject.body.transport.producerState == "producing"
    subject.connections.drained.callback(None)
    end_body(subject)
    assert has_fired(stopped)
    assert subject.connections.cuts == 0
    [temporary] = (tmp_path / "tmp").iterdir()
    assert temporary.read_bytes() == DATA[:1000]
    assert set(store_at(tmp_path).partials()) == {DIGEST}


def test_connections_still_busy_after_the_grace_are_cut(tmp_path: Path) -> None:
    subject = stopping(tmp_path)
    stopped = subject.service.stopService()
    subject.clock.advance(GRACE)
    assert subject.connections.cuts == 1
    end_body(subject)
    assert has_fired(stopped)
    assert set(store_at(tmp_path).partials()) == {DIGEST}
