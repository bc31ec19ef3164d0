"""
Lazy pulling over real sockets: a stargz snapshotter's ranges of a cold blob
behind a slow upstream are each answered long before the blob could be
downloaded, and the blob still lands in the store; several ranges in one
request come back as a multipart body.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import random
import time

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from blobserve.digest import Digest

from checks import assert_correct, blob_url, committed_path, until
from clients import Client, Fetch
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

SIZE = 64 * 1024 * 1024
#: What the relay lets through per connection: the whole blob takes 16 s.
RATE = 4 * 1024 * 1024
CHUNK = 64 * 1024


def check_range(fetch: Fetch, data: bytes, start: int, end: int) -> None:
    assert fetch.status == 206, fetch.opening
    assert fetch.complete, fetch.error
    assert fetch.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert fetch.sha256 == hashlib.sha256(data[start:end]).hexdigest()


@pytest_twisted.ensureDeferred
async def test_stargz_ranges_of_a_cold_blob_come_before_the_download_could(
    registry: RegistryProcess, blobserve: BlobserveProcess, relay: Relay, client: Client
) -> None:
    relay.rate = RATE
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    url = blob_url(blobserve, digest)
    whole_download = SIZE / RATE
    started = time.monotonic()

    async def read(start: int, end: int) -> float:
        asked = time.monotonic()
        fetch = await client.get(
            url, headers={"Range": f"bytes={start}-{end - 1}"}
        ).finished()
        check_range(fetch, data, start, end)
        return time.monotonic() - asked

    # The footer, then the table of contents it points at, then chunks.
    times = [await read(SIZE - 51, SIZE)]
    times.append(await read(SIZE - 51 - 512 * 1024, SIZE - 51))
    chunks = random.Random(7).sample(range(SIZE // CHUNK), 10)
    times += await gatherResults(
        [Deferred.fromCoroutine(read(i * CHUNK, (i + 1) * CHUNK)) for i in chunks]
    )
    # Each in well under the time the whole blob takes, and all of them
    # before it could have been downloaded.
    assert max(times) < whole_download / 4, times
    assert time.monotonic() - started < whole_download * 0.75

    # The download went on, and a full pull is then a hit.
    await until(committed_path(blobserve, digest).exists, "the commit")
    gets = relay.count("GET", str(digest))
    assert_correct(await client.get(url).finished(), data)
    assert relay.count("GET", str(digest)) == gets


@pytest_twisted.ensureDeferred
async def test_several_ranges_of_a_blob_in_flight_are_one_multipart_body(
    registry: RegistryProcess, blobserve: BlobserveProcess, client: Client
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest: Digest = registry.push_blob("test/blobs", data)
    ranges = [(3_000_000, 3_000_999), (10, 1033), (2_000_000, 2_000_099)]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in ranges)
    fetch = await client.get(
        blob_url(blobserve, digest), headers={"Range": header}
    ).finished()
    assert fetch.status == 206
    assert fetch.complete, fetch.error
    assert fetch.declared_length is not None
    assert fetch.length == fetch.declared_length < 4096
    message = email.message_from_bytes(
        f"Content-Type: {fetch.headers['content-type']}\r\n\r\n".encode()
        + fetch.opening,
        policy=email.policy.HTTP,
    )
    parts = [
        (part["Content-Type"], part["Content-Range"], part.get_payload(decode=True))
        for part in message.walk()
        if not part.is_multipart()
    ]
    assert parts == [
        ("application/octet-stream", f"bytes {a}-{b}/{len(data)}", data[a : b + 1])
        for a, b in ranges
    ]
    await until(committed_path(blobserve, digest).exists, "the commit")
