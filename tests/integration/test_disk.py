"""
A full disk: the store on a tmpfs too small for a blob, or out of inodes.
A download that cannot be written fails cleanly (clients cut off, temporary
removed) and the service goes on; a download that cannot even start is a
503. Mounting needs root, as CI has; elsewhere the unit tests' /dev/full
(ENOSPC at the write call) is what runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from checks import assert_correct, blob_url, committed_path, mounted
from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Relay


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mounted(
        tmp_path / "small",
        "size=2m",
        "the unit test with /dev/full covers ENOSPC at the write call",
    )


@pytest.fixture
def no_inodes(tmp_path: Path) -> Iterator[Path]:
    # The mount point, blobs/ and tmp/: not one inode more.
    yield from mounted(
        tmp_path / "full",
        "size=2m,nr_inodes=3",
        "the unit test with /dev/full covers ENOSPC at the write call",
    )


@pytest_twisted.ensureDeferred
async def test_full_disk_fails_that_download_only(
    tmp_path: Path,
    small_disk: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
) -> None:
    big = os.urandom(3 * 1024 * 1024)
    small = os.urandom(64 * 1024)
    big_digest = registry.push_blob("test/blobs", big)
    small_digest = registry.push_blob("test/blobs", small)
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", small_disk)
    await server.start()
    try:
        failed = await client.get(blob_url(server, big_digest)).finished()
        assert failed.error is not None
        assert failed.length < len(big)
        assert list((small_disk / "tmp").iterdir()) == []
        assert not committed_path(server, big_digest).exists()
        fetch = await client.get(blob_url(server, small_digest)).finished()
        assert_correct(fetch, small)
    finally:
        server.stop()
    assert "No space left on device" in server.log.read_text()


@pytest_twisted.ensureDeferred
async def test_store_that_cannot_start_a_download_answers_503(
    tmp_path: Path,
    no_inodes: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
) -> None:
    (no_inodes / "blobs").mkdir()
    (no_inodes / "tmp").mkdir()
    digest = registry.push_blob("test/blobs", os.urandom(1024))
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", no_inodes)
    await server.start()
    try:
        fetch = await client.get(blob_url(server, digest)).finished()
        base = await client.get(f"{server.url}/v2/").finished()
    finally:
        server.stop()
    assert fetch.status == 503
    assert json.loads(fetch.opening)["errors"][0]["code"] == "UNAVAILABLE"
    assert base.status == 200
