"""
Restarts: blobserve stopped with SIGTERM, or killed with SIGKILL, in the
middle of a download keeps the bytes that arrived, and after the restart the
next request goes on from them with a Range request, after hashing them
again; a blob whose bytes have all arrived is committed before the process
exits; unfinished downloads past their age are removed at start.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from blobserve.digest import Digest

from checks import assert_correct, blob_url, committed_path, until
from clients import Client
from processes import DEADLINE, BlobserveProcess, RegistryProcess
from relay import Relay

SIZE = 4 * 1024 * 1024
#: Slow enough that a download is still running a second after it began.
RATE = 1024 * 1024
GRACE = 1.0
#: What a dropped upstream connection may have carried past the bytes that
#: reached the disk (as test_faults allows).
IN_FLIGHT = 256 * 1024
#: How long a clean stop may take beyond the grace period: the downloads'
#: end, the index's last writes, twistd's own.
STOPPING = 5.0


def relayed(relay: Relay, digest: Digest) -> int:
    """
    The blob body bytes the upstream sent for C{digest} through the relay.
    """
    return relay.body_bytes[f"/v2/test/blobs/blobs/{digest}"]


async def relayed_by_the_gone(relay: Relay, digest: Digest) -> int:
    """
    What the relay sent for C{digest} to a blobserve that has exited, once
    it has seen its connections close (until then it may relay, and count,
    a chunk more).
    """
    await until(lambda: not relay.open, "the relay to see blobserve gone")
    return relayed(relay, digest)


def partial_rows(storage: Path) -> list[tuple[str, str]]:
    """
    The unfinished downloads the store's index records: digest, file name.
    """
    connection = sqlite3.connect(storage / "index.sqlite")
    try:
        return connection.execute("SELECT digest, name FROM partials").fetchall()
    finally:
        connection.close()


def started_server(tmp_path: Path, relay: Relay, *extra: str) -> BlobserveProcess:
    return BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=(f"--shutdown-grace={GRACE:g}", *extra),
    )


async def mid_download(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> tuple[BlobserveProcess, bytes, Digest]:
    """
    A blobserve, started, with a throttled download of a new blob a quarter
    of the way to its client.
    """
    relay.rate = RATE
    data = os.urandom(SIZE)
    registry.push_blob("test/blobs", data)
    server = started_server(tmp_path, relay)
    await server.start()
    digest = Digest.of(data)
    try:
        download = client.get(blob_url(server, digest))
        await download.when_received(SIZE // 4).addTimeout(DEADLINE, reactor)
    except BaseException:
        server.stop()
        raise
    return server, data, digest


def kept_file(server: BlobserveProcess, digest: Digest) -> Path:
    """
    The one unfinished download in the store, checked against its record.
    """
    [partial] = (server.storage / "tmp").iterdir()
    assert partial_rows(server.storage) == [(str(digest), partial.name)]
    return partial


async def resumed(
    server: BlobserveProcess,
    relay: Relay,
    client: Client,
    data: bytes,
    kept: int,
    sent_before: int,
) -> None:
    """
    Restart C{server}, fetch C{data}, and check that the upstream was asked
    for the bytes past the C{kept} on disk, and those only.
    """
    digest = Digest.of(data)
    await server.start()
    fetch = await client.get(blob_url(server, digest)).finished()
    assert_correct(fetch, data)
    await until(committed_path(server, digest).exists, "the commit")
    assert committed_path(server, digest).read_bytes() == data
    assert relay.count("GET", str(digest)) == 2
    assert relayed(relay, digest) - sent_before == SIZE - kept
    # All told, the upstream sent the blob about once.
    assert relayed(relay, digest) <= SIZE + IN_FLIGHT
    assert f"re-hashed the {kept} bytes" in server.log.read_text()
    assert list((server.storage / "tmp").iterdir()) == []
    assert partial_rows(server.storage) == []


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_download_stops_cleanly_and_the_restart_resumes_it(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    server, data, digest = await mid_download(tmp_path, registry, relay, client)
    try:
        status, seconds = await server.terminate()
        # twistd ends a clean stop on SIGTERM by raising SIGTERM again.
        assert status == -signal.SIGTERM
        assert seconds < GRACE + STOPPING
        log = server.log.read_text()
        assert "stopped cleanly" in log
        assert "Main loop terminated." in log
        kept = kept_file(server, digest).stat().st_size
        assert SIZE // 4 <= kept < SIZE
        sent_before = await relayed_by_the_gone(relay, digest)
        assert sent_before <= kept + IN_FLIGHT

        await server.start()

        async def reported() -> dict[str, int]:
            response = await client.get(f"{server.url}/_blobserve/status").finished()
            partials: dict[str, int] = json.loads(response.opening)["partials"]
            return partials

        # Once the index has loaded, the status counts what was kept.
        deadline = time.monotonic() + DEADLINE
        while await reported() != {"count": 1, "bytes": kept}:
            assert time.monotonic() < deadline, await reported()
            await deferLater(reactor, 0.05, lambda: None)
        server.stop()
        await resumed(server, relay, client, data, kept, sent_before)
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_download_and_the_restart_resumes_it(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    server, data, digest = await mid_download(tmp_path, registry, relay, client)
    try:
        server.kill()
        # The record was made when the download began; the file's size says
        # how far it got.
        kept = kept_file(server, digest).stat().st_size
        assert SIZE // 4 <= kept < SIZE
        sent_before = await relayed_by_the_gone(relay, digest)
        assert sent_before <= kept + IN_FLIGHT
        await resumed(server, relay, client, data, kept, sent_before)
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_while_a_whole_blob_waits_for_its_commit_commits_it(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    # The blob reaches its client whole; then its commit waits for the
    # index, which the test holds locked, and SIGTERM comes.
    relay.rate = 4 * 1024 * 1024
    data = os.urandom(1024 * 1024)
    digest = registry.push_blob("test/blobs", data)
    server = started_server(tmp_path, relay)
    await server.start()
    try:
        await until(lambda: "store index:" in server.log.read_text(), "the index")
        download = client.get(blob_url(server, digest))
        await until(lambda: partial_rows(server.storage) != [], "the download")
        lock = sqlite3.connect(server.storage / "index.sqlite", timeout=DEADLINE)
        try:
            lock.execute("BEGIN IMMEDIATE")
            assert_correct(await download.finished(), data)
            assert not committed_path(server, digest).exists()
            assert server.process is not None
            os.kill(server.pid, signal.SIGTERM)
            await deferLater(reactor, 1.0, lambda: None)
            # Still waiting for the commit.
            assert server.process.poll() is None
        finally:
            lock.rollback()
            lock.close()
        status, _ = await server.terminate()
        assert status == -signal.SIGTERM
        assert committed_path(server, digest).read_bytes() == data
        assert partial_rows(server.storage) == []

        await server.start()
        fetch = await client.get(blob_url(server, digest)).finished()
        assert_correct(fetch, data)
        # A hit: the upstream was asked once, before the stop.
        assert relay.count("GET", str(digest)) == 1
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_blob_sent_whole_to_its_client_before_sigterm_is_not_lost(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    # The client keeps up with the download, so it has the last byte as the
    # commit begins; the commit's fsync of 64 MiB takes a while (190 ms on
    # the machine this was written on), and SIGTERM comes at once.
    relay.rate = 32 * 1024 * 1024
    data = os.urandom(64 * 1024 * 1024)
    digest = registry.push_blob("test/blobs", data)
    server = started_server(tmp_path, relay)
    await server.start()
    try:
        assert_correct(await client.get(blob_url(server, digest)).finished(), data)
        status, _ = await server.terminate()
        assert status == -signal.SIGTERM
        assert committed_path(server, digest).exists()
        await server.start()
        assert_correct(await client.get(blob_url(server, digest)).finished(), data)
        assert relay.count("GET", str(digest)) == 1
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_unfinished_downloads_older_than_the_limit_are_removed_at_start(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    server, data, digest = await mid_download(tmp_path, registry, relay, client)
    try:
        server.kill()
        partial = kept_file(server, digest)
        # Last written a day and a minute ago; the limit is a day.
        old = time.time() - 86400 - 60
        os.utime(partial, (old, old))
        sent_before = await relayed_by_the_gone(relay, digest)

        await server.start()
        await until(lambda: not partial.exists(), "the removal")
        await until(lambda: partial_rows(server.storage) == [], "the record's removal")
        assert "older than --partial-max-age" in server.log.read_text()
        fetch = await client.get(blob_url(server, digest)).finished()
        assert_correct(fetch, data)
        # Fetched afresh.
        assert relayed(relay, digest) - sent_before == SIZE
    finally:
        server.stop()
