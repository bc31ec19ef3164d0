"""
The site refuses TLS probes at once and serves HTTP as usual, within bounds:
no request body is read beyond a few bytes, a request must arrive within a
deadline, and connections beyond a limit are answered 503.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from blobserve.web.site import (
    MAX_IGNORED_BODY,
    IConnectionCounts,
    IConnections,
    registry_site,
)

from fakes import LoggedEvents

TIMEOUT = 30.0


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


class Holding(Resource):
    """
    Answers nothing until told to: a response that takes long.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


class Connection:
    """
    One client connection to a site, in memory.
    """

    def __init__(self, factory: WrappingFactory) -> None:
        self.factory = factory
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        assert protocol is not None
        self.protocol: Protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        value: bytes = self.transport.value()
        return value

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("gone")))

    def factory_figures(self) -> dict[str, int]:
        return IConnectionCounts(self.factory).figures()


def site(
    resource: Resource | None = None,
    clock: MemoryReactorClock | None = None,
    max_connections: int = 1024,
) -> WrappingFactory:
    return registry_site(
        resource if resource is not None else Hello(),
        timeout=TIMEOUT,
        max_connections=max_connections,
        reactor=clock if clock is not None else MemoryReactorClock(),
    )


def connect(
    resource: Resource | None = None, clock: MemoryReactorClock | None = None
) -> Connection:
    return Connection(site(resource, clock))


def oci_error(response: bytes) -> tuple[int, str, dict[bytes, bytes], bytes]:
    """
    The status, OCI error code, headers and body of one whole response.
    """
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    code = json.loads(body)["errors"][0]["code"] if body else ""
    return int(status_line.split()[1]), code, headers, body


@pytest.fixture
def no_body_files(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """
    The lengths twisted.web was asked to make a body's file for.
    """
    made: list[int | None] = []
    make = http._getContentFile

    def recording(length: int | None) -> Any:
        made.append(length)
        return make(length)

    monkeypatch.setattr(http, "_getContentFile", recording)
    return made


def test_tls_client_hello_is_refused_at_once() -> None:
    connection = connect()
    connection.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert connection.transport.disconnected
    assert connection.received() == b""


def test_plain_http_is_served() -> None:
    connection = connect()
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not connection.transport.disconnecting
    assert connection.received().endswith(b"hello")


@pytest.mark.parametrize("method", [b"PUT", b"POST", b"PATCH", b"DELETE", b"BREW"])
def test_write_methods_are_refused_before_their_body_is_read(
    method: bytes, no_body_files: list[int | None]
) -> None:
    connection = connect()
    connection.send(
        method + b" /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 8388608\r\nExpect: 100-continue\r\n\r\n"
    )
    # Answered with the headers alone in: no 100 Continue asks for the body.
    status, code, headers, _ = oci_error(connection.received())
    assert (status, code) == (405, "UNSUPPORTED")
    assert headers[b"allow"] == b"GET, HEAD"
    assert headers[b"connection"] == b"close"
    assert b"100 Continue" not in connection.received()
    assert connection.transport.disconnecting
    # The body, sent anyway, is not read into anything.
    answer = connection.received()
    connection.send(b"x" * 1024 * 1024)
    assert connection.received() == answer
    assert no_body_files == []


def test_write_method_without_a_body_is_answered_once_and_closed() -> None:
    connection = connect()
    connection.send(b"DELETE /v2/a/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.received().count(b"HTTP/1.1 ") == 1
    assert oci_error(connection.received())[:2] == (405, "UNSUPPORTED")
    assert connection.transport.disconnecting


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\n" % (MAX_IGNORED_BODY + 1),
        b"Content-Length: 10000000000\r\n",
        b"Transfer-Encoding: chunked\r\n",
    ],
)
def test_a_get_with_a_body_over_the_limit_is_refused_unread(
    framing: bytes, no_body_files: list[int | None]
) -> None:
    connection = connect()
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n")
    status, code, headers, _ = oci_error(connection.received())
    assert (status, code) == (413, "UNSUPPORTED")
    assert headers[b"connection"] == b"close"
    assert connection.transport.disconnecting
    connection.send(b"x" * 200_000)
    assert no_body_files == []


