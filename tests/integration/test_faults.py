"""
Upstream faults injected by the relay in front of the real registry: broken
and stalled connections, an upstream that ignores Range. Every client that
completes gets the right bytes, and the committed blob verifies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import gatherResults

from checks import assert_correct, blob_url, committed_path, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Fault, Relay

SIZE = 1024 * 1024
FAST_RETRIES = ("--upstream-retry-delay=0.05",)


async def started(
    tmp_path: Path, relay: Relay, *extra: str, name: str = "server"
) -> BlobserveProcess:
    directory = tmp_path / name
    directory.mkdir()
    server = BlobserveProcess(
        directory,
        f"http://127.0.0.1:{relay.port}",
        directory / "storage",
        extra=(*FAST_RETRIES, *extra),
    )
    await server.start()
    return server


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(min_value=0, max_value=SIZE - 1), max_size=3))
@pytest_twisted.ensureDeferred
async def test_cut_connections_are_resumed_with_range(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    client: Client,
    cuts: list[int],
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.faults = [Fault("cut", offset) for offset in cuts]
    server = await started(tmp_path, relay, name=f"cut-{digest.hex[:12]}")
    try:
        downloads = [client.get(blob_url(server, digest)) for _ in range(2)]
        for fetch in await gatherResults([d.finished() for d in downloads]):
            assert_correct(fetch, data)
        await until(committed_path(server, digest).exists, "the commit")
        assert committed_path(server, digest).read_bytes() == data
    finally:
        server.stop()
    gets = relay.count("GET", str(digest))
    assert gets <= 1 + len(cuts)
    # Resumed, not restarted: the upstream sent the blob about once (what a
    # cut connection drops in flight is sent again).
    assert (
        relay.body_bytes[f"/v2/test/blobs/blobs/{digest}"] <= SIZE + gets * 256 * 1024
    )


@pytest_twisted.ensureDeferred
async def test_stalled_upstream_is_dropped_and_resumed(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.faults = [Fault("stall", SIZE // 3)]
    server = await started(tmp_path, relay, "--upstream-idle-timeout=0.5")
    try:
        fetch = await client.get(blob_url(server, digest)).finished()
    finally:
        server.stop()
    assert_correct(fetch, data)
    assert relay.count("GET", str(digest)) == 2
    assert "no body bytes from upstream" in server.log.read_text()


@pytest_twisted.ensureDeferred
async def test_upstream_ignoring_range_is_skipped_ahead(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.ignore_range = True
    relay.faults = [Fault("cut", SIZE // 2)]
    server = await started(tmp_path, relay)
    try:
        fetch = await client.get(blob_url(server, digest)).finished()
        await until(committed_path(server, digest).exists, "the commit")
    finally:
        server.stop()
    assert_correct(fetch, data)
    assert committed_path(server, digest).read_bytes() == data
    assert relay.count("GET", str(digest)) == 2


@pytest_twisted.ensureDeferred
async def test_spent_retries_cut_clients_off_and_leave_nothing(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.faults = [Fault("cut", 1000), Fault("cut", 1000), Fault("cut", 1000)]
    server = await started(tmp_path, relay, "--upstream-retries=2")
    try:
        failed = await client.get(blob_url(server, digest)).finished()
        assert failed.error is not None
        assert failed.length < SIZE
        assert not committed_path(server, digest).exists()
        assert list((server.storage / "tmp").iterdir()) == []
        # The next request starts afresh.
        fetch = await client.get(blob_url(server, digest)).finished()
        assert_correct(fetch, data)
    finally:
        server.stop()
    assert relay.count("GET", str(digest)) == 4
    assert hashlib.sha256(data).hexdigest() == digest.hex


@pytest_twisted.ensureDeferred
async def test_concurrent_misses_are_bounded(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    blobs = [os.urandom(SIZE) for _ in range(6)]
    digests = [registry.push_blob("test/blobs", data) for data in blobs]
    server = await started(tmp_path, relay, "--upstream-concurrency=2")
    try:
        downloads = [client.get(blob_url(server, digest)) for digest in digests]
        fetches = await gatherResults([d.finished() for d in downloads])
    finally:
        server.stop()
    for fetch, data in zip(fetches, blobs, strict=True):
        assert_correct(fetch, data)
    # Six cold blobs at once, never more than two upstream connections.
    assert relay.most_open <= 2
