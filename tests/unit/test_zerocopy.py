"""
Bodies sent with sendfile: the producer's use of a zero-copy sink keeps every
byte in order whatever the sink takes, and the socket sink sends only when
nothing waits in the transport, only where the bytes need no framing, never
into TLS, never past a transport it does not know, and only once its
start-up self-test has passed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from functools import partial
from http.client import HTTPSConnection
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.ssl import KeyPair
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.fetch.writer import ChunkWriter
from blobserve.serve.producer import CompleteBlob, FollowingProducer
from blobserve.serve.zerocopy import ConnectionSink, IZeroCopySink, SocketSink
from blobserve.serve.zerocopy_check import (
    _FILE_SIZE,
    _PREFIX,
    _SUFFIX,
    ZeroCopy,
    _Expected,
    self_test,
)
from blobserve.store.files import BlobReader, DirectoryBlobStore
from blobserve.web.site import registry_site

from fakes import ClientTransport, Connection, connect, store_at
from test_producer import CountingReader, FollowingResource

DATA = os.urandom(12800)
DIGEST = Digest.of(DATA)
#: These tests pin how bodies go with the sink (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("sink_for_every_body")


@implementer(IZeroCopySink)
class ScriptedSink:
    """
    A sink in front of an in-memory transport: it takes the amounts it is
    given in turn (at most what is asked, nothing while the transport holds
    bytes), and puts what it takes straight on the wire. Once it has taken
    less than asked, the socket is full: it takes nothing more until the
    client next reads.
    """

    def __init__(
        self, transport: ClientTransport, amounts: list[int], waits: bool = True
    ) -> None:
        self._transport = transport
        self._amounts = iter(amounts)
        self._waits = waits
        self.sent = 0
        self.flushed = 0
        self.waited = 0
        self.asked: list[int] = []
        self._full = False
        self._room_at = 0

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        self._full = False
        if len(self._transport.value()) > self._transport._sent:
            return 0
        if self._transport.drains < self._room_at:
            self._full = True
            return 0
        self.asked.append(count)
        amount = min(count, next(self._amounts, count))
        if amount < count:
            self._room_at = self._transport.drains + 1
            self._full = amount == 0
        # As sendfile does: from the file itself, not through the reader.
        data = os.pread(reader.fileno(), amount, offset)
        self._transport.io.write(data)
        self._transport._sent += len(data)
        self.sent += len(data)
        return len(data)

    def wait_for_room(self) -> bool:
        # As the socket sink: only while the transport holds nothing and has
        # its producer running; the client's next read (drain) resumes it.
        transport = self._transport
        if (
            not self._waits
            or not self._full
            or len(transport.value()) > transport._sent
            or transport.producer is None
            or transport.producerState == "paused"
        ):
            return False
        self.waited += 1
        transport.producerState = "paused"
        transport.producer.pauseProducing()
        return True

    def flush(self) -> None:
        # The socket takes whatever the transport holds, unless its producer
        # is paused: then the sink must leave the bytes to the reactor.
        if self._transport.producerState != "paused":
            self.flushed += len(self._transport.value()) - self._transport._sent
            self._transport._sent = len(self._transport.value())


class SinkResource(FollowingResource):
    """
    Serves one blob with a producer that has a L{ScriptedSink}.
    """

    def __init__(self, *args: Any, amounts: list[int], waits: bool = True) -> None:
        super().__init__(*args)
        self.amounts = amounts
        self.waits = waits
        self.sinks: list[ScriptedSink] = []

    def sink_for(self, request: Request) -> ScriptedSink:
        transport = request.channel.transport
        assert isinstance(transport, ClientTransport)
        sink = ScriptedSink(transport, self.amounts, self.waits)
        self.sinks.append(sink)
        return sink


@pytest.fixture
def store(tmp_path: Path) -> DirectoryBlobStore:
    return store_at(str(tmp_path))


def serve(
    store: DirectoryBlobStore, amounts: list[int], limit: int, waits: bool = True
) -> tuple[ChunkWriter, SinkResource, Connection]:
    temporary = store.create_temporary(DIGEST)
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    resource = SinkResource(reader, writer, len(DATA), amounts=amounts, waits=waits)
    connection = connect(resource)
    connection.transport.buffer_limit = limit
    connection.request("GET", "/blob")
    return writer, resource, connection


def pieces(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    edges = [0, *sorted({c % len(data) for c in cuts}), len(data)]
    for start, end in pairwise(edges):
        yield data[start:end]


@given(
    amounts=st.lists(st.integers(0, 4000), max_size=20),
    cuts=st.lists(st.integers(0, len(DATA)), max_size=8),
    limit=st.integers(100, 5000),
    waits=st.booleans(),
)
def test_every_byte_arrives_in_order_whatever_the_sink_takes(
    tmp_path_factory: pytest.TempPathFactory,
    amounts: list[int],
    cuts: list[int],
    limit: int,
    waits: bool,
) -> None:
    store = store_at(tmp_path_factory.mktemp("s"))
    writer, resource, connection = serve(store, amounts, limit, waits)
    for piece in pieces(DATA, cuts):
        writer.append(piece)
        connection.transport.drain()
    writer.finish()
    # Until the client has taken everything: the last bytes may wait in the
    # transport, with the producer paused until they drain.
    for _ in range(len(DATA)):
        if connection.response()[2] == DATA and resource.reader.closed:
            break
        connection.transport.drain()

    assert connection.response()[2] == DATA
    assert not connection.transport.aborted
    assert resource.reader.closed


def test_sink_carries_the_body_when_the_socket_takes_it(
    store: DirectoryBlobStore,
) -> None:
    writer, resource, connection = serve(store, [], limit=1 << 20)
    connection.transport.drain()  # the headers are on the wire
    writer.append(DATA)
    writer.finish()

    assert connection.response()[2] == DATA
    # The headers went through the transport; every body byte went through
    # the sink, none was read into this process.
    assert resource.sinks[0].sent == len(DATA)
    assert resource.reader.reads == []


def test_a_small_body_goes_with_its_headers_in_one_write(
    store: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blobserve.serve.producer.SMALL_BODY", len(DATA))
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    reader = CountingReader(temporary.open_reader())
    resource = SinkResource(reader, CompleteBlob(len(DATA)), len(DATA), amounts=[])
    connection = connect(resource)
    connection.request("GET", "/blob")

    # Read into the process behind the headers, and both flushed together at
    # the end of the first turn: nothing went with sendfile.
    sink = resource.sinks[0]
    assert sink.sent == 0
    assert sum(size for _, size in reader.reads) == len(DATA)
    assert connection.response()[2] == DATA
    assert sink.flushed == len(connection.transport.value())


def test_sink_sends_a_bounded_amount_a_turn(
    store: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blobserve.serve.producer.SEND_PER_TURN", 4000)
    writer, resource, connection = serve(store, [], limit=500)
    connection.transport.drain()
    writer.append(DATA)
    writer.finish()

    # 4000 bytes by the sink, then a chunk through the transport, which
    # pauses the producer until the client has taken it.
    sink = resource.sinks[0]
    assert (sink.sent, max(sink.asked)) == (4000, 4000)
    assert resource.reader.reads == [(4000, 1000)]
    assert connection.transport.producerState == "paused"
    while connection.response()[2] != DATA:
        connection.transport.drain()
    assert resource.reader.reads == [(4000, 1000), (9000, 1000)]


def test_what_waits_for_a_full_socket_is_a_small_chunk(
    store: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blobserve.serve.producer.FULL_SOCKET_CHUNK", 600)
    writer, resource, connection = serve(store, [2000], limit=500, waits=False)
    connection.transport.drain()
    writer.append(DATA)
    writer.finish()

    # The socket took 2000 bytes and the sink cannot wait for room: what
    # waits in the transport for it to drain is 600 bytes, not a whole chunk
    # of 1000, and it is enough to pause the producer.
    assert resource.reader.reads == [(2000, 600)]
    assert connection.transport.producerState == "paused"
    for _ in range(len(DATA)):
        if connection.response()[2] == DATA:
            break
        connection.transport.drain()
    assert connection.response()[2] == DATA
    assert all(size <= 600 for _, size in resource.reader.reads)


def test_a_full_socket_pauses_the_producer_with_nothing_read_into_the_process(
    store: DirectoryBlobStore,
) -> None:
    writer, resource, connection = serve(store, [2000, 3000], limit=500)
    writer.append(DATA)
    writer.finish()

    # The socket took 2000 bytes: the producer waits for room, paused, with
    # no chunk read to wait in the transport.
    sink = resource.sinks[0]
    assert (sink.sent, sink.waited) == (2000, 1)
    assert connection.transport.producerState == "paused"
    assert resource.reader.reads == []
    connection.transport.drain()
    assert (sink.sent, sink.waited) == (5000, 2)
    for _ in range(len(DATA)):
        if connection.response()[2] == DATA:
            break
        connection.transport.drain()
    assert connection.response()[2] == DATA
    assert sink.sent == len(DATA)
    assert resource.reader.reads == []


def test_sink_takes_turns_with_other_clients_while_the_socket_takes_all(
    store: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("blobserve.serve.producer.SEND_PER_TURN", 4000)
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    reader = CountingReader(temporary.open_reader())
    resource = SinkResource(reader, CompleteBlob(len(DATA)), len(DATA), amounts=[])
    resource.clock = Clock()
    connection = connect(resource)
    connection.transport.buffer_limit = 500
    connection.request("GET", "/blob")
    # The headers went at once, so the first turn of 4000 bytes went with
    # the sink right behind them; then the next turns in the reactor's next
    # rounds, and nothing was read into the process: the socket took all.
    sink = resource.sinks[0]
    assert sink.flushed > 0
    assert sink.sent == 4000
    assert len(resource.clock.getDelayedCalls()) == 1
    resource.clock.advance(0)
    assert connection.response()[2] == DATA
    assert max(sink.asked) == 4000
    assert reader.reads == []
    assert reader.closed


def test_sink_never_sends_the_last_byte_of_an_unverified_blob(
    store: DirectoryBlobStore,
) -> None:
    writer, resource, connection = serve(store, [], limit=1 << 20)
    connection.transport.drain()
    corrupt = bytearray(DATA)
    corrupt[-1] ^= 1
    writer.append(bytes(corrupt))
    assert connection.response()[2] == DATA[:-1]
    writer.finish()

    assert connection.transport.aborted
    assert connection.response()[2] == DATA[:-1]
    assert resource.sinks[0].sent == len(DATA) - 1


def test_in_memory_transport_has_no_socket_sink(store: DirectoryBlobStore) -> None:
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    reader = CountingReader(temporary.open_reader())
    connection = connect(FollowingResource(reader, CompleteBlob(len(DATA)), len(DATA)))
    connection.request("GET", "/blob")

    assert connection.response()[2] == DATA
    assert sum(size for _, size in reader.reads) >= len(DATA)


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """
    The byte counts of every C{sendfile} the socket sink makes.
    """
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    monkeypatch.setattr("blobserve.serve.zerocopy.os.sendfile", counting)
    return calls


async def fetch_over_loopback(
    store: DirectoryBlobStore, data: bytes, length: int | None
) -> tuple[bytes, CountingReader]:
    temporary = store.create_temporary(Digest.of(data))
    temporary.write(data)
    reader = CountingReader(temporary.open_reader())
    resource = FollowingResource(reader, CompleteBlob(len(data)), length)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(Site(resource))
    try:
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/blob")
        body: bytes = await treq.content(response)
    finally:
        await port.stopListening()
    return body, reader


@pytest_twisted.ensureDeferred
async def test_socket_sink_sends_from_the_file_on_a_real_connection(
    store: DirectoryBlobStore, sendfile_calls: list[int]
) -> None:
    data = os.urandom(8 << 20)
    body, reader = await fetch_over_loopback(store, data, len(data))

    assert body == data
    assert sum(sendfile_calls) > 0
    # Each byte went once: by sendfile, or read into this process and written.
    read = sum(size for _, size in reader.reads)
    assert read + sum(sendfile_calls) == len(data)


@pytest_twisted.ensureDeferred
async def test_chunked_response_gets_no_socket_sink(
    store: DirectoryBlobStore, sendfile_calls: list[int]
) -> None:
    data = os.urandom(1 << 20)
    body, _ = await fetch_over_loopback(store, data, None)

    assert body == data
    assert sendfile_calls == []


@pytest_twisted.ensureDeferred
async def test_tls_connection_gets_no_socket_sink(
    store: DirectoryBlobStore, sendfile_calls: list[int]
) -> None:
    data = os.urandom(1 << 20)
    temporary = store.create_temporary(Digest.of(data))
    temporary.write(data)
    reader = CountingReader(temporary.open_reader())
    site = registry_site(FollowingResource(reader, CompleteBlob(len(data)), len(data)))
    certificate = KeyPair.generate().selfSignedCert(1, CN="localhost")
    endpoint = SSL4ServerEndpoint(
        reactor, 0, certificate.options(), interface="127.0.0.1"
    )
    port = await endpoint.listen(site)

    def fetch() -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = HTTPSConnection(
            "127.0.0.1", port.getHost().port, context=context, timeout=30
        )
        try:
            client.request("GET", "/blob")
            return client.getresponse().read()
        finally:
            client.close()

    try:
        body = await deferToThread(fetch)
    finally:
        await port.stopListening()
    assert body == data
    assert sendfile_calls == []


class LoopbackTransport(tcp.Connection):
    """
    Twisted's TCP transport on an accepted loopback socket.
    """

    connected = 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", *self.socket.getsockname())

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", *self.socket.getpeername())


class PlainConnection:
    """
    A request on a real Twisted TCP transport over a loopback connection,
    driven by hand: C{flush} is the reactor finding the socket writable.
    """

    def __init__(
        self,
        wrapper: type[ProtocolWrapper] | None = None,
        kind: type[tcp.Connection] = LoopbackTransport,
    ) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.peer = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        self.peer.settimeout(5)
        channel: Any = HTTPChannel()
        channel.site = Site(Resource())
        channel.timeOut = None
        protocol: Any = channel
        if wrapper is not None:
            protocol = wrapper(WrappingFactory(Factory()), channel)
        self.transport = kind(ours, protocol, MemoryReactor())
        protocol.makeConnection(self.transport)
        self.request = Request(channel)
        self.request.method = b"GET"
        self.request.clientproto = b"HTTP/1.1"
        self.received = b""

    def start(self, length: int) -> None:
        self.request.setHeader(b"Content-Length", b"%d" % length)
        self.request.write(b"")

    def flush(self) -> None:
        self.transport.doWrite()
        self.received += self.peer.recv(1 << 20)

    def close(self) -> None:
        self.transport.socket.close()
        self.peer.close()


@pytest.fixture
def plain() -> Iterator[PlainConnection]:
    connection = PlainConnection()
    yield connection
    connection.close()


@pytest.fixture
def reader(store: DirectoryBlobStore) -> Iterator[BlobReader]:
    temporary = store.create_temporary(DIGEST)
    temporary.write(DATA)
    opened = temporary.open_reader()
    yield opened
    opened.close()


def test_socket_sink_waits_for_the_bytes_the_transport_holds(
    plain: PlainConnection, reader: BlobReader, sendfile_calls: list[int]
) -> None:
    held = os.urandom(2 << 20)
    plain.start(len(held) + len(DATA))
    plain.request.write(held)
    sink = SocketSink.under(plain.request)
    assert sink is not None

    # The headers and the held bytes wait in the transport and go out a
    # piece at a time; the sink sends only once the last piece has gone.
    flushes = 0
    while not sink.send(reader, 0, len(DATA)):
        assert flushes < 1000
        plain.flush()
        flushes += 1
    assert flushes > 1
    while len(plain.received) < len(held) + len(DATA):
        plain.received += plain.peer.recv(1 << 20)

    _, _, body = plain.received.partition(b"\r\n\r\n")
    assert body == held + DATA
    assert plain.request.sentLength == len(held) + len(DATA)


def test_socket_sink_writes_what_the_transport_holds_when_flushed(
    plain: PlainConnection, reader: BlobReader
) -> None:
    plain.start(len(DATA))
    sink = SocketSink.under(plain.request)
    assert sink is not None
    assert sink.send(reader, 0, len(DATA)) == 0

    # The headers go now, not in the reactor's next round, and the body
    # right behind them.
    sink.flush()
    assert sink.send(reader, 0, len(DATA)) == len(DATA)
    while len(plain.received) < len(DATA) or b"\r\n\r\n" not in plain.received:
        plain.received += plain.peer.recv(1 << 20)
    head, _, body = plain.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == DATA
    assert plain.request.sentLength == len(DATA)


@pytest.mark.parametrize(
    "state", ["producerPaused", "disconnecting", "_writeDisconnecting"]
)
def test_socket_sink_leaves_held_bytes_to_the_reactor_when_flushing_does_more(
    plain: PlainConnection, reader: BlobReader, state: str
) -> None:
    # Once its buffer is empty, the transport would resume its producer, or
    # close: that is for the reactor to do, not for the middle of a turn.
    plain.start(len(DATA))
    sink = SocketSink.under(plain.request)
    assert sink is not None
    setattr(plain.transport, state, True)
    try:
        sink.flush()
        assert sink.send(reader, 0, len(DATA)) == 0
        assert plain.transport.dataBuffer or plain.transport._tempDataBuffer
    finally:
        setattr(plain.transport, state, False)


@implementer(IPushProducer)
class CountingProducer:
    """
    A response's producer that counts how often it was paused and resumed.
    """

    paused = 0
    resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


def test_socket_sink_has_its_producer_wait_for_room_in_a_full_socket(
    plain: PlainConnection, tmp_path: Path
) -> None:
    size = 32 << 20
    (tmp_path / "big").write_bytes(os.urandom(size))
    reader = BlobReader(os.open(tmp_path / "big", os.O_RDONLY))
    producer = CountingProducer()
    plain.start(size)
    plain.request.registerProducer(producer, True)
    sink = SocketSink.under(plain.request)
    assert sink is not None
    sink.flush()
    # The peer reads nothing: the socket is full long before the file ends.
    sent = sink.send(reader, 0, size)
    assert 0 < sent < size
    assert not sink.wait_for_room()
    assert sink.send(reader, sent, size - sent) == 0

    # Paused now, with the reactor watching for room in the socket.
    assert sink.wait_for_room()
    assert (producer.paused, producer.resumed) == (1, 0)
    assert plain.transport in plain.transport.reactor.getWriters()
    # The client reads; the reactor finds the socket writable, and the
    # transport, holding nothing, resumes the response.
    plain.peer.recv(1 << 20)
    plain.transport.doWrite()
    assert (producer.paused, producer.resumed) == (1, 1)
    assert plain.transport not in plain.transport.reactor.getWriters()
    reader.close()


def test_socket_sink_has_no_producer_wait_when_the_file_ends_early(
    plain: PlainConnection, tmp_path: Path
) -> None:
    (tmp_path / "short").write_bytes(b"x" * 100)
    reader = BlobReader(os.open(tmp_path / "short", os.O_RDONLY))
    producer = CountingProducer()
    plain.start(1000)
    plain.request.registerProducer(producer, True)
    sink = SocketSink.under(plain.request)
    assert sink is not None
    sink.flush()

    # sendfile takes nothing more past the file's end: that is no full
    # socket, and a producer waiting for room would wait for ever.
    assert sink.send(reader, 0, 1000) == 100
    assert sink.send(reader, 100, 900) == 0
    assert not sink.wait_for_room()
    assert producer.paused == 0
    reader.close()


def test_a_file_shorter_than_promised_aborts_with_the_socket_sink(
    plain: PlainConnection, tmp_path: Path
) -> None:
    promised, on_disk = 1 << 20, 100_000
    (tmp_path / "blob").write_bytes(os.urandom(on_disk))
    reader = BlobReader(os.open(tmp_path / "blob", os.O_RDONLY))
    plain.request.setHeader(b"Content-Length", b"%d" % promised)
    FollowingProducer(
        plain.request, reader, CompleteBlob(promised), end=promised
    ).start()
    plain.peer.setblocking(False)
    for _ in range(20):
        # The client reads all there is; the reactor finds the socket
        # writable.
        with contextlib.suppress(BlockingIOError):
            while plain.peer.recv(1 << 20):
                pass
        if plain.transport._aborting:
            break
        plain.transport.doWrite()
    assert plain.transport._aborting


def test_socket_sink_has_no_producer_wait_while_the_transport_holds_bytes(
    plain: PlainConnection,
) -> None:
    producer = CountingProducer()
    plain.start(len(DATA))
    plain.request.registerProducer(producer, True)
    sink = SocketSink.under(plain.request)
    assert sink is not None

    # The headers wait in the transport: it will resume its producer itself
    # once they are written, so the caller writes through it.
    assert not sink.wait_for_room()
    assert producer.paused == 0


def test_socket_sink_stops_after_a_lasting_failure(
    plain: PlainConnection, reader: BlobReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain.start(len(DATA))
    plain.flush()
    sink = SocketSink.under(plain.request)
    assert sink is not None
    failures = [BlockingIOError(errno.EAGAIN, "full"), OSError(errno.EINVAL, "no")]
    calls: list[int] = []

    def failing(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        raise failures.pop(0)

    monkeypatch.setattr("blobserve.serve.zerocopy.os.sendfile", failing)
    # A full socket is no failure: the sink tries again next time.
    assert sink.send(reader, 0, len(DATA)) == 0
    assert sink.send(reader, 0, len(DATA)) == 0
    assert sink.send(reader, 0, len(DATA)) == 0
    assert len(calls) == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda c: setattr(c.request, "method", b"HEAD"),
        lambda c: c.request.setResponseCode(204),
        lambda c: c.request.setResponseCode(304),
    ],
    ids=["HEAD", "204", "304"],
)
def test_no_socket_sink_where_the_body_is_not_plain_bytes(
    plain: PlainConnection, change: Any
) -> None:
    change(plain)
    plain.start(len(DATA))
    assert SocketSink.under(plain.request) is None


def test_no_socket_sink_after_start_tls(plain: PlainConnection) -> None:
    plain.start(len(DATA))
    plain.transport.TLS = True
    assert SocketSink.under(plain.request) is None


def test_sinks_provide_the_interface(plain: PlainConnection) -> None:
    plain.start(len(DATA))
    assert verifyObject(IZeroCopySink, SocketSink.under(plain.request))
    assert verifyObject(IZeroCopySink, ConnectionSink.under(plain.transport))


def test_no_socket_sink_before_the_headers(plain: PlainConnection) -> None:
    assert SocketSink.under(plain.request) is None


class Watching(ProtocolWrapper):
    """
    A wrapper that looks at what is written, as a timeout wrapper does.
    """

    def write(self, data: bytes) -> None:
        super().write(data)


@pytest.mark.parametrize(
    ("wrapper", "sink"), [(ProtocolWrapper, True), (Watching, False)]
)
def test_socket_sink_looks_only_past_wrappers_that_pass_writes_through(
    wrapper: type[ProtocolWrapper], sink: bool
) -> None:
    connection = PlainConnection(wrapper)
    try:
        connection.start(len(DATA))
        assert (SocketSink.under(connection.request) is not None) == sink
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["write", "writeSequence"])
def test_no_socket_sink_past_a_wrapper_with_writes_of_its_own_on_the_instance(
    method: str,
) -> None:
    # As Twisted's BufferingTLSTransport sets self.write in its __init__.
    connection = PlainConnection(ProtocolWrapper)
    try:
        connection.start(len(DATA))
        assert SocketSink.under(connection.request) is not None
        wrapper = connection.request.channel.transport
        assert isinstance(wrapper, ProtocolWrapper)
        setattr(wrapper, method, getattr(wrapper, method))
        assert SocketSink.under(connection.request) is None
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["write", "writeSequence", "doWrite"])
def test_no_socket_sink_on_a_connection_with_methods_of_its_own_on_the_instance(
    plain: PlainConnection, method: str
) -> None:
    plain.start(len(DATA))
    assert SocketSink.under(plain.request) is not None
    setattr(plain.transport, method, getattr(plain.transport, method))
    assert SocketSink.under(plain.request) is None


class CountingWrites(LoopbackTransport):
    """
    A TCP transport whose class has a C{write} of its own.
    """

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def test_no_socket_sink_on_a_connection_whose_class_writes_in_its_own_way() -> None:
    connection = PlainConnection(kind=CountingWrites)
    try:
        connection.start(len(DATA))
        assert SocketSink.under(connection.request) is None
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [("dataBuffer", bytearray()), ("offset", None), ("_tempDataLen", 0.0)],
)
def test_no_socket_sink_on_a_connection_that_keeps_its_buffer_elsewhere(
    plain: PlainConnection, name: str, value: object
) -> None:
    plain.start(len(DATA))
    assert SocketSink.under(plain.request) is not None
    setattr(plain.transport, name, value)
    assert SocketSink.under(plain.request) is None


def warnings_in(events: Any) -> list[str]:
    return [
        event["log_format"].format(**event)
        for event in events
        if event.get("log_level") == LogLevel.warn
        and event.get("log_namespace") == "blobserve.serve.zerocopy_check"
    ]


@pytest_twisted.ensureDeferred
async def test_self_test_passes_over_loopback_with_this_twisted(
    plain: PlainConnection, sendfile_calls: list[int]
) -> None:
    plain.start(len(DATA))
    zero_copy = ZeroCopy(partial(self_test, reactor, reactor))
    with capturedLogs() as events:
        zero_copy.startService()
        try:
            on = await zero_copy.checked().addTimeout(10, reactor)
        finally:
            await zero_copy.stopService()

    assert on
    # The whole file, in pieces: the socket filled, and the sink waited for
    # room (the self-test fails if it never did).
    assert sum(sendfile_calls) == 1024 * 1024
    assert len(sendfile_calls) > 1
    assert zero_copy.sink_for(plain.request) is not None
    assert warnings_in(events) == []


def test_the_self_tests_expected_bytes_are_read_a_piece_at_a_time(
    tmp_path: Path,
) -> None:
    content = os.urandom(_FILE_SIZE)
    (tmp_path / "file").write_bytes(content)
    reader = BlobReader(os.open(tmp_path / "file", os.O_RDONLY))
    whole = _PREFIX + content + _SUFFIX
    expected = _Expected(reader)
    edges = [0, 5, len(_PREFIX), len(_PREFIX) + _FILE_SIZE, len(whole)]
    for offset in {edge + d for edge in edges for d in (-3, 0, 3)}:
        for size in (1, 7, 70_000, 2 * len(whole)):
            if 0 <= offset <= len(whole):
                assert expected.at(offset, size) == whole[offset : offset + size]
    reader.close()


@implementer(IZeroCopySink)
class SendingNothing:
    """
    A sink whose socket never takes anything: full, and never finding room.
    """

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        return 0

    def wait_for_room(self) -> bool:
        return True

    def flush(self) -> None:
        pass


def sendfile_ahead_of_held_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # A Twisted that keeps what it has not sent where the sink does not look.
    monkeypatch.setattr("blobserve.serve.zerocopy._buffered", lambda connection: 0)
    return {}


def sendfile_sending_other_bytes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def corrupting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        data = bytearray(os.pread(in_fd, count, offset))
        data[-1] ^= 1
        return os.write(out_fd, data)

    monkeypatch.setattr("blobserve.serve.zerocopy.os.sendfile", corrupting)
    return {}


def wrappers_setting_write(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # A Twisted whose wrappers set their own write, as its TLS transport does.
    connected = ProtocolWrapper.makeConnection

    def making(wrapper: ProtocolWrapper, transport: Any) -> None:
        wrapper.write = transport.write  # type: ignore[method-assign]
        connected(wrapper, transport)

    monkeypatch.setattr(ProtocolWrapper, "makeConnection", making)
    return {}


def socket_never_taking(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return {"sink_under": lambda transport: SendingNothing(), "timeout": 0.2}


def producers_never_waiting(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # A Twisted whose transport the sink cannot pause for room.
    monkeypatch.setattr(ConnectionSink, "wait_for_room", lambda sink: False)
    return {}


def producers_never_resumed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # A Twisted that never tells a transport holding nothing that its socket
    # has room: the producer is paused and stays so.
    def pausing(sink: ConnectionSink) -> bool:
        connection = sink._connection
        connection.producerPaused = True
        cast(IPushProducer, connection.producer).pauseProducing()
        return True

    monkeypatch.setattr(ConnectionSink, "wait_for_room", pausing)
    return {"timeout": 0.5}


@implementer(IZeroCopySink)
class TakingAll:
    """
    A sink that says the socket took all it was asked, at once.
    """

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        return count

    def wait_for_room(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def socket_never_full(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # The wait for room is part of what the self-test checks: a socket that
    # never fills leaves it unchecked, and sendfile off.
    return {"sink_under": lambda transport: TakingAll()}


def sink_raising(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    def raising(transport: object) -> IZeroCopySink:
        raise RuntimeError("unexpected")

    return {"sink_under": raising}


@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        (sendfile_ahead_of_held_bytes, "only the first 0 as they were sent"),
        (sendfile_sending_other_bytes, "as they were sent"),
        (wrappers_setting_write, "no sink for a loopback connection"),
        (socket_never_taking, "it took too long"),
        (producers_never_waiting, "cannot have a producer wait for room"),
        (producers_never_resumed, "it took too long"),
        (socket_never_full, "the socket never filled"),
        (sink_raising, "RuntimeError: unexpected"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_failed_self_test_leaves_sendfile_off_and_says_why_once(
    plain: PlainConnection,
    monkeypatch: pytest.MonkeyPatch,
    breakage: Callable[[pytest.MonkeyPatch], dict[str, Any]],
    why: str,
) -> None:
    plain.start(len(DATA))
    assert SocketSink.under(plain.request) is not None
    zero_copy = ZeroCopy(partial(self_test, reactor, reactor, **breakage(monkeypatch)))
    with capturedLogs() as events:
        zero_copy.startService()
        try:
            on = await zero_copy.checked().addTimeout(10, reactor)
        finally:
            await zero_copy.stopService()

    assert not on
    assert zero_copy.sink_for(plain.request) is None
    [warning] = warnings_in(events)
    assert warning.startswith("sendfile is off")
    assert why in warning


def test_no_sink_before_the_self_test_has_passed(plain: PlainConnection) -> None:
    plain.start(len(DATA))
    passing: Deferred[None] = Deferred()
    zero_copy = ZeroCopy(lambda: passing)
    assert zero_copy.sink_for(plain.request) is None
    zero_copy.startService()
    assert zero_copy.sink_for(plain.request) is None
    passing.callback(None)
    assert zero_copy.sink_for(plain.request) is not None


@pytest_twisted.ensureDeferred
async def test_stopping_during_the_self_test_closes_its_connection_and_port() -> None:
    reached: Deferred[Any] = Deferred()

    def stalling(transport: object) -> IZeroCopySink:
        # Not at once: the test would stop the service from inside the test.
        reactor.callLater(0, reached.callback, transport)
        return SendingNothing()

    zero_copy = ZeroCopy(partial(self_test, reactor, reactor, stalling))
    with capturedLogs() as events:
        zero_copy.startService()
        transport = await reached.addTimeout(5, reactor)
        port = transport.getHost().port
        await zero_copy.stopService().addTimeout(2, reactor)

    assert transport.disconnected
    assert not await zero_copy.checked()
    assert warnings_in(events) == []
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError):
        await endpoint.connect(Factory())
