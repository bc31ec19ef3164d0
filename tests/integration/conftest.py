"""
Fixtures that start real servers on loopback: the upstream registry, a relay
in front of it, and blobserve itself.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from blobserve.digest import Digest

from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

#: The upstream's pace through the relay: slow enough to watch a download.
RATE = 4 * 1024 * 1024
BLOB_SIZE = 4 * 1024 * 1024


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = RegistryProcess(tmp_path_factory.mktemp("registry"))
    yield process
    process.stop()


@pytest.fixture
def relay(registry: RegistryProcess) -> Iterator[Relay]:
    relay = Relay(reactor, registry.port, rate=RATE)
    relay.listen()
    yield relay
    relay.stop()


@pytest_twisted.async_yield_fixture
async def blobserve(tmp_path: Path, relay: Relay) -> AsyncIterator[BlobserveProcess]:
    process = BlobserveProcess(
        tmp_path, f"http://127.0.0.1:{relay.port}", tmp_path / "storage"
    )
    await process.start()
    yield process
    process.stop()


@pytest_twisted.async_yield_fixture
async def client() -> AsyncIterator[Client]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield Client(pool)
    await pool.closeCachedConnections()


@pytest.fixture
def blob(registry: RegistryProcess) -> tuple[Digest, bytes]:
    """
    A fresh random blob in the upstream, that blobserve has never seen.
    """
    data = os.urandom(BLOB_SIZE)
    return registry.push_blob("test/blobs", data), data
