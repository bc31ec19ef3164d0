"""
Segmented upstream fetch: a large blob fetched over parallel range requests,
landing at its offsets, followed by clients in order, verified in order.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from attrs import define, field
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from blobserve.digest import Digest
from blobserve.fetch import writer
from blobserve.fetch.download import (
    NO_EVENTS,
    Download,
    IDownloadEvents,
    IgnoredEvents,
)
from blobserve.fetch.retry import RetryPolicy
from blobserve.fetch.segments import plan_segments
from blobserve.fetch.slots import UpstreamSlots
from blobserve.fetch.writer import VerificationFailed
from blobserve.store.eviction import Evictor, StoreFull
from blobserve.store.files import BlobReader, DirectoryBlobStore, TemporaryBlob
from blobserve.upstream.client import RangeIgnored

from fakes import (
    FakeResponse,
    FakeUpstream,
    LoggedEvents,
    failure_of,
    has_fired,
    result_of,
    store_at,
)

DATA = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(512))
DIGEST = Digest.of(DATA)
SEGMENT_SIZE = 1000


@define
class Threads:
    """
    Runs the hashing jobs when the test says so, in order.
    """

    jobs: list[tuple[Callable[[], None], Deferred[None]]] = field(factory=list)
    #: What the jobs raised.
    errors: list[Exception] = field(factory=list)

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.jobs.append((work, d))
        return d

    def run(self) -> None:
        while self.jobs:
            work, d = self.jobs.pop(0)
            try:
                work()
            except Exception as e:
                self.errors.append(e)
                d.errback(Failure())
            else:
                d.callback(None)


@define
class Subject:
    download: Download
    upstream: FakeUpstream
    clock: Clock
    root: Path
    threads: Threads
    slots: UpstreamSlots | None

    def answer_first(self, ranges: bool = True, data: bytes = DATA) -> FakeResponse:
        headers = Headers()
        if ranges:
            headers.setRawHeaders(b"accept-ranges", [b"bytes"])
        response = FakeResponse(length=len(data), headers=headers)
        self.upstream.fetches[0][2].callback(response)
        return response

    def answer(self, index: int) -> FakeResponse:
        offset, end = self.upstream.offsets[index], self.upstream.ends[index]
        assert end is not None
        headers = Headers()
        headers.setRawHeaders(
            b"content-range", [f"bytes {offset}-{end - 1}/{len(DATA)}".encode()]
        )
        response = FakeResponse(length=end - offset, code=206, headers=headers)
        self.upstream.fetches[index][2].callback(response)
        return response

    def committed(self) -> bool:
        return (self.root / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex).exists()

    def temporaries(self) -> list[Path]:
        return list((self.root / "tmp").iterdir())


def subject_for(
    root: Path,
    segments: int = 4,
    slots: UpstreamSlots | None = None,
    retries: int = 3,
    evictor: Callable[[DirectoryBlobStore], Evictor] | None = None,
    events: IDownloadEvents = NO_EVENTS,
) -> Subject:
    upstream = FakeUpstream()
    clock = Clock()
    threads = Threads()
    store = store_at(str(root))
    download = Download(
        upstream,
        "library/x",
        DIGEST,
        store,
        clock,
        idle_timeout=10,
        retry=RetryPolicy(retries=retries, delay=1),
        slots=slots,
        segments=segments,
        segment_size=SEGMENT_SIZE,
        in_thread=threads,
        evictor=None if evictor is None else evictor(store),
        events=events,
    )
    download.start()
    return Subject(download, upstream, clock, root, threads, slots)


@pytest.fixture
def subject(tmp_path: Path) -> Subject:
    return subject_for(tmp_path)


def deliver(response: FakeResponse, data: bytes, end: bool = True) -> None:
    assert response.protocol is not None
    response.protocol.dataReceived(data)
    if end:
        response.protocol.connectionLost(Failure(ResponseDone()))


def cut(response: FakeResponse) -> None:
    """
    The connection blobserve dropped closes.
    """
    assert response.transport.producerState == "stopped"
    assert response.protocol is not None
    response.protocol.connectionLost(Failure(ConnectionLost()))


QUARTERS = plan_segments(len(DATA), 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**12), st.integers(1, 16))
def test_segments_cover_the_blob_once_in_at_most_as_many_ranges(
    length: int, count: int
) -> None:
    planned = plan_segments(length, count)
    assert 1 <= len(planned) <= count
    assert planned[0][0] == 0
    assert planned[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(planned))
    assert all(start < end for start, end in planned)
    # Equal ranges but the last, which is no longer.
    sizes = [end - start for start, end in planned]
    assert set(sizes[:-1]) <= {sizes[0]}
    assert sizes[-1] <= sizes[0]
    # Fewer only when the equal ranges reach the end before the last one.
    assert len(planned) == count or (count - 1) * sizes[0] >= length


def test_a_large_blob_from_an_upstream_honouring_ranges_is_fetched_in_segments(
    subject: Subject,
) -> None:
    subject.answer_first()
    assert list(zip(subject.upstream.offsets, subject.upstream.ends, strict=True)) == [
        (0, None),
        (4096, 8192),
        (8192, 12288),
        (12288, 16384),
    ]
    assert subject.download.segments == 4


@pytest.mark.parametrize(
    ("segments", "ranges", "data"),
    [
        (1, True, DATA),
        (4, False, DATA),
        (4, True, DATA[:SEGMENT_SIZE]),
    ],
    ids=["one-segment", "no-accept-ranges", "small-blob"],
)
def test_no_range_is_asked_without_segments_ranges_or_size(
    tmp_path: Path, segments: int, ranges: bool, data: bytes
) -> None:
    subject = subject_for(tmp_path, segments=segments)
    first = subject.answer_first(ranges=ranges, data=data)
    assert subject.upstream.offsets == [0]
    assert subject.upstream.ends == [None]
    deliver(first, data)
    # Hashed as it came: nothing was read back.
    assert subject.threads.jobs == []


def test_extra_segments_take_only_free_upstream_slots(tmp_path: Path) -> None:
    slots = UpstreamSlots(2, 10, 60, Clock())
    subject = subject_for(tmp_path, slots=slots)
    first = subject.answer_first()
    # The download holds one slot; one was free: two segments.
    assert subject.upstream.offsets == [0, 8192]
    assert slots.taken == 2
    deliver(first, DATA[:8192])
    deliver(subject.answer(1), DATA[8192:])
    subject.threads.run()
    assert subject.committed()
    assert slots.taken == 0


def test_no_extra_segment_when_no_slot_is_free(tmp_path: Path) -> None:
    slots = UpstreamSlots(1, 10, 60, Clock())
    subject = subject_for(tmp_path, slots=slots)
    first = subject.answer_first()
    assert subject.upstream.ends == [None]
    deliver(first, DATA)
    assert subject.committed()


def test_observers_are_told_only_the_contiguous_prefix(subject: Subject) -> None:
    first = subject.answer_first()
    progress = result_of(subject.download.when_ready()).progress
    waiting = progress.when_beyond(0)
    deliver(subject.answer(2), DATA[8192:12288])
    assert not has_fired(waiting)
    assert progress.written == 0
    deliver(first, DATA[:4096], end=False)
    # The first segment is cut where the second begins.
    assert first.transport.producerState == "stopped"
    assert result_of(waiting) == 4096
    later = progress.when_beyond(4096)
    deliver(subject.answer(1), DATA[4096:8192])
    assert result_of(later) == 12288
    assert subject.download.fetched == 12288


@settings(max_examples=30, deadline=None)
@given(
    order=st.permutations(range(4)),
    chunk=st.integers(min_value=97, max_value=5000),
    eager=st.booleans(),
)
def test_the_digest_verifies_whatever_order_segments_land_in(
    order: list[int], chunk: int, eager: bool
) -> None:
    with tempfile.TemporaryDirectory() as root:
        subject = subject_for(Path(root))
        first = subject.answer_first()
        responses = [first] + [subject.answer(i) for i in (1, 2, 3)]
        for index in order:
            start, end = QUARTERS[index]
            for offset in range(start, end, chunk):
                deliver(
                    responses[index], DATA[offset : min(offset + chunk, end)], False
                )
                if eager:
                    subject.threads.run()
            if index:
                deliver(responses[index], b"")
            else:
                # Cut where the second segment begins.
                assert first.protocol is not None
                first.protocol.connectionLost(Failure(ConnectionLost()))
        subject.threads.run()
        assert subject.committed()
        blob = Path(root) / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex
        assert blob.read_bytes() == DATA


def test_a_wrong_byte_in_a_later_segment_fails_verification(subject: Subject) -> None:
    first = subject.answer_first()
    done = result_of(subject.download.when_ready()).progress.when_finished()
    deliver(first, DATA[:4096], end=False)
    cut(first)
    deliver(subject.answer(1), DATA[4096:8192])
    wrong = bytearray(DATA[8192:12288])
    wrong[100] ^= 1
    deliver(subject.answer(2), bytes(wrong))
    deliver(subject.answer(3), DATA[12288:])
    subject.threads.run()
    failure_of(done).trap(VerificationFailed)
    assert not subject.committed()
    assert subject.temporaries() == []


def test_a_broken_segment_resumes_alone_from_its_offset(subject: Subject) -> None:
    first = subject.answer_first()
    second = subject.answer(1)
    third = subject.answer(2)
    fourth = subject.answer(3)
    deliver(third, DATA[8192:9000], end=False)
    assert third.protocol is not None
    third.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    assert subject.upstream.offsets[4:] == [9000]
    assert subject.upstream.ends[4:] == [12288]
    for response, (start, end) in zip(
        (first, second, fourth), (QUARTERS[0], QUARTERS[1], QUARTERS[3]), strict=True
    ):
        # Untouched, and delivering still.
        assert response.transport.producerState == "producing"
        deliver(response, DATA[start:end], end=response is not first)
    cut(first)
    deliver(subject.answer(4), DATA[9000:12288])
    subject.threads.run()
    assert subject.committed()
    assert len(subject.upstream.fetches) == 5


def test_a_segment_whose_retries_run_out_fails_the_download(tmp_path: Path) -> None:
    slots = UpstreamSlots(8, 10, 60, Clock())
    subject = subject_for(tmp_path, slots=slots, retries=1)
    first = subject.answer_first()
    done = result_of(subject.download.when_ready()).progress.when_finished()
    subject.upstream.fetches[1][2].errback(ConnectionLost())
    subject.clock.advance(1)
    subject.upstream.fetches[-1][2].errback(ConnectionLost())
    failure_of(done)
    # The other segments' connections are dropped, and every slot is back.
    cut(first)
    assert has_fired(subject.download.when_done())
    assert slots.taken == 0
    assert subject.temporaries() == []


def test_a_range_ignored_falls_back_to_the_first_stream(subject: Subject) -> None:
    first = subject.answer_first()
    third = subject.answer(2)
    deliver(third, DATA[8192:8300], end=False)
    subject.upstream.fetches[1][2].errback(RangeIgnored("upstream answered 200"))
    # Every other segment ends; the first one carries the rest.
    assert third.transport.producerState == "stopped"
    assert DIGEST in subject.upstream.cancelled
    assert third.protocol is not None
    third.protocol.connectionLost(Failure(ConnectionLost()))
    deliver(first, DATA)
    subject.threads.run()
    assert subject.committed()
    assert len(subject.upstream.fetches) == 4


def test_a_range_ignored_after_the_first_segment_ends_resumes_from_the_prefix(
    subject: Subject,
) -> None:
    first = subject.answer_first()
    deliver(first, DATA[:4096], end=False)
    assert first.protocol is not None
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.upstream.fetches[1][2].errback(RangeIgnored("upstream answered 200"))
    # One request from the prefix on, open-ended; the upstream answers 200.
    assert subject.upstream.offsets[4:] == [4096]
    assert subject.upstream.ends[4:] == [None]
    whole = FakeResponse(length=len(DATA))
    subject.upstream.fetches[4][2].callback(whole)
    deliver(whole, DATA)
    subject.threads.run()
    assert subject.committed()


def test_stopping_keeps_only_the_contiguous_prefix(subject: Subject) -> None:
    first = subject.answer_first()
    deliver(first, DATA[:4096], end=False)
    cut(first)
    deliver(subject.answer(2), DATA[8192:12288])
    others = [subject.answer(1), subject.answer(3)]
    stopped = subject.download.stop_and_keep()
    for response in others:
        cut(response)
    subject.threads.run()
    assert has_fired(stopped)
    [kept] = subject.temporaries()
    assert kept.read_bytes() == DATA[:4096]


def test_bytes_landed_ahead_of_the_prefix_count_as_on_disk_for_min_free(
    tmp_path: Path,
) -> None:
    downloads: list[Download] = []
    evictors: list[Evictor] = []
    # The file system's free bytes: 100000 less what the download landed.
    room = 100_000 - len(DATA) - 1000

    def evictor(store: DirectoryBlobStore) -> Evictor:
        made = Evictor(
            store,
            min_free=room - 2000,
            free=lambda: 100_000 - sum(d.fetched for d in downloads),
        )
        evictors.append(made)
        return made

    subject = subject_for(tmp_path, evictor=evictor)
    downloads.append(subject.download)
    subject.answer_first()
    deliver(subject.answer(2), DATA[8192:12288])
    # 4096 bytes on disk, none of them in the prefix: the blob's reservation
    # still has 12288 to come, not 16384, so another 1000 bytes fit.
    other = Digest.of(b"another")
    reserved = result_of(evictors[0].reserve(other, 1000))
    reserved.release()
    # 5000 do not.
    failure_of(evictors[0].reserve(other, 5000)).trap(StoreFull)


class Resumes(IgnoredEvents):
    def __init__(self) -> None:
        self.causes: list[str] = []

    def resumed(self, download: Download, cause: str) -> None:
        self.causes.append(cause)


def test_segmenting_and_each_segment_resume_are_said_and_counted(
    tmp_path: Path,
) -> None:
    resumes = Resumes()
    subject = subject_for(tmp_path, events=resumes)
    with LoggedEvents() as logged:
        subject.answer_first()
        subject.upstream.fetches[3][2].errback(ConnectionLost())
    assert logged.messages() == [
        f"fetching {DIGEST} ({len(DATA)} bytes) over 4 segments",
        f"segment 3 of {DIGEST} broke at byte 12288 (connection lost);"
        " resuming in 1s, attempt 1 of 3",
    ]
    assert resumes.causes == ["broken"]


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_hash_job_under_way_when_the_download_stops_reads_an_open_file(
    subject: Subject,
) -> None:
    first = subject.answer_first()
    progress = result_of(subject.download.when_ready()).progress
    deliver(subject.answer(1), DATA[4096:8192])
    deliver(first, DATA[:4096], end=False)
    cut(first)
    # Bytes 4096..8192 landed ahead: their hash job is in the thread.
    assert len(subject.threads.jobs) == 1
    others = [subject.answer(2), subject.answer(3)]
    stopped = subject.download.stop_and_keep()
    for response in others:
        cut(response)
    failure_of(progress.when_finished())
    before = open_files()
    subject.threads.run()
    assert subject.threads.errors == []
    # The job's read handle is closed once the job is done.
    assert open_files() == before - 1
    assert has_fired(stopped)


def test_a_blob_that_cannot_be_read_back_is_fetched_over_one_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_more_files(self: TemporaryBlob) -> BlobReader:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(TemporaryBlob, "open_reader", no_more_files)
    slots = UpstreamSlots(4, 10, 60, Clock())
    subject = subject_for(tmp_path, slots=slots)
    first = subject.answer_first()
    # No slot is taken for segments that cannot be hashed.
    assert subject.upstream.ends == [None]
    assert slots.taken == 1
    deliver(first, DATA)
    assert subject.committed()
    assert slots.taken == 0


def test_bytes_sent_again_after_a_fallback_do_not_overwrite_the_hashed_prefix(
    subject: Subject,
) -> None:
    first = subject.answer_first()
    deliver(first, DATA[:2000], end=False)
    deliver(subject.answer(1), DATA[4096:8192])
    subject.upstream.fetches[2][2].errback(RangeIgnored("upstream answered 200"))
    # The first segment carries the rest, bytes 4096..8192 again among them.
    deliver(first, DATA[2000:4096], end=False)
    subject.threads.run()
    # Hashed from disk as they were; now sent again, other.
    other = bytearray(DATA[4096:8192])
    other[10] ^= 1
    deliver(first, bytes(other) + DATA[8192:])
    subject.threads.run()
    assert subject.committed()
    blob = subject.root / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex
    assert blob.read_bytes() == DATA


class BrokenEvents(IgnoredEvents):
    def resumed(self, download: Download, cause: str) -> None:
        raise RuntimeError("a bug in an observer")


def test_a_bug_in_a_segment_fails_the_download_and_is_logged(tmp_path: Path) -> None:
    slots = UpstreamSlots(8, 10, 60, Clock())
    subject = subject_for(tmp_path, slots=slots, events=BrokenEvents())
    first = subject.answer_first()
    done = result_of(subject.download.when_ready()).progress.when_finished()
    with LoggedEvents() as logged:
        subject.upstream.fetches[3][2].errback(ConnectionLost())
        # Not an upstream's fault: the blob fails with the bug, at once.
        failure_of(done).trap(RuntimeError)
        cut(first)
    [logged_failure] = logged.failures()
    logged_failure.trap(RuntimeError)
    assert slots.taken == 0
    assert has_fired(subject.download.when_done())


@define
class RefusingThreads(Threads):
    """
    Takes the first hashing job, and refuses every later one (a thread pool
    that is shutting down).
    """

    taken: int = 0

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        if self.taken:
            raise RuntimeError("no thread for the job")
        self.taken += 1
        return super().__call__(work)


def test_a_hash_job_that_cannot_start_fails_the_download_and_is_logged(
    tmp_path: Path,
) -> None:
    subject = subject_for(tmp_path)
    threads = RefusingThreads()
    subject.download._in_thread = threads
    first = subject.answer_first()
    done = result_of(subject.download.when_ready()).progress.when_finished()
    deliver(subject.answer(1), DATA[4096:8192])
    deliver(first, DATA[:4096], end=False)
    cut(first)
    for index in (2, 3):
        deliver(subject.answer(index), DATA[QUARTERS[index][0] : QUARTERS[index][1]])
    # The first job reads 4096..8192 back; the next one cannot start.
    work, d = threads.jobs.pop(0)
    work()
    with LoggedEvents() as logged:
        d.callback(None)
    # The blob fails with the reason, rather than waiting for a job that
    # never comes.
    failure_of(done).trap(RuntimeError)
    assert has_fired(subject.download.when_done())
    assert not subject.committed()
    assert any("no thread" in message for message in logged.messages())


def test_bytes_landed_ahead_are_read_back_into_one_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new object per read raised the process's peak RSS by a few MiB.
    monkeypatch.setattr(writer, "READ_BACK", 1000)
    buffers: list[object] = []
    read_into = BlobReader.read_into

    def recorded(self: BlobReader, offset: int, buffer: memoryview) -> int:
        buffers.append(buffer.obj)
        return read_into(self, offset, buffer)

    monkeypatch.setattr(BlobReader, "read_into", recorded)
    subject = subject_for(tmp_path)
    first = subject.answer_first()
    deliver(first, DATA[:4096], end=False)
    cut(first)
    # The last two quarters land ahead of the prefix, the second in it.
    deliver(subject.answer(3), DATA[12288:])
    deliver(subject.answer(2), DATA[8192:12288])
    deliver(subject.answer(1), DATA[4096:8192])
    subject.threads.run()
    assert subject.committed()
    assert len(buffers) == -(-8192 // 1000)
    assert all(buffer is buffers[0] for buffer in buffers)
