"""
blobserve as a real process, between real clients on loopback and a real
docker-registry upstream reached through a throttling relay.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from blobserve.digest import Digest

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client, stalled_client
from processes import DEADLINE, BlobserveProcess, RegistryProcess, free_port
from relay import Relay


@pytest_twisted.ensureDeferred
async def test_sixteen_cold_clients_cause_one_upstream_get(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    downloads = [client.get(blob_url(blobserve, digest)) for _ in range(16)]
    fetches = await gatherResults([d.finished() for d in downloads])

    for fetch in fetches:
        assert_correct(fetch, data)
        assert fetch.headers["docker-content-digest"] == str(digest)
        assert fetch.declared_length == len(data)
    assert relay.count("GET", str(digest)) == 1
    await until(committed_path(blobserve, digest).exists, "the commit")


@pytest_twisted.ensureDeferred
async def test_late_joiner_reads_disk_then_follows_live_edge(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    first = client.get(blob_url(blobserve, digest))
    await first.when_received(len(data) // 4)
    late = client.get(blob_url(blobserve, digest))
    await late.when_received(1)
    assert first.fetch.done_at is None, "the download ended before the late joiner"
    await late.when_received(len(data) // 2)
    # The late joiner caught up with what was on disk and follows the edge.
    assert first.fetch.done_at is None

    for fetch in await gatherResults([first.finished(), late.finished()]):
        assert_correct(fetch, data)
    assert relay.count("GET", str(digest)) == 1


@pytest_twisted.ensureDeferred
async def test_client_leaving_halfway_does_not_stop_the_download(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    leaving = client.get(blob_url(blobserve, digest), stop_after=len(data) // 2)
    fetch = await leaving.finished()
    assert fetch.error is not None
    assert fetch.length < len(data)

    await until(committed_path(blobserve, digest).exists, "the commit")
    assert committed_path(blobserve, digest).read_bytes() == data
    again = await client.get(blob_url(blobserve, digest)).finished()
    assert_correct(again, data)
    assert relay.count("GET", str(digest)) == 1


@pytest_twisted.ensureDeferred
async def test_corrupt_upstream_body_is_never_committed(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    relay.corrupt_at = len(data) // 2
    downloads = [client.get(blob_url(blobserve, digest)) for _ in range(3)]
    for fetch in await gatherResults([d.finished() for d in downloads]):
        # A truncated body, never a clean end.
        assert fetch.status == 200
        assert fetch.error is not None
        assert fetch.length < len(data)
    assert not committed_path(blobserve, digest).exists()
    assert list((blobserve.storage / "tmp").iterdir()) == []

    relay.corrupt_at = None
    fetch = await client.get(blob_url(blobserve, digest)).finished()
    assert_correct(fetch, data)
    assert relay.count("GET", str(digest)) == 2


@pytest_twisted.ensureDeferred
async def test_stalled_clients_hold_up_nobody_and_cost_no_memory(
    blobserve: BlobserveProcess,
    relay: Relay,
    client: Client,
    registry: RegistryProcess,
) -> None:
    data = os.urandom(96 * 1024 * 1024)
    digest = registry.push_blob("test/blobs", data)
    relay.rate = 64 * 1024 * 1024
    before = blobserve.memory()["VmRSS"]

    stalled = [
        stalled_client(blobserve.port, f"/v2/test/blobs/blobs/{digest}")
        for _ in range(4)
    ]
    normal = [client.get(blob_url(blobserve, digest)) for _ in range(4)]
    for fetch in await gatherResults([d.finished() for d in normal]):
        assert_correct(fetch, data)
    await until(committed_path(blobserve, digest).exists, "the commit")

    # The stalled clients are still connected, far behind, and the server
    # buffered nothing for them: its peak memory grew by much less than the
    # blob, let alone four times the blob.
    growth = blobserve.memory()["VmHWM"] - before
    assert growth < 32 * 1024 * 1024, f"peak RSS grew by {growth >> 20} MiB"
    for s in stalled:
        s.close()
    # One download: the blob is over --segment-size, so its other segments
    # are range requests, and together they carry its bytes once.
    plain = [
        ranged
        for (method, path), ranged in zip(relay.requests, relay.ranges, strict=True)
        if method == "GET" and path.endswith(str(digest)) and ranged is None
    ]
    assert len(plain) == 1
    assert sum(relay.body_bytes.values()) <= 1.02 * len(data)


@pytest_twisted.ensureDeferred
async def test_restarted_service_serves_from_store_without_upstream(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    assert_correct(await client.get(blob_url(blobserve, digest)).finished(), data)
    await until(committed_path(blobserve, digest).exists, "the commit")
    blobserve.stop()

    relay.stop()
    connections = relay.connections
    await blobserve.start()
    fetch = await client.get(blob_url(blobserve, digest)).finished()
    assert_correct(fetch, data)
    assert relay.connections == connections
    assert relay.count("GET", str(digest)) == 1


@pytest_twisted.ensureDeferred
async def test_head_of_cold_blob_asks_upstream_and_downloads_nothing(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    fetch = await client.get(blob_url(blobserve, digest), method="HEAD").finished()
    assert fetch.status == 200
    assert fetch.headers["docker-content-digest"] == str(digest)
    # A client keeps a HEAD response's Content-Length among its headers.
    assert fetch.headers["content-length"] == str(len(data))
    assert relay.count("HEAD", str(digest)) == 1
    assert relay.count("GET", str(digest)) == 0
    assert not committed_path(blobserve, digest).exists()


@pytest_twisted.ensureDeferred
async def test_blob_unknown_upstream_is_blob_unknown(
    blobserve: BlobserveProcess, client: Client
) -> None:
    missing = Digest.of(os.urandom(32))
    fetch = await client.get(blob_url(blobserve, missing)).finished()
    assert fetch.status == 404
    assert json.loads(fetch.opening)["errors"][0]["code"] == "BLOB_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_a_502_and_the_service_goes_on(
    tmp_path: Path, client: Client
) -> None:
    server = BlobserveProcess(
        tmp_path, f"http://127.0.0.1:{free_port()}", tmp_path / "storage"
    )
    await server.start()
    try:
        fetch = await client.get(blob_url(server, Digest.of(b"x"))).finished()
        assert fetch.status == 502
        error = json.loads(fetch.opening)["errors"][0]
        assert "unreachable" in error["message"]
        base = await client.get(f"{server.url}/v2/").finished()
        assert base.status == 200
        assert base.headers["docker-distribution-api-version"] == "registry/2.0"
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_starts_with_working_defaults(tmp_path: Path, client: Client) -> None:
    server = BlobserveProcess(tmp_path, "", tmp_path / "unused", flags=[])
    await server.start()
    try:
        assert server.port == 5000
        base = await client.get("http://127.0.0.1:5000/v2/").finished()
        assert base.status == 200
        assert (tmp_path / "blobserve-data" / "blobs").is_dir()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_damaged_stored_blob_is_fetched_again(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    assert_correct(await client.get(blob_url(blobserve, digest)).finished(), data)
    path = committed_path(blobserve, digest)
    await until(path.exists, "the commit")
    # Something truncates the file behind blobserve's back.
    with path.open("r+b") as f:
        f.truncate(len(data) // 2)
    fetch = await client.get(blob_url(blobserve, digest)).finished()
    assert_correct(fetch, data)
    assert relay.count("GET", str(digest)) == 2


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_is_dropped_after_the_client_timeout(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    data = os.urandom(16 * 1024 * 1024)
    digest = registry.push_blob("test/blobs", data)
    relay.rate = None
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--client-timeout=1",),
    )
    await server.start()
    try:
        stalled = stalled_client(server.port, f"/v2/test/blobs/blobs/{digest}")
        await until(committed_path(server, digest).exists, "the commit")
        # Past the client timeout, with the client still not reading.
        await deferLater(reactor, 2.5, lambda: None)
        stalled.setblocking(False)
        received = 0
        deadline = time.monotonic() + DEADLINE
        while True:
            assert time.monotonic() < deadline, "the stalled client was not dropped"
            try:
                chunk = stalled.recv(1 << 20)
            except BlockingIOError:
                await deferLater(reactor, 0.1, lambda: None)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
        stalled.close()
        assert received < len(data)
        status = await client.get(f"{server.url}/_blobserve/status").finished()
        running = json.loads(status.opening)
        assert {k: running[k] for k in ("downloads", "observers", "responses")} == {
            "downloads": 0,
            "observers": 0,
            "responses": 0,
        }
    finally:
        server.stop()
