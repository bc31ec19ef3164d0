"""
ChunkWriter lands a blob on disk, verifies it, and tells observers how far it
got, never more and never before it is true; BodyReceiver feeds it one
upstream body and says how that body ended.
"""

import errno
import os
from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.fetch.writer import (
    BodyReceiver,
    ChunkWriter,
    IBlobProgress,
    UpstreamStalled,
    VerificationFailed,
)
from blobserve.store.files import TemporaryBlob

from fakes import failure_of, has_fired, result_of, store_at

DATA = bytes(range(256)) * 40
DIGEST = Digest.of(DATA)


@pytest.fixture
def temporary(tmp_path: Path) -> TemporaryBlob:
    return store_at(str(tmp_path)).create_temporary(DIGEST)


@pytest.fixture
def writer(temporary: TemporaryBlob) -> ChunkWriter:
    return ChunkWriter(temporary, len(DATA))


def test_provides_progress(writer: ChunkWriter) -> None:
    assert verifyObject(IBlobProgress, writer)


def test_observer_fires_once_bytes_beyond_its_offset_are_on_disk(
    temporary: TemporaryBlob, writer: ChunkWriter
) -> None:
    at_zero = writer.when_beyond(0)
    beyond_ten = writer.when_beyond(10)
    assert not has_fired(at_zero)

    writer.append(DATA[:10])
    assert result_of(at_zero) == 10
    assert not has_fired(beyond_ten)
    # What an observer is told is on disk really is.
    assert temporary.open_reader().read(0, 100) == DATA[:10]

    writer.append(DATA[10:11])
    assert result_of(beyond_ten) == 11
    assert result_of(writer.when_beyond(5)) == 11


def test_completion_is_told_only_after_verification(writer: ChunkWriter) -> None:
    finished = writer.when_finished()
    writer.append(DATA)
    at_end = writer.when_beyond(len(DATA))
    assert not has_fired(at_end)
    assert not has_fired(finished)
    assert not writer.complete

    writer.finish()
    assert writer.complete
    assert result_of(at_end) == len(DATA)
    assert result_of(finished) == len(DATA)
    # Late observers learn the end at once, whatever offset they ask about.
    assert result_of(writer.when_beyond(len(DATA))) == len(DATA)
    assert result_of(writer.when_finished()) == len(DATA)


def test_unknown_length_is_verified_by_digest(temporary: TemporaryBlob) -> None:
    writer = ChunkWriter(temporary, None)
    writer.append(DATA)
    writer.finish()
    assert result_of(writer.when_finished()) == len(DATA)


def test_digest_mismatch_fails_every_observer(writer: ChunkWriter) -> None:
    waiting = writer.when_beyond(len(DATA))
    finished = writer.when_finished()
    corrupt = bytearray(DATA)
    corrupt[100] ^= 1
    writer.append(bytes(corrupt))
    writer.finish()

    assert writer.failed
    failure_of(waiting).trap(VerificationFailed)
    failure_of(finished).trap(VerificationFailed)
    failure_of(writer.when_beyond(0)).trap(VerificationFailed)


def test_short_body_fails(writer: ChunkWriter) -> None:
    writer.append(DATA[:-1])
    writer.finish()
    failure_of(writer.when_finished()).trap(VerificationFailed)


def test_more_than_content_length_fails(writer: ChunkWriter) -> None:
    writer.append(DATA + b"x")
    failure_of(writer.when_finished()).trap(VerificationFailed)


def test_cancelled_observer_is_dropped(writer: ChunkWriter) -> None:
    waiting = writer.when_beyond(0)
    waiting.cancel()
    failure_of(waiting).trap(CancelledError)
    # Were it still subscribed, firing it again would raise AlreadyCalledError.
    writer.append(DATA)
    writer.finish()
    assert writer.complete


def test_full_disk_fails_the_blob() -> None:
    # Writes to /dev/full fail with ENOSPC, as on a full file system.
    full = TemporaryBlob(DIGEST, "/dev/full", os.open("/dev/full", os.O_RDWR))
    writer = ChunkWriter(full, len(DATA))
    waiting = writer.when_beyond(0)
    writer.append(DATA)
    error = failure_of(waiting).value
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    full.close()


