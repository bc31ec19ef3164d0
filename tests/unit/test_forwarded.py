"""
Lazy pulling: a range far beyond the bytes of a download on disk is asked of
the upstream and streamed through, while the download goes on.
"""

from pathlib import Path

import pytest
from test_resource import DATA, Registry, registry_for
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from blobserve.serve.forwarded import ForwardedRange
from blobserve.upstream.client import UpstreamError
from blobserve.web import resource as resource_module

from fakes import ClientTransport, FakeResponse

SIZE = len(DATA)
#: Ranges starting farther than this beyond the bytes on disk are forwarded.
NEAR = 10_000


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setattr(resource_module, "WAIT_WITHIN", NEAR)
    return registry_for(tmp_path, Clock())


def forwarded_answer(registry: Registry, start: int, end: int) -> FakeResponse:
    """
    Check that the upstream was asked for bytes C{start} to C{end}, and
    answer with a 206 whose body the test sends.
    """
    assert (registry.upstream.offsets[-1], registry.upstream.ends[-1]) == (start, end)
    response = FakeResponse(code=206, length=end - start)
    registry.upstream.fetches[-1][2].callback(response)
    assert response.protocol is not None
    return response


def test_a_range_of_a_cold_blob_is_forwarded_and_the_blob_downloaded(
    registry: Registry,
) -> None:
    client = registry.get(headers={"Range": "bytes=90000-90099"})
    download = registry.answer(0)
    assert download.protocol is not None
    forwarded = forwarded_answer(registry, 90000, 90100)
    status, headers, body = client.response()
    assert (status, body) == (206, b"")
    assert headers["content-range"] == f"bytes 90000-90099/{SIZE}"
    assert headers["content-length"] == "100"

    assert forwarded.protocol is not None
    forwarded.protocol.dataReceived(DATA[90000:90050])
    assert client.response()[2] == DATA[90000:90050]
    forwarded.protocol.dataReceived(DATA[90050:90100])
    forwarded.protocol.connectionLost(Failure(ResponseDone()))
    assert client.response()[2] == DATA[90000:90100]
    assert not client.transport.aborted
    # The download went on meanwhile, and ends in the store.
    assert registry.resource.responses_in_progress() == 0
    download.protocol.dataReceived(DATA)
    download.protocol.connectionLost(Failure(ResponseDone()))
    assert registry.committed()
    assert registry.get().response()[2] == DATA
    assert len(registry.upstream.fetches) == 2


def test_a_range_whose_if_range_does_not_match_is_not_forwarded(
    registry: Registry,
) -> None:
    other = '"sha256:' + "0" * 64 + '"'
    client = registry.get(headers={"Range": "bytes=90000-90099", "If-Range": other})
    download = registry.answer(0)
    assert len(registry.upstream.fetches) == 1
    assert client.response()[0] == 200
    assert download.protocol is not None
    download.protocol.dataReceived(DATA)
    download.protocol.connectionLost(Failure(ResponseDone()))
    assert client.response()[2] == DATA


def test_a_range_near_the_bytes_on_disk_waits_for_them(registry: Registry) -> None:
    whole = registry.get()
    download = registry.answer()
    assert download.protocol is not None
    download.protocol.dataReceived(DATA[:1000])
    client = registry.get(headers={"Range": f"bytes={1000 + NEAR}-{1099 + NEAR}"})
    assert len(registry.upstream.fetches) == 1
    download.protocol.dataReceived(DATA[1000 : 1100 + NEAR])
    assert client.response()[2] == DATA[1000 + NEAR : 1100 + NEAR]
    assert whole.response()[0] == 200


def test_a_range_on_disk_is_answered_at_once(registry: Registry) -> None:
    registry.get()
    download = registry.answer()
    assert download.protocol is not None
    download.protocol.dataReceived(DATA[:50000])
    client = registry.get(headers={"Range": "bytes=100-199"})
    assert client.response()[2] == DATA[100:200]
    assert len(registry.upstream.fetches) == 1


def test_a_forwarded_range_follows_the_clients_pace(registry: Registry) -> None:
    client = registry.get(headers={"Range": "bytes=50000-89999"})
    registry.answer(0)
    forwarded = forwarded_answer(registry, 50000, 90000)
    assert forwarded.protocol is not None
    client.transport.buffer_limit = 1000
    forwarded.protocol.dataReceived(DATA[50000:55000])
    assert forwarded.transport.producerState == "paused"
    client.transport.drain()
    assert forwarded.transport.producerState == "producing"
    forwarded.protocol.dataReceived(DATA[55000:90000])
    forwarded.protocol.connectionLost(Failure(ResponseDone()))
    assert client.response()[2] == DATA[50000:90000]


def test_a_client_that_leaves_drops_the_forwarded_range(registry: Registry) -> None:
    client = registry.get(headers={"Range": "bytes=50000-89999"})
    registry.answer(0)
    forwarded = forwarded_answer(registry, 50000, 90000)
    assert forwarded.protocol is not None
    forwarded.protocol.dataReceived(DATA[50000:51000])
    client.disconnect()
    assert forwarded.transport.producerState == "stopped"
    assert registry.resource.responses_in_progress() == 0


