"""
The store's index across restarts of a real blobserve: hits stay hits
without upstream traffic, a deleted or truncated index is rebuilt from the
files, and a store of the layout before the index is migrated.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import pytest_twisted

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

SIZE = 256 * 1024


async def fetched_through(
    server: BlobserveProcess, client: Client, blobs: list[Blob]
) -> None:
    for digest, data in blobs:
        assert_correct(await client.get(blob_url(server, digest)).finished(), data)
    for digest, _ in blobs:
        await until(committed_path(server, digest).exists, "the commits")


def upstream_gets(relay: Relay, blobs: list[Blob]) -> int:
    return sum(relay.count("GET", str(digest)) for digest, _ in blobs)


@pytest.mark.parametrize("damage", ["none", "deleted", "truncated"])
@pytest_twisted.ensureDeferred
async def test_hits_stay_hits_across_a_restart_whatever_became_of_the_index(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
    damage: str,
) -> None:
    blobs = []
    for _ in range(3):
        data = os.urandom(SIZE)
        blobs.append((registry.push_blob("test/blobs", data), data))
    storage = tmp_path / "storage"
    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", storage)
    await server.start()
    try:
        await fetched_through(server, client, blobs)
    finally:
        server.stop()
    assert upstream_gets(relay, blobs) == len(blobs)

    index = storage / "index.sqlite"
    if damage == "deleted":
        index.unlink()
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[:1000])

    earlier_log = len(server.log.read_bytes())
    await server.start()
    try:
        for digest, data in blobs:
            fetch = await client.get(blob_url(server, digest)).finished()
            assert_correct(fetch, data)
    finally:
        server.stop()
    # Served from the store: the upstream was not asked again.
    assert upstream_gets(relay, blobs) == len(blobs)
    restart_log = server.log.read_bytes()[earlier_log:]
    rebuilt = b"#warn] built the store index from its files" in restart_log
    assert rebuilt == (damage != "none")


@pytest_twisted.ensureDeferred
async def test_a_store_of_the_layout_before_the_index_is_migrated(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    storage = tmp_path / "storage"
    # A blob as the earlier blobserve left it: its file, and a record of its
    # size beside it, and no index.
    path = storage / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    record = storage / "records" / "sha256" / digest.hex[:2] / digest.hex
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"size": SIZE}))

    server = BlobserveProcess(tmp_path, f"http://127.0.0.1:{relay.port}", storage)
    await server.start()
    try:
        assert_correct(await client.get(blob_url(server, digest)).finished(), data)
        await until(lambda: not (storage / "records").exists(), "records/ to go")
    finally:
        server.stop()
    assert relay.count("GET", str(digest)) == 0
    assert (storage / "index.sqlite").exists()


@pytest_twisted.ensureDeferred
async def test_the_configured_limits_are_kept_in_the_index(
    tmp_path: Path, relay: Relay
) -> None:
    storage = tmp_path / "storage"
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        storage,
        extra=("--max-size=8M",),
    )
    await server.start()

    def settings() -> dict[str, str]:
        connection = sqlite3.connect(storage / "index.sqlite")
        try:
            return dict(connection.execute("SELECT key, value FROM settings"))
        except sqlite3.OperationalError:
            # The index is made after start, in its own thread: not yet.
            return {}
        finally:
            connection.close()

    try:
        await until(lambda: bool(settings()), "the settings")
    finally:
        server.stop()
    assert settings() == {"max_size": str(8 * 2**20), "min_free": ""}
