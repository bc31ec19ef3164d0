"""
Churn: thousands of requests from clients that go away at random moments
leave nothing behind: no file descriptor, temporary file, download, observer
or response.
"""

from __future__ import annotations

import json
import os
import random
import socket

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from checks import Blob, blob_url, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess, open_descriptors
from relay import Relay

REQUESTS = 2000
BLOBS = 20
SIZE = 256 * 1024
WAVE = 50


def leave_before_headers(port: int, path: str) -> None:
    """
    A client that asks and hangs up at once.
    """
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def running(server: BlobserveProcess) -> dict[str, int]:
    """
    What the status says runs now.
    """
    response = await treq.get(f"{server.url}/_blobserve/status", persistent=False)
    result = json.loads(await response.content())
    return {key: result[key] for key in ("downloads", "observers", "responses")}


@pytest_twisted.ensureDeferred
async def test_random_disconnects_leak_nothing(
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
    client: Client,
) -> None:
    # Fast enough to finish in seconds, slow enough that many clients go away
    # while a blob is still in flight.
    relay.rate = 2 * 1024 * 1024
    blobs: list[Blob] = []
    for _ in range(BLOBS):
        data = os.urandom(SIZE)
        blobs.append((registry.push_blob("test/blobs", data), data))
    # Warm up: the process has opened whatever it keeps open.
    await client.get(f"{blobserve.url}/v2/").finished()
    before = open_descriptors(blobserve.pid, except_remote_port=relay.port)

    chance = random.Random(2026)
    completed = 0
    for wave in range(REQUESTS // WAVE):
        pending = []
        expected: list[str] = []
        for _ in range(WAVE):
            digest, data = chance.choice(blobs)
            url = blob_url(blobserve, digest)
            what = chance.random()
            if what < 0.1:
                path = url.split(str(blobserve.port), 1)[1]
                leave_before_headers(blobserve.port, path)
                continue
            elif what < 0.2:
                pending.append(client.get(url, method="HEAD").finished())
            elif what < 0.6:
                stop = chance.randrange(0, SIZE)
                pending.append(client.get(url, stop_after=stop).finished())
            else:
                pending.append(client.get(url).finished())
            expected.append(digest.hex)
        fetches = await gatherResults(pending)
        for hex_digest, fetch in zip(expected, fetches, strict=True):
            assert fetch.status == 200, (wave, fetch)
            if fetch.complete and fetch.declared_length:
                # Every body that ended cleanly is the right one.
                assert fetch.sha256 == hex_digest
                completed += 1
    assert completed > REQUESTS // 4

    async def settled() -> bool:
        return (await running(blobserve)) == {
            "downloads": 0,
            "observers": 0,
            "responses": 0,
        }

    for _ in range(200):
        if await settled():
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert await running(blobserve) == {"downloads": 0, "observers": 0, "responses": 0}
    await until(lambda: not list((blobserve.storage / "tmp").iterdir()), "no temps")
    after = open_descriptors(blobserve.pid, except_remote_port=relay.port)
    assert after == before
