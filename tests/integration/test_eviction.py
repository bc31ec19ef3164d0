"""
The store's size bound with real downloads through the relay: past
--max-size the least recently used blobs go (a re-read blob stays), a blob
that a slow client is reading survives the pressure, --min-free holds on a
small tmpfs, and a blob that cannot fit is a 507 that leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from blobserve.store.eviction import free_space

from checks import (
    Blob,
    assert_correct,
    blob_url,
    committed_path,
    mounted,
    until,
)
from clients import Client, stalled_client
from processes import DEADLINE, BlobserveProcess, RegistryProcess
from relay import Relay

MiB = 1024 * 1024


def push(registry: RegistryProcess, count: int, size: int) -> list[Blob]:
    blobs = []
    for _ in range(count):
        data = os.urandom(size)
        blobs.append((registry.push_blob("test/blobs", data), data))
    return blobs


def stored_bytes(server: BlobserveProcess) -> int:
    """
    The bytes of the committed blob files in the store.
    """
    return sum(
        path.stat().st_size
        for path in (server.storage / "blobs").rglob("*")
        if path.is_file()
    )


async def store_status(server: BlobserveProcess) -> dict[str, Any]:
    response = await treq.get(f"{server.url}/_blobserve/status", persistent=False)
    store: dict[str, Any] = json.loads(await response.content())["store"]
    return store


async def until_pinned(server: BlobserveProcess, count: int) -> None:
    """
    Wait, up to the deadline, until C{count} blobs are pinned.
    """
    deadline = time.monotonic() + DEADLINE
    while (await store_status(server))["pinned"] != count:
        assert time.monotonic() < deadline, f"timed out waiting for {count} pinned"
        await deferLater(reactor, 0.05, lambda: None)


async def fetch(client: Client, server: BlobserveProcess, blob: Blob) -> None:
    """
    GET C{blob} through C{server}, check it, and wait until it is committed.
    """
    digest, data = blob
    assert_correct(await client.get(blob_url(server, digest)).finished(), data)
    await until(committed_path(server, digest).exists, f"the commit of {digest}")


@pytest_twisted.async_yield_fixture
async def started(tmp_path: Path, relay: Relay) -> Any:
    """
    Start blobserve with the flags given; stop every one started.
    """
    servers: list[BlobserveProcess] = []

    async def start(*flags: str, storage: Path | None = None) -> BlobserveProcess:
        server = BlobserveProcess(
            tmp_path,
            f"http://127.0.0.1:{relay.port}",
            storage or tmp_path / "storage",
            extra=flags,
        )
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_past_max_size_the_least_recently_used_go_and_a_reread_blob_stays(
    started: Any, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = None
    limit = 4 * MiB
    server = await started(f"--max-size={limit}")
    blobs = push(registry, 6, MiB)
    for blob in blobs[:3]:
        await fetch(client, server, blob)
    # The first blob committed is read again: the second is now the least
    # recently used.
    await fetch(client, server, blobs[0])
    for blob in blobs[3:]:
        await fetch(client, server, blob)
        assert stored_bytes(server) <= limit
        assert (await store_status(server))["size"] <= limit

    gone = [blobs[1], blobs[2]]
    kept = [blobs[0], *blobs[3:]]
    for digest, _ in gone:
        assert not committed_path(server, digest).exists()
    for blob in kept:
        await fetch(client, server, blob)
        # A hit: the upstream was asked once, for the first fetch.
        assert relay.count("GET", str(blob[0])) == 1
    status = await store_status(server)
    assert (status["evictions"], status["evicted_bytes"]) == (2, 2 * MiB)
    assert status["blobs"] == 4
    for blob in gone:
        await fetch(client, server, blob)
        assert relay.count("GET", str(blob[0])) == 2
    assert stored_bytes(server) <= limit


async def read_response(s: socket.socket) -> tuple[int, int, str]:
    """
    Read a whole response from a client that had stopped reading: its status,
    body length and body's sha256.
    """
    s.setblocking(False)
    received = b""
    deadline = time.monotonic() + DEADLINE
    head: bytes | None = None
    length = 0
    hasher = hashlib.sha256()
    body = 0
    while head is None or body < length:
        assert time.monotonic() < deadline, "the response did not arrive in time"
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            await deferLater(reactor, 0.01, lambda: None)
            continue
        assert chunk, "the connection closed early"
        if head is None:
            received += chunk
            if b"\r\n\r\n" not in received:
                continue
            head, _, chunk = received.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
        hasher.update(chunk)
        body += len(chunk)
    return int(head.split()[1]), body, hasher.hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_blob_a_slow_client_reads_survives_eviction_pressure(
    started: Any, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = None
    limit = 24 * MiB
    server = await started(f"--max-size={limit}")
    # Larger than what the sockets between them can buffer: the response
    # stays open while the client does not read.
    slow = push(registry, 1, 16 * MiB)[0]
    others = push(registry, 3, 4 * MiB)
    await fetch(client, server, slow)
    stalled = stalled_client(server.port, f"/v2/test/blobs/blobs/{slow[0]}")
    try:
        await until_pinned(server, 1)
        for blob in others:
            await fetch(client, server, blob)
            assert stored_bytes(server) <= limit
        # The slow blob is the least recently used, but open: the others went.
        assert (await store_status(server))["pinned"] == 1
        assert committed_path(server, slow[0]).exists()
        assert not committed_path(server, others[0][0]).exists()
        assert not committed_path(server, others[1][0]).exists()

        code, length, sha256 = await read_response(stalled)
        assert (code, length) == (200, len(slow[1]))
        assert sha256 == hashlib.sha256(slow[1]).hexdigest()
    finally:
        stalled.close()
    assert relay.count("GET", str(slow[0])) == 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mounted(
        tmp_path / "small",
        "size=16m",
        "the unit tests of the evictor cover --min-free with a fake file system",
    )


@pytest_twisted.ensureDeferred
async def test_min_free_holds_on_a_small_file_system(
    started: Any,
    small_disk: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
) -> None:
    relay.rate = None
    min_free = 8 * MiB
    server = await started(f"--min-free={min_free}", storage=small_disk)
    blobs = push(registry, 12, MiB)
    for blob in blobs:
        await fetch(client, server, blob)
        assert free_space(str(small_disk)) >= min_free
    status = await store_status(server)
    assert status["evictions"] > 0
    assert status["free"] >= min_free
    assert status["min_free"] == min_free
    assert not committed_path(server, blobs[0][0]).exists()
    for blob in blobs[-3:]:
        await fetch(client, server, blob)
        assert relay.count("GET", str(blob[0])) == 1


@pytest_twisted.ensureDeferred
async def test_a_blob_that_cannot_fit_is_a_507_and_leaves_nothing_behind(
    started: Any, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = None
    server = await started("--max-size=2M")
    big, small = push(registry, 1, 3 * MiB)[0], push(registry, 1, MiB)[0]
    refused = await client.get(blob_url(server, big[0])).finished()
    assert refused.status == 507
    error = json.loads(refused.opening)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "no room for a blob of 3145728 bytes" in error["message"]
    assert list((server.storage / "tmp").iterdir()) == []
    assert not committed_path(server, big[0]).exists()
    await fetch(client, server, small)
    server.stop()
    assert (
        f"not fetching {big[0]}: the cache has no room for a blob of 3145728"
        " bytes: over --max-size (2097152 bytes)"
    ) in server.log.read_text()


@pytest_twisted.ensureDeferred
async def test_a_blob_that_fits_only_without_one_being_read_is_refused_until_then(
    started: Any, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = None
    server = await started("--max-size=20M")
    read, wanted = push(registry, 1, 16 * MiB)[0], push(registry, 1, 8 * MiB)[0]
    await fetch(client, server, read)
    stalled = stalled_client(server.port, f"/v2/test/blobs/blobs/{read[0]}")
    try:
        await until_pinned(server, 1)
        refused = await client.get(blob_url(server, wanted[0])).finished()
        assert refused.status == 507
        assert committed_path(server, read[0]).exists()
        assert list((server.storage / "tmp").iterdir()) == []
    finally:
        stalled.close()
    await until_pinned(server, 0)
    await fetch(client, server, wanted)
    assert not committed_path(server, read[0]).exists()


@pytest_twisted.ensureDeferred
async def test_a_limit_lowered_since_the_last_run_holds_from_the_start(
    started: Any, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = None
    blobs = push(registry, 3, MiB)
    server = await started()
    for blob in blobs:
        await fetch(client, server, blob)
    server.stop()

    again = await started("--max-size=2M")
    await until(lambda: stored_bytes(again) <= MiB, "the eviction at start")
    assert committed_path(again, blobs[2][0]).exists()
    await fetch(client, again, blobs[2])
    assert relay.count("GET", str(blobs[2][0])) == 1
    assert (await store_status(again))["evictions"] == 2
