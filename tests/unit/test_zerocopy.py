"""
Bodies sent with sendfile: the producer's use of a zero-copy sink keeps every
byte in order whatever the sink takes, and the socket sink does so on a real
loopback connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from hypothesis import given
from hypothesis import strategies as st
from test_producer import CountingReader, FollowingResource
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Request, Site
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.producer import CompleteBlob
from blobserve.storage import BlobReader, DirectoryBlobStore
from blobserve.writer import ChunkWriter
from blobserve.zerocopy import IZeroCopySink

from fakes import ClientTransport, Connection, connect, run_now

DATA = os.urandom(12800)
DIGEST = Digest.of(DATA)


@implementer(IZeroCopySink)
class ScriptedSink:
    """
    A sink in front of an in-memory transport: it takes the amounts it is
    given in turn (at most what is asked, nothing while the transport holds
    bytes), and puts what it takes straight on the wire.
    """

    def __init__(self, transport: ClientTransport, amounts: list[int]) -> None:
        self._transport = transport
        self._amounts = iter(amounts)
        self.sent = 0

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        if len(self._transport.value()) > self._transport._sent:
            return 0
        amount = min(count, next(self._amounts, count))
        # As sendfile does: from the file itself, not through the reader.
        data = os.pread(reader.fileno(), amount, offset)
        self._transport.io.write(data)
        self._transport._sent += len(data)
        self.sent += len(data)
        return len(data)


class SinkResource(FollowingResource):
    """
    Serves one blob with a producer that has a L{ScriptedSink}.
    """

    def __init__(self, *args: Any, amounts: list[int]) -> None:
        super().__init__(*args)
        self.amounts = amounts
        self.sinks: list[ScriptedSink] = []

    def sink_for(self, request: Request) -> ScriptedSink:
        transport = request.channel.transport
        assert isinstance(transport, ClientTransport)
        sink = ScriptedSink(transport, self.amounts)
        self.sinks.append(sink)
        return sink


@pytest.fixture
def store(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(str(tmp_path), run_blocking=run_now)


def serve(
    store: DirectoryBlobStore, amounts: list[int], limit: int
) -> tuple[ChunkWriter, SinkResource, Connection]:
    temporary = store.create_temporary(DIGEST)
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    resource = SinkResource(reader, writer, len(DATA), amounts=amounts)
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
)
def test_every_byte_arrives_in_order_whatever_the_sink_takes(
    tmp_path_factory: pytest.TempPathFactory,
    amounts: list[int],
    cuts: list[int],
    limit: int,
) -> None:
    store = DirectoryBlobStore(str(tmp_path_factory.mktemp("s")), run_blocking=run_now)
    writer, resource, connection = serve(store, amounts, limit)
    for piece in pieces(DATA, cuts):
        writer.append(piece)
        connection.transport.drain()
    writer.finish()
    for _ in range(len(DATA)):
        if connection.response()[2] == DATA:
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

    monkeypatch.setattr("blobserve.zerocopy.os.sendfile", counting)
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
