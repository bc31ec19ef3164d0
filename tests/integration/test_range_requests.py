"""
Range requests over real sockets, on stored blobs and on blobs in flight.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet.defer import gatherResults

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess
from relay import Relay


@pytest_twisted.ensureDeferred
async def test_range_on_blob_in_flight_waits_for_its_bytes(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    whole = client.get(blob_url(blobserve, digest))
    await whole.when_received(len(data) // 4)
    # Resuming a pull: the rest from an offset that has not landed yet, but
    # lies close enough to the bytes on disk to wait for them (a range far
    # beyond them is forwarded upstream: see test_lazy_pulling).
    start = len(data) // 4 + 512 * 1024
    tail = client.get(blob_url(blobserve, digest), headers={"Range": f"bytes={start}-"})
    whole_fetch, tail_fetch = await gatherResults([whole.finished(), tail.finished()])

    assert_correct(whole_fetch, data)
    assert tail_fetch.status == 206
    assert tail_fetch.complete
    assert tail_fetch.headers["content-range"] == (
        f"bytes {start}-{len(data) - 1}/{len(data)}"
    )
    assert tail_fetch.sha256 == hashlib.sha256(data[start:]).hexdigest()
    assert relay.count("GET", str(digest)) == 1


@pytest_twisted.ensureDeferred
async def test_range_on_stored_blob_and_unsatisfiable_range(
    blobserve: BlobserveProcess, client: Client, blob: Blob
) -> None:
    digest, data = blob
    assert_correct(await client.get(blob_url(blobserve, digest)).finished(), data)
    await until(committed_path(blobserve, digest).exists, "the commit")

    middle = await client.get(
        blob_url(blobserve, digest), headers={"Range": "bytes=100-199"}
    ).finished()
    assert middle.status == 206
    assert middle.sha256 == hashlib.sha256(data[100:200]).hexdigest()

    beyond = await client.get(
        blob_url(blobserve, digest), headers={"Range": f"bytes={len(data)}-"}
    ).finished()
    assert beyond.status == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    # No error code: the distribution spec has none for it.
    assert (beyond.length, beyond.declared_length) == (0, 0)
    assert beyond.complete
