"""
Crash safety: blobserve killed with SIGKILL in the middle of downloads, again
and again, then restarted, leaves a store where every committed blob verifies
and the index needs nothing but what blobserve settles at start, serves every
blob right, and keeps no temporary file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from blobserve.fsck import Action, Report, check

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

KILLS = 4
BLOBS = 3
SIZE = 2 * 1024 * 1024


def assert_consistent(report: Report) -> None:
    """
    Every blob verified, and the index agreed with the files, but for rows a
    crash left between two states (which blobserve settles at start too).
    """
    unexpected = [c for c in report.changes if c.action is not Action.SETTLED]
    assert unexpected == []


@pytest_twisted.ensureDeferred
async def test_kill_9_at_random_moments_leaves_a_consistent_store(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    relay.rate = 4 * 1024 * 1024
    blobs: list[Blob] = []
    for _ in range(BLOBS):
        data = os.urandom(SIZE)
        blobs.append((registry.push_blob("test/blobs", data), data))
    storage = tmp_path / "storage"
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", storage)
    chance = random.Random(9)

    for _ in range(KILLS):
        await server.start()
        for digest, _ in blobs:
            client.get(blob_url(server, digest))
        # Somewhere between the first bytes and the first commits.
        await deferLater(reactor, chance.uniform(0.05, 0.6), lambda: None)
        server.kill()
        # Whatever was committed before the crash verifies. fsck takes the
        # store's lock: the killed server left none behind.
        assert_consistent(check(storage))

    await server.start()
    try:
        downloads = [client.get(blob_url(server, digest)) for digest, _ in blobs]
        fetches = await gatherResults([d.finished() for d in downloads])
        for digest, _ in blobs:
            await until(committed_path(server, digest).exists, "the commits")
    finally:
        server.stop()
    for fetch, (_, data) in zip(fetches, blobs, strict=True):
        assert_correct(fetch, data)
    assert list((storage / "tmp").iterdir()) == []
    report = check(storage)
    assert_consistent(report)
    assert report.verified == BLOBS
