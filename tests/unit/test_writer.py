"""
ChunkWriter: lands a body on disk, verifies it, and tells observers how far it
got, never more and never before it is true.
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
from blobserve.storage import DirectoryBlobStore, TemporaryBlob
from blobserve.writer import (
    ChunkWriter,
    IBlobProgress,
    UpstreamStalled,
    VerificationFailed,
)

from fakes import failure_of, has_fired, result_of, run_now

DATA = bytes(range(256)) * 40
DIGEST = Digest.of(DATA)


@pytest.fixture
def temporary(tmp_path: Path) -> TemporaryBlob:
    return DirectoryBlobStore(str(tmp_path), run_blocking=run_now).create_temporary(
        DIGEST
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


def writer_for(
    temporary: TemporaryBlob, clock: Clock, length: int | None = len(DATA)
) -> tuple[ChunkWriter, StringTransport]:
    writer = ChunkWriter(temporary, length, clock, idle_timeout=30)
    transport = StringTransport()
    writer.makeConnection(transport)
    return writer, transport


def test_provides_progress(temporary: TemporaryBlob, clock: Clock) -> None:
    writer, _ = writer_for(temporary, clock)
    assert verifyObject(IBlobProgress, writer)


def test_observer_fires_once_bytes_beyond_its_offset_are_on_disk(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, _ = writer_for(temporary, clock)
    at_zero = writer.when_beyond(0)
    beyond_ten = writer.when_beyond(10)
    assert not has_fired(at_zero)

    writer.dataReceived(DATA[:10])
    assert result_of(at_zero) == 10
    assert not has_fired(beyond_ten)
    # What an observer is told is on disk really is.
    assert temporary.open_reader().read(0, 100) == DATA[:10]

    writer.dataReceived(DATA[10:11])
    assert result_of(beyond_ten) == 11
    assert result_of(writer.when_beyond(5)) == 11


def test_completion_is_told_only_after_verification(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, _ = writer_for(temporary, clock)
    finished = writer.when_finished()
    writer.dataReceived(DATA)
    at_end = writer.when_beyond(len(DATA))
    assert not has_fired(at_end)
    assert not has_fired(finished)
    assert not writer.complete

    writer.connectionLost(Failure(ResponseDone()))
    assert writer.complete
    assert result_of(at_end) == len(DATA)
    assert result_of(finished) == len(DATA)
    # Late observers learn the end at once, whatever offset they ask about.
    assert result_of(writer.when_beyond(len(DATA))) == len(DATA)
    assert result_of(writer.when_finished()) == len(DATA)


def test_unknown_length_is_verified_by_digest(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, _ = writer_for(temporary, clock, length=None)
    writer.dataReceived(DATA)
    writer.connectionLost(Failure(ResponseDone()))
    assert result_of(writer.when_finished()) == len(DATA)


def test_digest_mismatch_fails_every_observer(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, _ = writer_for(temporary, clock)
    waiting = writer.when_beyond(len(DATA))
    finished = writer.when_finished()
    corrupt = bytearray(DATA)
    corrupt[100] ^= 1
    writer.dataReceived(bytes(corrupt))
    writer.connectionLost(Failure(ResponseDone()))

    assert not writer.complete
    failure_of(waiting).trap(VerificationFailed)
    failure_of(finished).trap(VerificationFailed)
    failure_of(writer.when_beyond(0)).trap(VerificationFailed)


def test_short_body_fails(temporary: TemporaryBlob, clock: Clock) -> None:
    writer, _ = writer_for(temporary, clock)
    writer.dataReceived(DATA[:-1])
    writer.connectionLost(Failure(ResponseDone()))
    failure_of(writer.when_finished()).trap(VerificationFailed)


def test_body_longer_than_content_length_fails_and_stops_upstream(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, transport = writer_for(temporary, clock)
    writer.dataReceived(DATA + b"x")
    failure_of(writer.when_finished()).trap(VerificationFailed)
    assert transport.producerState == "stopped"


def test_lost_connection_fails(temporary: TemporaryBlob, clock: Clock) -> None:
    writer, _ = writer_for(temporary, clock)
    waiting = writer.when_beyond(100)
    writer.dataReceived(DATA[:50])
    writer.connectionLost(Failure(ConnectionLost()))
    failure_of(waiting).trap(ConnectionLost)
    failure_of(writer.when_finished()).trap(ConnectionLost)


def test_cancelled_observer_is_dropped(temporary: TemporaryBlob, clock: Clock) -> None:
    writer, _ = writer_for(temporary, clock)
    waiting = writer.when_beyond(0)
    waiting.cancel()
    failure_of(waiting).trap(CancelledError)
    # Were it still subscribed, firing it again would raise AlreadyCalledError.
    writer.dataReceived(DATA)
    writer.connectionLost(Failure(ResponseDone()))
    assert writer.complete


def test_stalled_upstream_fails_and_is_stopped(
    temporary: TemporaryBlob, clock: Clock
) -> None:
    writer, transport = writer_for(temporary, clock)
    clock.advance(20)
    writer.dataReceived(DATA[:10])
    clock.advance(20)
    # Data arrived 20 s ago: not stalled yet.
    assert transport.producerState == "producing"
    clock.advance(10)
    failure_of(writer.when_finished()).trap(UpstreamStalled)
    assert transport.producerState == "stopped"


def test_full_disk_fails_and_stops_upstream(clock: Clock) -> None:
    # Writes to /dev/full fail with ENOSPC, as on a full file system.
    full = TemporaryBlob(DIGEST, "/dev/full", os.open("/dev/full", os.O_RDWR))
    writer, transport = writer_for(full, clock)
    waiting = writer.when_beyond(0)
    writer.dataReceived(DATA)
    error = failure_of(waiting).value
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert transport.producerState == "stopped"
    assert not clock.getDelayedCalls()
    full.close()