def test_a_head_with_a_body_is_refused_with_headers_alone() -> None:
    connection = connect()
    connection.send(b"HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert connection.received().startswith(b"HTTP/1.1 413 ")
    assert connection.received().endswith(b"\r\n\r\n")
    assert connection.transport.disconnecting


@pytest.mark.parametrize("method", [b"GET", b"PUT"])
def test_a_content_length_of_thousands_of_digits_is_refused(method: bytes) -> None:
    # int() of over 4300 digits raises: twisted.web would drop the connection
    # with a traceback in the log.
    connection = connect()
    connection.send(
        method
        + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + b"9" * 5000
        + b"\r\n\r\n"
    )
    status, _, _, _ = oci_error(connection.received())
    assert status == (413 if method == b"GET" else 405)
    assert connection.transport.disconnecting


def test_a_get_with_a_small_body_is_served_and_the_connection_kept() -> None:
    connection = connect()
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert connection.received().startswith(b"HTTP/1.1 200 ")
    assert connection.received().endswith(b"hello")
    assert not connection.transport.disconnecting


def dribble(connection: Connection, clock: MemoryReactorClock, data: bytes) -> float:
    """
    Send C{data} one byte a second, until it is sent or the connection is
    aborted; return the seconds it took.
    """
    start = clock.seconds()
    for byte in data:
        if connection.transport.disconnected:
            break
        connection.send(bytes([byte]))
        clock.advance(1)
    return clock.seconds() - start


def test_a_request_dribbled_a_byte_a_second_is_cut_off_at_the_deadline() -> None:
    clock = MemoryReactorClock()
    connection = connect(clock=clock)
    seconds = dribble(connection, clock, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    assert connection.transport.disconnected
    assert seconds == TIMEOUT
    assert connection.received() == b""
    assert connection.factory_figures()["dropped"] == 1


def test_a_request_sent_within_the_deadline_is_served() -> None:
    clock = MemoryReactorClock()
    connection = connect(clock=clock)
    request = b"GET / HTTP/1.1\r\n\r\n"
    assert len(request) < TIMEOUT
    dribble(connection, clock, request)
    assert connection.received().endswith(b"hello")
    # Past the deadline the request would have had, short of the idle timeout.
    clock.advance(TIMEOUT - 1)
    assert not connection.transport.disconnected


def test_the_next_requests_deadline_starts_at_its_first_byte() -> None:
    clock = MemoryReactorClock()
    connection = connect(clock=clock)
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # Idle between requests, for less than the idle timeout.
    clock.advance(TIMEOUT - 1)
    seconds = dribble(connection, clock, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100)
    assert connection.transport.disconnected
    assert seconds == TIMEOUT


def test_a_pipelined_requests_deadline_starts_when_it_is_read() -> None:
    clock = MemoryReactorClock()
    connection = connect(clock=clock)
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")
    assert connection.received().endswith(b"hello")
    clock.advance(1)
    seconds = dribble(connection, clock, b"X-Slow: " + b"a" * 100)
    assert connection.transport.disconnected
    assert seconds == TIMEOUT - 1


def test_the_deadline_does_not_cut_a_response_that_takes_long() -> None:
    holding = Holding()
    clock = MemoryReactorClock()
    connection = connect(holding, clock)
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # A second request arrives while the first is answered: its deadline
    # starts once the first answer ends.
    connection.send(b"GET / HTTP/1.1\r\n")
    clock.advance(TIMEOUT * 3)
    assert not connection.transport.disconnected
    holding.requests[0].write(b"done")
    holding.requests[0].finish()
    clock.advance(TIMEOUT - 1)
    assert not connection.transport.disconnected
    clock.advance(1)
    assert connection.transport.disconnected


def test_connections_beyond_the_limit_are_answered_503_and_closed() -> None:
    factory = site(max_connections=2)
    first, second = Connection(factory), Connection(factory)
    third = Connection(factory)
    status, code, headers, _ = oci_error(third.received())
    assert (status, code) == (503, "UNAVAILABLE")
    assert headers[b"connection"] == b"close"
    assert third.transport.disconnecting
    third.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert third.received().count(b"HTTP/1.1 ") == 1
    third.close()
    # The connections open before are served as ever.
    for connection in (first, second):
        connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.received().endswith(b"hello")
    # Once one closes, a new one is served.
    first.close()
    fourth = Connection(factory)
    fourth.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert fourth.received().endswith(b"hello")
    # Counted for the metrics, though no request of theirs was.
    assert IConnectionCounts(factory).figures() == {
        "open": 2,
        "refused": 1,
        "dropped": 0,
    }


def test_draining_closes_idle_connections_now_and_busy_ones_after_their_response() -> (
    None
):
    holding = Holding()
    factory = site(holding)
    idle = Connection(factory)
    busy = Connection(factory)
    busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    drained = IConnections(factory).drain()
    assert idle.transport.disconnecting
    assert not busy.transport.disconnecting
    idle.close()
    assert not drained.called

    [request] = holding.requests
    request.setHeader(b"Content-Length", b"4")
    request.write(b"done")
    request.finish()
    assert busy.transport.disconnecting
    assert b"\r\nConnection: close\r\n" in busy.received()
    busy.close()
    assert drained.called


def test_a_request_arriving_while_draining_is_answered_then_closed() -> None:
    factory = site()
    arriving = Connection(factory)
    arriving.send(b"GET / HTTP/1.1\r\n")
    drained = IConnections(factory).drain()
    assert not arriving.transport.disconnecting
    arriving.send(b"Host: x\r\n\r\n")
    assert arriving.received().startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close\r\n" in arriving.received()
    assert arriving.transport.disconnecting
    arriving.close()
    assert drained.called


def test_cutting_aborts_the_connections_still_open() -> None:
    factory = site(Holding())
    busy = Connection(factory)
    busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    IConnections(factory).drain()
    assert IConnections(factory).cut() == 1
    assert busy.transport.disconnected


def test_the_site_logs_nothing_as_it_starts_and_stops() -> None:
    site = registry_site(Resource(), reactor=MemoryReactorClock())
    with LoggedEvents() as logged:
        site.doStart()
        site.doStop()
    assert logged.messages() == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_every_response_names_the_node(request_bytes: bytes) -> None:
    factory = registry_site(
        Hello(), timeout=TIMEOUT, reactor=MemoryReactorClock(), node_name="cache-2"
    )
    connection = Connection(factory)
    connection.send(request_bytes)
    _, _, headers, _ = oci_error(connection.received().split(b"hello")[0])
    assert headers[b"x-blobserve-node"] == b"cache-2"


def test_without_a_node_name_no_node_header() -> None:
    connection = connect()
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"x-blobserve-node" not in connection.received().lower()
