"""
Download: resuming a broken transfer with Range requests, within a retry
budget, and bounding how many downloads run at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from blobserve.digest import Digest
from blobserve.fetch.download import Download, Landing, Stopped
from blobserve.fetch.retry import RetryPolicy
from blobserve.fetch.slots import UpstreamSlots
from blobserve.fetch.writer import VerificationFailed
from blobserve.store.eviction import Evictor, StoreFull
from blobserve.store.index import Origin
from blobserve.upstream.client import BlobUnknown, RangeNotSatisfiable, UpstreamError

from fakes import (
    FakeResponse,
    FakeUpstream,
    LoggedEvents,
    failure_of,
    has_fired,
    result_of,
    store_at,
)

DATA = bytes(range(256)) * 64
DIGEST = Digest.of(DATA)


@define
class Subject:
    download: Download
    upstream: FakeUpstream
    clock: Clock
    root: Path
    evictor: Evictor | None = None

    def answer(
        self, status: int = 200, content_range: str | None = None
    ) -> FakeResponse:
        headers = Headers()
        if content_range is not None:
            headers.setRawHeaders(b"content-range", [content_range.encode()])
        length = len(DATA) if status == 200 else len(DATA) - self.offset
        response = FakeResponse(length=length, code=status, headers=headers)
        self.upstream.fetches[-1][2].callback(response)
        return response

    @property
    def offset(self) -> int:
        return self.upstream.offsets[-1]

    def committed(self) -> bool:
        return (self.root / "blobs" / "sha256" / DIGEST.hex[:2] / DIGEST.hex).exists()

    def temporaries(self) -> list[Path]:
        return list((self.root / "tmp").iterdir())


def subject_for(
    tmp_path: Path, retries: int = 3, max_size: int | None = None
) -> Subject:
    upstream = FakeUpstream()
    clock = Clock()
    store = store_at(str(tmp_path))
    evictor = None if max_size is None else Evictor(store, max_size)
    download = Download(
        upstream,
        "library/x",
        DIGEST,
        store,
        clock,
        idle_timeout=10,
        retry=RetryPolicy(retries=retries, delay=1),
        evictor=evictor,
    )
    download.start()
    return Subject(download, upstream, clock, tmp_path, evictor)


@pytest.fixture
def subject(tmp_path: Path) -> Subject:
    return subject_for(tmp_path)


def landing(subject: Subject) -> Landing:
    return result_of(subject.download.when_ready())


def test_broken_transfer_resumes_from_the_bytes_on_disk(subject: Subject) -> None:
    first = subject.answer()
    progress = landing(subject).progress
    waiting = progress.when_beyond(len(DATA))
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:5000])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    # A pause for followers, not an error.
    assert not has_fired(waiting)
    assert len(subject.upstream.fetches) == 1

    subject.clock.advance(1)
    assert subject.upstream.offsets == [0, 5000]
    second = subject.answer(206, f"bytes 5000-{len(DATA) - 1}/{len(DATA)}")
    assert second.protocol is not None
    second.protocol.dataReceived(DATA[5000:])
    second.protocol.connectionLost(Failure(ResponseDone()))

    assert result_of(waiting) == len(DATA)
    assert subject.committed()
    assert subject.temporaries() == []
    assert has_fired(subject.download.when_done())


def test_upstream_ignoring_range_is_skipped_to_the_offset(subject: Subject) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:5000])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    again = subject.answer(200)
    assert again.protocol is not None
    again.protocol.dataReceived(DATA)
    again.protocol.connectionLost(Failure(ResponseDone()))
    assert subject.committed()


def test_range_starting_elsewhere_is_refused_and_retried(subject: Subject) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:5000])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    wrong = subject.answer(206, f"bytes 4000-{len(DATA) - 1}/{len(DATA)}")
    assert wrong.transport.producerState == "stopped"
    subject.clock.advance(2)
    assert subject.upstream.offsets == [0, 5000, 5000]


def test_stalled_upstream_is_resumed(subject: Subject) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:100])
    subject.clock.advance(10)
    assert first.transport.producerState == "stopped"
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    assert subject.upstream.offsets == [0, 100]


def test_spent_retries_fail_the_download_and_remove_it(subject: Subject) -> None:
    first = subject.answer()
    waiting = landing(subject).progress.when_beyond(len(DATA))
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:100])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    for pause in (1, 2, 4):
        subject.clock.advance(pause)
        subject.upstream.fetches[-1][2].errback(Failure(UpstreamError("down")))
    failure_of(waiting).trap(UpstreamError)
    assert len(subject.upstream.fetches) == 4
    assert subject.temporaries() == []
    assert not subject.committed()
    assert has_fired(subject.download.when_done())


def test_a_transfer_that_breaks_for_good_is_logged_one_line_at_a_time(
    tmp_path: Path,
) -> None:
    subject = subject_for(tmp_path, retries=1)
    with LoggedEvents() as logged:
        first = subject.answer()
        assert first.protocol is not None
        first.protocol.dataReceived(DATA[:100])
        first.protocol.connectionLost(
            Failure(ResponseFailed([Failure(ConnectionLost())]))
        )
        subject.clock.advance(1)
        subject.upstream.fetches[-1][2].errback(ConnectionRefusedError())
    where = f"{DIGEST} of library/x from https://upstream.test"
    assert logged.messages() == [
        f"transfer of {where} broke after 100 bytes (connection lost);"
        " resuming in 1s, attempt 1 of 1",
        f"download of {where} failed after 100 bytes of {len(DATA)}:"
        " connection refused",
    ]
    assert logged.failures() == []


def test_a_download_the_upstream_never_answers_is_logged_in_one_line(
    subject: Subject,
) -> None:
    waiting = subject.download.when_ready()
    with LoggedEvents() as logged:
        subject.upstream.fetches[-1][2].errback(
            ResponseNeverReceived([Failure(ConnectionDone())])
        )
    failure_of(waiting)
    assert logged.messages() == [
        f"cannot fetch {DIGEST} of library/x from https://upstream.test:"
        " no response: connection closed"
    ]
    assert logged.failures() == []


def test_blob_gone_upstream_is_not_retried(subject: Subject) -> None:
    first = subject.answer()
    waiting = landing(subject).progress.when_beyond(len(DATA))
    assert first.protocol is not None
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    subject.upstream.fetches[-1][2].errback(Failure(BlobUnknown()))
    failure_of(waiting).trap(BlobUnknown)
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 2


def test_corrupt_blob_is_not_retried(subject: Subject) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(b"\0" * len(DATA))
    first.protocol.connectionLost(Failure(ResponseDone()))
    failure_of(landing(subject).progress.when_finished()).trap(VerificationFailed)
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 1
    assert subject.temporaries() == []


def test_downloads_wait_for_a_free_slot_in_order(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    store = store_at(str(tmp_path))
    slots = UpstreamSlots(1, queue_limit=10, wait=60, clock=Clock())
    blobs = [bytes([n]) * 10 for n in range(3)]
    downloads = [
        Download(upstream, "x", Digest.of(b), store, Clock(), slots=slots)
        for b in blobs
    ]
    for download in downloads:
        download.start()
    for n, data in enumerate(blobs):
        # One upstream request at a time, first come first served.
        assert len(upstream.fetches) == n + 1
        assert upstream.fetches[n][1] == Digest.of(data)
        response = FakeResponse(length=len(data))
        upstream.fetches[n][2].callback(response)
        assert response.protocol is not None
        response.protocol.dataReceived(data)
        response.protocol.connectionLost(Failure(ResponseDone()))
    assert all(has_fired(d.when_done()) for d in downloads)


def test_failed_blob_is_removed_before_the_upstream_closes(subject: Subject) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA + b"one byte too many")
    assert first.transport.producerState == "stopped"
    # The upstream connection has not closed yet; the temporary is gone.
    assert subject.temporaries() == []


def test_body_without_length_ending_with_a_close_is_complete(
    subject: Subject,
) -> None:
    response = FakeResponse(length=UNKNOWN_LENGTH)
    subject.upstream.fetches[-1][2].callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    # How twisted.web tells the end of a body that ends by closing.
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert result_of(landing(subject).progress.when_finished()) == len(DATA)
    assert subject.committed()
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 1


def test_body_without_length_that_breaks_is_resumed(subject: Subject) -> None:
    response = FakeResponse(length=UNKNOWN_LENGTH)
    subject.upstream.fetches[-1][2].callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:5000])
    # A reset looks the same as the end: the digest tells them apart.
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert not landing(subject).progress.failed
    subject.clock.advance(1)
    assert subject.upstream.offsets == [0, 5000]
    rest = subject.answer(206, f"bytes 5000-{len(DATA) - 1}/{len(DATA)}")
    assert rest.protocol is not None
    rest.protocol.dataReceived(DATA[5000:])
    rest.protocol.connectionLost(Failure(ResponseDone()))
    assert subject.committed()


def test_body_without_length_that_is_all_there_is_and_wrong_fails_at_once(
    subject: Subject,
) -> None:
    response = FakeResponse(length=UNKNOWN_LENGTH)
    subject.upstream.fetches[-1][2].callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:-1] + b"!")
    response.protocol.connectionLost(Failure(PotentialDataLoss()))
    subject.clock.advance(1)
    subject.upstream.fetches[-1][2].errback(RangeNotSatisfiable("nothing past"))
    # No more retries: the upstream has nothing else to give.
    failure_of(landing(subject).progress.when_finished()).trap(VerificationFailed)
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 2
    assert not subject.committed()
    assert subject.temporaries() == []


def test_unbounded_numbers_in_content_range_drop_the_response(
    subject: Subject,
) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:5000])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    subject.clock.advance(1)
    huge = "9" * 5000
    wrong = subject.answer(206, f"bytes {huge}-{huge}/{len(DATA)}")
    assert wrong.transport.producerState == "stopped"
    subject.clock.advance(2)
    assert subject.upstream.offsets == [0, 5000, 5000]


def test_failed_download_ends_before_its_file_is_removed(subject: Subject) -> None:
    ended: list[int] = []
    subject.download.when_done().addCallback(
        lambda _: ended.append(len(subject.temporaries()))
    )
    response = subject.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA + b"!")
    # It ended while its file was still there, and the file went at once.
    assert ended == [1]
    assert subject.temporaries() == []


def restarted(tmp_path: Path, clock: Clock | None = None) -> Subject:
    """
    A download of the same blob by a new process on the same store, which
    has cleaned its temporaries up as blobserve does at start.
    """
    upstream = FakeUpstream()
    clock = clock or Clock()
    store = store_at(str(tmp_path))
    store.remove_stale_temporaries(3600)
    download = Download(
        upstream,
        "library/x",
        DIGEST,
        store,
        clock,
        idle_timeout=10,
        retry=RetryPolicy(retries=3, delay=1),
        registry="docker.io",
    )
    download.start()
    return Subject(download, upstream, clock, tmp_path)


def kept_after_stop(subject: Subject, data: bytes) -> None:
    """
    Let C{subject} land C{data}, then stop it as blobserve does when it
    stops.
    """
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(data)
    stopped = subject.download.stop_and_keep()
    # The upstream connection is dropped; it ends as Twisted ends it.
    assert first.transport.producerState == "stopped"
    first.protocol.connectionLost(Failure(ConnectionLost()))
    assert has_fired(stopped)


def test_a_download_is_recorded_as_unfinished_from_its_first_byte(
    tmp_path: Path,
) -> None:
    subject = restarted(tmp_path)
    headers = Headers({b"etag": [b'"sha256:abc"']})
    response = FakeResponse(length=len(DATA), headers=headers)
    subject.upstream.fetches[-1][2].callback(response)
    [temporary] = subject.temporaries()
    entry = store_at(tmp_path).partials()[DIGEST]
    assert entry.name == temporary.name
    assert entry.origin == Origin("docker.io", "library/x", len(DATA), '"sha256:abc"')
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert subject.committed()
    assert store_at(tmp_path).partials() == {}


def test_a_stopped_download_keeps_its_bytes_and_record(subject: Subject) -> None:
    kept_after_stop(subject, DATA[:5000])
    failure_of(landing(subject).progress.when_beyond(5000)).trap(Stopped)
    [temporary] = subject.temporaries()
    assert temporary.read_bytes() == DATA[:5000]
    assert store_at(subject.root).partials()[DIGEST].written == 5000
    # Not a break to resume now, nor a failure.
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 1
    assert not subject.committed()


def test_a_download_stopped_in_the_pause_before_a_resume_keeps_its_bytes(
    subject: Subject,
) -> None:
    first = subject.answer()
    assert first.protocol is not None
    first.protocol.dataReceived(DATA[:5000])
    first.protocol.connectionLost(Failure(ConnectionLost()))
    assert has_fired(subject.download.stop_and_keep())
    subject.clock.advance(100)
    assert len(subject.upstream.fetches) == 1
    assert [t.stat().st_size for t in subject.temporaries()] == [5000]


def test_a_download_stopped_while_the_upstream_has_not_answered_ends_empty(
    subject: Subject,
) -> None:
    ready = subject.download.when_ready()
    assert has_fired(subject.download.stop_and_keep())
    assert subject.upstream.cancelled == [DIGEST]
    failure_of(ready).trap(Stopped)
    assert subject.temporaries() == []


def test_a_download_stopped_while_it_commits_is_committed(tmp_path: Path) -> None:
    held: list[Deferred[Any]] = []

    def run_later(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    upstream = FakeUpstream()
    store = store_at(str(tmp_path), run_blocking=run_later)
    download = Download(upstream, "x", DIGEST, store, Clock())
    download.start()
    response = FakeResponse(length=len(DATA))
    upstream.fetches[0][2].callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    # Every byte is in and verified; the fsync has not returned.
    stopped = download.stop_and_keep()
    assert not has_fired(stopped)
    while held:
        held.pop(0).callback(None)
    assert has_fired(stopped)
    assert Path(store.path_for(DIGEST)).read_bytes() == DATA
    assert store_at(str(tmp_path)).partials() == {}
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_kept_download_is_resumed_with_a_range_after_a_rehash(
    subject: Subject,
) -> None:
    kept_after_stop(subject, DATA[:5000])
    again = restarted(subject.root)
    assert again.upstream.offsets == [5000]
    rest = again.answer(206, f"bytes 5000-{len(DATA) - 1}/{len(DATA)}")
    # Followers read the bytes on disk at once.
    ready = landing(again)
    assert ready.length == len(DATA)
    assert result_of(ready.progress.when_beyond(0)) == 5000
    assert rest.protocol is not None
    rest.protocol.dataReceived(DATA[5000:])
    rest.protocol.connectionLost(Failure(ResponseDone()))
    assert again.committed()
    path = Path(store_at(subject.root).path_for(DIGEST))
    assert path.read_bytes() == DATA
    assert again.temporaries() == []
    assert store_at(subject.root).partials() == {}


def test_a_kept_download_from_an_upstream_ignoring_range_skips_what_is_on_disk(
    subject: Subject,
) -> None:
    kept_after_stop(subject, DATA[:5000])
    again = restarted(subject.root)
    whole = again.answer(200)
    assert whole.protocol is not None
    whole.protocol.dataReceived(DATA)
    whole.protocol.connectionLost(Failure(ResponseDone()))
    assert again.committed()
    assert Path(store_at(subject.root).path_for(DIGEST)).read_bytes() == DATA


def test_a_kept_download_the_upstream_has_nothing_past_is_fetched_afresh(
    subject: Subject,
) -> None:
    kept_after_stop(subject, DATA[:5000])
    again = restarted(subject.root)
    again.upstream.fetches[-1][2].errback(RangeNotSatisfiable("nothing past"))
    assert again.upstream.offsets == [5000, 0]
    whole = again.answer(200)
    assert whole.protocol is not None
    whole.protocol.dataReceived(DATA)
    whole.protocol.connectionLost(Failure(ResponseDone()))
    assert again.committed()
    assert again.temporaries() == []


def test_a_kept_download_with_wrong_bytes_fails_and_the_next_starts_afresh(
    subject: Subject,
) -> None:
    kept_after_stop(subject, DATA[:5000])
    [temporary] = subject.temporaries()
    temporary.write_bytes(b"\0" * 5000)
    again = restarted(subject.root)
    rest = again.answer(206, f"bytes 5000-{len(DATA) - 1}/{len(DATA)}")
    assert rest.protocol is not None
    rest.protocol.dataReceived(DATA[5000:])
    rest.protocol.connectionLost(Failure(ResponseDone()))
    failure_of(landing(again).progress.when_finished()).trap(VerificationFailed)
    assert not again.committed()
    assert again.temporaries() == []
    third = restarted(subject.root)
    assert third.upstream.offsets == [0]


def test_a_kept_download_whole_on_disk_is_committed_without_the_upstream(
    subject: Subject,
) -> None:
    # Killed after its last byte, before its commit.
    kept_after_stop(subject, DATA[:5000])
    [temporary] = subject.temporaries()
    temporary.write_bytes(DATA)
    again = restarted(subject.root)
    assert again.upstream.fetches == []
    assert again.committed()
    assert result_of(landing(again).progress.when_finished()) == len(DATA)


def test_a_resume_that_fails_keeps_the_bytes_for_the_next_try(
    subject: Subject,
) -> None:
    kept_after_stop(subject, DATA[:5000])
    again = restarted(subject.root)
    again.upstream.fetches[-1][2].errback(UpstreamError("unreachable"))
    failure_of(again.download.when_ready()).trap(UpstreamError)
    assert [t.stat().st_size for t in again.temporaries()] == [5000]
    third = restarted(subject.root)
    assert third.upstream.offsets == [5000]


def test_a_blob_that_cannot_fit_in_the_store_fails_before_a_byte_is_written(
    tmp_path: Path,
) -> None:
    subject = subject_for(tmp_path, max_size=len(DATA) - 1)
    response = subject.answer()
    failure_of(subject.download.when_ready()).trap(StoreFull)
    assert response.transport.producerState == "stopped"
    assert subject.temporaries() == []
    assert not subject.committed()
    assert has_fired(subject.download.when_done())


def test_a_download_holds_room_in_the_store_until_it_ends(tmp_path: Path) -> None:
    subject = subject_for(tmp_path, max_size=10 * len(DATA))
    evictor = subject.evictor
    assert evictor is not None
    response = subject.answer()
    landing(subject)
    assert evictor.reserved == len(DATA)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert subject.committed()
    assert evictor.reserved == 0


def test_a_failed_download_gives_its_room_back(tmp_path: Path) -> None:
    subject = subject_for(tmp_path, max_size=10 * len(DATA))
    evictor = subject.evictor
    assert evictor is not None
    response = subject.answer()
    assert evictor.reserved == len(DATA)
    assert response.protocol is not None
    response.protocol.dataReceived(b"\0" * len(DATA))
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert not subject.committed()
    assert evictor.reserved == 0


def test_a_transfer_is_given_up_after_its_retries_or_when_no_resume_can_mend_it() -> (
    None
):
    policy = RetryPolicy(retries=2)
    broken = Failure(ConnectionLost())
    assert not policy.gives_up(2, broken)
    assert policy.gives_up(3, broken) and policy.exhausted(3)
    for hopeless in (BlobUnknown("gone"), VerificationFailed("wrong bytes")):
        assert policy.gives_up(1, Failure(hopeless))
        assert not policy.exhausted(1)
