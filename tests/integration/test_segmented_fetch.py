"""
Segmented upstream fetch against a real docker-registry through the relay:
a blob over --segment-size comes over --upstream-segments range requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import gatherResults

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess
from relay import Relay

MIB = 1024 * 1024


@pytest_twisted.async_yield_fixture
async def segmented(tmp_path: Path, relay: Relay) -> AsyncIterator[BlobserveProcess]:
    process = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--segment-size=1M", "--upstream-segments=4"),
    )
    await process.start()
    yield process
    process.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_blob_comes_over_four_ranges_covering_it_once(
    segmented: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    assert len(data) == 4 * MIB
    downloads = [client.get(blob_url(segmented, digest)) for _ in range(2)]
    for fetch in await gatherResults([d.finished() for d in downloads]):
        assert_correct(fetch, data)
    await until(committed_path(segmented, digest).exists, "the commit")

    asked = [
        ranged
        for (method, path), ranged in zip(relay.requests, relay.ranges, strict=True)
        if method == "GET" and path.endswith(str(digest))
    ]
    # The plain GET is the first segment; three ranges the others, asked
    # for at once (in whatever order they reach the relay).
    assert asked[0] is None
    assert sorted(asked[1:], key=lambda ranged: ranged or b"") == [
        b"bytes=1048576-2097151",
        b"bytes=2097152-3145727",
        b"bytes=3145728-4194303",
    ]
    # The first segment is cut where the second begins: only the bytes in
    # flight then come twice.
    received = sum(n for path, n in relay.body_bytes.items() if str(digest) in path)
    assert received <= 1.02 * len(data)

    # Committed: a hit, with no more upstream requests.
    again = await client.get(blob_url(segmented, digest)).finished()
    assert_correct(again, data)
    assert len(relay.requests) == len(relay.ranges)
    assert sum(1 for _, path in relay.requests if path.endswith(str(digest))) == 4


@pytest_twisted.ensureDeferred
async def test_an_upstream_ignoring_ranges_serves_the_blob_over_one_stream(
    segmented: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    relay.ignore_range = True
    fetch = await client.get(blob_url(segmented, digest)).finished()
    assert_correct(fetch, data)
    await until(committed_path(segmented, digest).exists, "the commit")
    # The plain GET carries the blob; each range answered with the whole
    # blob is dropped after its first bytes.
    assert sum(1 for _, path in relay.requests if path.endswith(str(digest))) == 4
    received = sum(n for path, n in relay.body_bytes.items() if str(digest) in path)
    # Each dropped answer costs at most a small body's read (64 KiB) and a
    # chunk in flight: 1.03x measured.
    assert received <= 1.15 * len(data)
