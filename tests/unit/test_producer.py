"""
FollowingProducer: one request, one reader, bounded reads, honest endings.
"""

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.fetch.writer import ChunkWriter, IBlobProgress
from blobserve.serve.producer import CompleteBlob, FollowingProducer
from blobserve.serve.zerocopy import IZeroCopySink, SocketSink
from blobserve.store.files import BlobReader, TemporaryBlob

from fakes import Connection, connect, store_at

CHUNK = 1000
DATA = bytes(range(256)) * 50  # 12800 bytes: 13 chunks
DIGEST = Digest.of(DATA)


class CountingReader:
    """
    A reader that records each read and whether it was closed.
    """

    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self.reads: list[tuple[int, int]] = []
        self.closed = False

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self._reader.read(offset, size)

    def fileno(self) -> int:
        return self._reader.fileno()

    def close(self) -> None:
        self.closed = True
        self._reader.close()


class FollowingResource(Resource):
    """
    Serves one blob with a FollowingProducer, as the registry resource does.
    """

    isLeaf = True
    clock: Clock | None = None

    def __init__(
        self, reader: CountingReader, progress: IBlobProgress, length: int | None
    ) -> None:
        super().__init__()
        self.reader = reader
        self.progress = progress
        self.length = length

    def sink_for(self, request: Request) -> IZeroCopySink | None:
        return SocketSink.under(request)

    def render_GET(self, request: Request) -> int:
        if self.length is not None:
            request.setHeader(b"Content-Length", b"%d" % self.length)
        FollowingProducer(
            request,
            self.reader,  # type: ignore[arg-type]
            self.progress,
            end=self.length,
            chunk_size=CHUNK,
            sink_for=self.sink_for,
            clock=self.clock,
        ).start()
        return NOT_DONE_YET


@pytest.fixture
def temporary(tmp_path: Path) -> TemporaryBlob:
    store = store_at(str(tmp_path))
    return store.create_temporary(DIGEST)


def get(
    reader: CountingReader, progress: IBlobProgress, length: int | None
) -> Connection:
    connection = connect(FollowingResource(reader, progress, length))
    connection.request("GET", "/blob")
    return connection


def test_complete_blob_is_sent_in_bounded_chunks(temporary: TemporaryBlob) -> None:
    temporary.write(DATA)
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, CompleteBlob(len(DATA)), len(DATA))

    status, headers, body = connection.response()
    assert (status, body) == (200, DATA)
    assert headers["content-length"] == str(len(DATA))
    assert max(size for _, size in reader.reads) <= CHUNK
    assert reader.closed
    assert not connection.transport.aborted


def test_paused_producer_reads_nothing(temporary: TemporaryBlob) -> None:
    temporary.write(DATA)
    reader = CountingReader(temporary.open_reader())
    connection = connect(FollowingResource(reader, CompleteBlob(len(DATA)), len(DATA)))
    # Headers and three chunks overflow it.
    connection.transport.buffer_limit = 2500
    connection.request("GET", "/blob")
    # The socket buffer filled after three chunks: reading stopped.
    assert len(reader.reads) == 3
    assert len(connection.response()[2]) == 3 * CHUNK

    connection.transport.drain()
    assert len(reader.reads) == 6
    while len(connection.response()[2]) < len(DATA):
        connection.transport.drain()
    assert connection.response()[2] == DATA
    assert reader.closed


def test_paused_producer_ignores_new_bytes_until_resumed(
    temporary: TemporaryBlob,
) -> None:
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, writer, len(DATA))
    connection.transport.buffer_limit = 2500
    writer.append(DATA[:2500])
    # Headers and 2500 body bytes overflow the buffer: the producer is paused.
    assert connection.transport.producerState == "paused"
    assert len(connection.response()[2]) == 2500
    reads = len(reader.reads)
    writer.append(DATA[2500:])
    writer.finish()
    assert len(reader.reads) == reads
    assert len(connection.response()[2]) == 2500

    while len(connection.response()[2]) < len(DATA):
        connection.transport.drain()
    assert connection.response()[2] == DATA
    assert reader.closed


def test_follows_growing_file_and_holds_last_byte_until_verified(
    temporary: TemporaryBlob,
) -> None:
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, writer, len(DATA))
    assert connection.response()[0] == 200
    assert connection.response()[2] == b""

    writer.append(DATA[:5000])
    assert connection.response()[2] == DATA[:5000]
    writer.append(DATA[5000:])
    # Everything is on disk but not yet verified: the last byte waits.
    assert connection.response()[2] == DATA[:-1]
    writer.finish()
    assert connection.response()[2] == DATA
    assert reader.closed
    assert not connection.transport.aborted


