"""
The single-flight table: one download per digest, forgotten when it ends.
"""

from functools import partial
from pathlib import Path

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.fetch.download import Download, Stopped
from blobserve.fetch.inflight import IInFlightTable, InFlightTable
from blobserve.upstream.client import BlobUnknown

from fakes import FakeUpstream, failure_of, has_fired, store_at

DIGEST = Digest.of(b"one")
OTHER = Digest.of(b"other")


def table_for(tmp_path: Path) -> tuple[InFlightTable, FakeUpstream]:
    upstream = FakeUpstream()
    store = store_at(str(tmp_path))
    create = partial(Download, store=store, clock=Clock())
    return InFlightTable(create), upstream


def test_provides_interface(tmp_path: Path) -> None:
    assert verifyObject(IInFlightTable, table_for(tmp_path)[0])


def test_joining_a_running_download_starts_no_other(tmp_path: Path) -> None:
    table, upstream = table_for(tmp_path)
    first = table.join("a", DIGEST, upstream)
    assert table.join("b", DIGEST, upstream) is first
    assert table.get(DIGEST) is first
    assert table.join("a", OTHER, upstream) is not first
    assert len(upstream.fetches) == 2
    assert len(table) == 2


def test_ended_download_leaves_the_table(tmp_path: Path) -> None:
    table, upstream = table_for(tmp_path)
    first = table.join("a", DIGEST, upstream)
    upstream.fetches[0][2].errback(Failure(BlobUnknown()))
    assert table.get(DIGEST) is None
    assert len(table) == 0
    assert table.join("a", DIGEST, upstream) is not first
    assert len(upstream.fetches) == 2


def test_download_ending_at_once_leaves_the_table(tmp_path: Path) -> None:
    table, upstream = table_for(tmp_path)
    upstream.refusal = BlobUnknown()
    download = table.join("a", DIGEST, upstream)
    assert len(table) == 0
    failure_of(download.when_ready()).trap(BlobUnknown)


def test_stopping_all_stops_every_download_and_fires_when_they_end(
    tmp_path: Path,
) -> None:
    table, upstream = table_for(tmp_path)
    downloads = [table.join("a", digest, upstream) for digest in (DIGEST, OTHER)]
    stopped = table.stop_all()
    assert has_fired(stopped)
    assert upstream.cancelled == [DIGEST, OTHER]
    for download in downloads:
        failure_of(download.when_ready()).trap(Stopped)
    assert len(table) == 0