def test_a_client_that_leaves_before_the_upstream_answers_cancels_the_range(
    registry: Registry,
) -> None:
    client = registry.get(headers={"Range": "bytes=50000-89999"})
    registry.answer(0)
    assert len(registry.upstream.fetches) == 2
    client.disconnect()
    assert registry.upstream.cancelled == [registry.upstream.fetches[1][1]]


def test_a_forwarded_range_that_breaks_cuts_the_client(registry: Registry) -> None:
    client = registry.get(headers={"Range": "bytes=50000-89999"})
    registry.answer(0)
    forwarded = forwarded_answer(registry, 50000, 90000)
    assert forwarded.protocol is not None
    forwarded.protocol.dataReceived(DATA[50000:51000])
    forwarded.protocol.connectionLost(Failure(ConnectionLost()))
    assert client.response()[2] == DATA[50000:51000]
    assert client.transport.aborted


def test_a_range_the_upstream_will_not_answer_is_served_from_disk(
    registry: Registry,
) -> None:
    client = registry.get(headers={"Range": "bytes=50000-50099"})
    download = registry.answer(0)
    assert download.protocol is not None
    registry.upstream.fetches[1][2].errback(UpstreamError("ignored the range"))
    assert client.response()[2] == b""
    download.protocol.dataReceived(DATA[:60000])
    status, headers, body = client.response()
    assert (status, body) == (206, DATA[50000:50100])
    assert headers["content-range"] == f"bytes 50000-50099/{SIZE}"


def forwarding(
    clock: Clock,
) -> tuple[ClientTransport, FakeResponse, ForwardedRange]:
    channel = DummyChannel()
    client = ClientTransport()
    channel.transport = client  # type: ignore[assignment]
    request = Request(channel)
    request.method = b"GET"
    response = FakeResponse(code=206, length=100)
    forwarded = ForwardedRange(request, response, 100, clock, 30, client_timeout=60)
    forwarded.start()
    return client, response, forwarded


def test_an_upstream_that_sends_nothing_for_too_long_is_dropped() -> None:
    clock = Clock()
    client, response, _ = forwarding(clock)
    assert response.protocol is not None
    clock.advance(29)
    response.protocol.dataReceived(b"x" * 10)
    clock.advance(29)
    assert response.transport.producerState == "producing"
    clock.advance(1)
    assert response.transport.producerState == "stopped"
    assert client.aborted


def test_a_client_that_takes_nothing_for_too_long_is_dropped() -> None:
    clock = Clock()
    client, response, forwarded = forwarding(clock)
    forwarded.pauseProducing()
    clock.advance(59)
    assert response.transport.producerState == "paused"
    clock.advance(1)
    assert response.transport.producerState == "stopped"
    assert client.aborted


def test_an_upstream_that_sends_more_than_asked_cuts_the_client() -> None:
    client, response, _ = forwarding(Clock())
    assert response.protocol is not None
    response.protocol.dataReceived(b"x" * 101)
    assert response.transport.producerState == "stopped"
    assert client.aborted


def test_bytes_that_arrive_while_the_client_is_paused_keep_its_timeout() -> None:
    clock = Clock()
    client, response, forwarded = forwarding(clock)
    assert response.protocol is not None
    forwarded.pauseProducing()
    clock.advance(40)
    # Already on their way when the upstream was paused.
    response.protocol.dataReceived(b"x" * 10)
    clock.advance(20)
    assert response.transport.producerState == "stopped"
    assert client.aborted


@implementer(IResponse)
class _WholeBody(FakeResponse):
    """
    A response whose body the upstream has sent whole already: it is
    delivered, and ends, as soon as it is taken.
    """

    def deliverBody(self, protocol: IProtocol) -> None:
        super().deliverBody(protocol)
        protocol.dataReceived(b"y" * 100)
        protocol.connectionLost(Failure(ResponseDone()))


def test_a_body_already_whole_is_forwarded_whole() -> None:
    channel = DummyChannel()
    client = ClientTransport()
    channel.transport = client  # type: ignore[assignment]
    request = Request(channel)
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.setHeader(b"Content-Length", b"100")
    forwarded = ForwardedRange(
        request, _WholeBody(code=206, length=100), 100, Clock(), 30
    )
    forwarded.start()
    assert request.finished
    assert client.value().endswith(b"y" * 100)
    assert not client.aborted


def test_ranges_beyond_the_bound_on_forwarding_wait_for_the_disk(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resource_module, "MAX_FORWARDED", 2)
    clients = [registry.get(headers={"Range": "bytes=90000-90099"}) for _ in range(3)]
    download = registry.answer(0)
    # The download, and two ranges asked of the upstream; the third waits.
    assert len(registry.upstream.fetches) == 3
    assert download.protocol is not None
    download.protocol.dataReceived(DATA[:90100])
    assert clients[2].response()[2] == DATA[90000:90100]
    # Once a forwarded one has ended, the next range is forwarded again.
    clients[0].disconnect()
    registry.get(headers={"Range": "bytes=101000-101099"})
    assert len(registry.upstream.fetches) == 4