def receiving(
    writer: ChunkWriter, skip: int = 0
) -> tuple[BodyReceiver, StringTransport, Clock]:
    clock = Clock()
    receiver = writer.receive(clock, 30, skip)
    transport = StringTransport()
    receiver.makeConnection(transport)
    return receiver, transport, clock


def test_receiver_appends_body_and_ends_cleanly(writer: ChunkWriter) -> None:
    receiver, _, clock = receiving(writer)
    receiver.dataReceived(DATA[:100])
    receiver.dataReceived(DATA[100:])
    receiver.connectionLost(Failure(ResponseDone()))
    assert result_of(receiver.ended) is None
    assert writer.written == len(DATA)
    # Ending a body does not finish the blob: the download decides.
    assert not writer.complete
    assert not clock.getDelayedCalls()


def test_broken_body_is_a_pause_not_a_failure(writer: ChunkWriter) -> None:
    waiting = writer.when_beyond(100)
    receiver, _, _ = receiving(writer)
    receiver.dataReceived(DATA[:50])
    receiver.connectionLost(Failure(ConnectionLost()))
    failure_of(receiver.ended).trap(ConnectionLost)
    assert not writer.failed
    assert not has_fired(waiting)

    resumed, _, _ = receiving(writer)
    resumed.dataReceived(DATA[50:])
    assert result_of(waiting) == len(DATA)


def test_receiver_skips_bytes_already_on_disk(writer: ChunkWriter) -> None:
    writer.append(DATA[:1000])
    # An upstream that ignored the Range request sends everything again.
    receiver, _, _ = receiving(writer, skip=1000)
    receiver.dataReceived(DATA[:600])
    assert writer.written == 1000
    receiver.dataReceived(DATA[600:])
    receiver.connectionLost(Failure(ResponseDone()))
    writer.finish()
    assert writer.complete


def test_body_ending_before_the_skipped_bytes_is_a_break(writer: ChunkWriter) -> None:
    writer.append(DATA[:1000])
    receiver, _, _ = receiving(writer, skip=1000)
    receiver.dataReceived(DATA[:500])
    receiver.connectionLost(Failure(ResponseDone()))
    failure_of(receiver.ended).trap(VerificationFailed)


def test_stalled_upstream_is_dropped(writer: ChunkWriter) -> None:
    receiver, transport, clock = receiving(writer)
    clock.advance(20)
    receiver.dataReceived(DATA[:10])
    clock.advance(20)
    # Data arrived 20 s ago: not stalled yet.
    assert transport.producerState == "producing"
    clock.advance(10)
    assert transport.producerState == "stopped"
    receiver.connectionLost(Failure(ConnectionLost()))
    failure_of(receiver.ended).trap(UpstreamStalled)
    assert not writer.failed


def test_receiver_stops_upstream_once_the_blob_failed(writer: ChunkWriter) -> None:
    receiver, transport, _ = receiving(writer)
    receiver.dataReceived(DATA + b"too long")
    assert writer.failed
    assert transport.producerState == "stopped"


def test_a_resuming_writer_goes_on_from_the_hash_of_the_bytes_on_disk(
    temporary: TemporaryBlob,
) -> None:
    temporary.write(DATA[:1000])
    hasher = DIGEST.hasher()
    hasher.update(DATA[:1000])
    writer = ChunkWriter.resuming(temporary, hasher, 1000, len(DATA))
    # The bytes on disk are there for followers at once.
    assert result_of(writer.when_beyond(0)) == 1000
    waiting = writer.when_beyond(1000)
    writer.append(DATA[1000:])
    assert result_of(waiting) == len(DATA)
    writer.finish()
    assert result_of(writer.when_finished()) == len(DATA)


def test_a_resuming_writer_whose_bytes_on_disk_are_wrong_fails(
    temporary: TemporaryBlob,
) -> None:
    temporary.write(b"\0" * 1000)
    hasher = DIGEST.hasher()
    hasher.update(b"\0" * 1000)
    writer = ChunkWriter.resuming(temporary, hasher, 1000, len(DATA))
    writer.append(DATA[1000:])
    writer.finish()
    failure_of(writer.when_finished()).trap(VerificationFailed)