def test_unknown_length_is_sent_chunked_to_the_end(temporary: TemporaryBlob) -> None:
    writer = ChunkWriter(temporary, None)
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, writer, None)
    writer.append(DATA)
    assert not connection.response()[2].endswith(b"0\r\n\r\n")
    writer.finish()
    _status, headers, body = connection.response()
    assert headers["transfer-encoding"] == "chunked"
    assert body.endswith(b"0\r\n\r\n")


def test_failed_download_aborts_the_connection(temporary: TemporaryBlob) -> None:
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, writer, len(DATA))
    corrupt = bytearray(DATA)
    corrupt[-1] ^= 1
    writer.append(bytes(corrupt))
    writer.finish()

    assert connection.transport.aborted
    assert len(connection.response()[2]) < len(DATA)
    assert reader.closed


@implementer(IBlobProgress)
class RecordingProgress:
    """
    Progress that never advances and records whether its observer is cancelled.
    """

    def __init__(self) -> None:
        self.cancelled = 0
        self.waiting = 0

    def when_beyond(self, offset: int) -> "Deferred[int]":
        self.waiting += 1

        def cancel(d: "Deferred[int]") -> None:
            self.cancelled += 1

        return Deferred(cancel)


def test_stopped_producer_releases_file_and_observer(
    temporary: TemporaryBlob,
) -> None:
    progress = RecordingProgress()
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, progress, 100)
    assert progress.waiting == 1

    connection.disconnect()
    assert reader.closed
    assert progress.cancelled == 1


def test_file_shorter_than_promised_aborts(temporary: TemporaryBlob) -> None:
    temporary.write(DATA[:100])
    reader = CountingReader(temporary.open_reader())
    connection = get(reader, CompleteBlob(len(DATA)), len(DATA))
    assert connection.transport.aborted
    assert reader.closed


def test_client_that_takes_nothing_is_dropped_after_the_timeout(
    temporary: TemporaryBlob,
) -> None:
    temporary.write(DATA)
    clock = Clock()
    reader = CountingReader(temporary.open_reader())
    resource = StallWatchingResource(reader, CompleteBlob(len(DATA)), len(DATA), clock)
    connection = connect(resource)
    connection.transport.buffer_limit = 2500
    connection.request("GET", "/blob")
    clock.advance(59)
    connection.transport.drain()
    # It took something within the timeout: the clock starts again.
    clock.advance(59)
    assert not connection.transport.aborted
    clock.advance(1)
    assert connection.transport.aborted
    assert reader.closed
    assert not clock.getDelayedCalls()


def test_client_waiting_for_upstream_bytes_is_not_dropped(
    temporary: TemporaryBlob,
) -> None:
    clock = Clock()
    writer = ChunkWriter(temporary, len(DATA))
    reader = CountingReader(temporary.open_reader())
    connection = connect(StallWatchingResource(reader, writer, len(DATA), clock))
    connection.request("GET", "/blob")
    clock.advance(3600)
    assert not connection.transport.aborted
    writer.append(DATA)
    writer.finish()
    assert connection.response()[2] == DATA


class StallWatchingResource(FollowingResource):
    """
    Serves one blob with a producer that drops clients idle for 60 s.
    """

    def __init__(
        self,
        reader: CountingReader,
        progress: IBlobProgress,
        length: int | None,
        clock: Clock,
    ) -> None:
        super().__init__(reader, progress, length)
        self.clock = clock

    def render_GET(self, request: Request) -> int:
        if self.length is not None:
            request.setHeader(b"Content-Length", b"%d" % self.length)
        FollowingProducer(
            request,
            self.reader,  # type: ignore[arg-type]
            self.progress,
            end=self.length,
            chunk_size=CHUNK,
            clock=self.clock,
            client_timeout=60,
        ).start()
        return NOT_DONE_YET


class FailingReader(CountingReader):
    """
    A reader whose disk fails after C{good} bytes.
    """

    good = 3 * CHUNK

    def read(self, offset: int, size: int) -> bytes:
        if offset >= self.good:
            raise OSError(5, "Input/output error")
        return super().read(offset, size)


def test_read_error_cuts_the_response_and_releases_the_reader(
    temporary: TemporaryBlob,
) -> None:
    writer = ChunkWriter(temporary, len(DATA))
    reader = FailingReader(temporary.open_reader())
    connection = get(reader, writer, len(DATA))
    writer.append(DATA[:CHUNK])
    assert not connection.transport.aborted
    # The failing read comes from a Deferred's callback: it must not vanish
    # into the Deferred and leave the response hanging.
    writer.append(DATA[CHUNK:])
    assert connection.transport.aborted
    assert reader.closed
    assert writer.observers == 0
    assert len(connection.response()[2]) == FailingReader.good
