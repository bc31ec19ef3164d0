"""
blobserve as a registry mirror: real skopeo pulls through it from a real
docker-registry upstream.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from checks import until
from images import (
    INDEX,
    dir_digests,
    layout_digests,
    layout_top_digest,
    pull_image,
    push_image,
)
from processes import BlobserveProcess, RegistryProcess
from relay import Relay


def host(server: BlobserveProcess) -> str:
    return f"127.0.0.1:{server.port}"


@pytest_twisted.ensureDeferred
async def test_skopeo_pulls_through_and_a_second_pull_needs_no_blob(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await push_image(tmp_path, f"127.0.0.1:{registry.port}", "mirror/one", "v1")

    await pull_image(f"{host(blobserve)}/{image.reference}", tmp_path / "first")
    assert layout_top_digest(tmp_path / "first") == image.manifest_digest
    assert layout_digests(tmp_path / "first") == image.blob_digests | {
        image.manifest_digest
    }
    for digest in image.blob_digests:
        assert relay.count("GET", f"/blobs/{digest}") == 1

    before = list(relay.requests)
    second = tmp_path / "second"
    await pull_image(f"{host(blobserve)}/{image.reference}", second, kind="dir")
    assert dir_digests(second) == layout_digests(tmp_path / "first")
    # Within the tag TTL, the second pull asked the upstream nothing at all.
    assert relay.requests == before


@pytest_twisted.ensureDeferred
async def test_multi_platform_index_round_trips(
    tmp_path: Path,
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
) -> None:
    image = await push_image(
        tmp_path,
        f"127.0.0.1:{registry.port}",
        "mirror/multi",
        "v1",
        platforms=["amd64", "arm64"],
    )
    await pull_image(
        f"{host(blobserve)}/{image.reference}", tmp_path / "out", all_platforms=True
    )
    # The index arrives byte for byte: same digest, every manifest and blob.
    assert layout_top_digest(tmp_path / "out") == image.manifest_digest
    assert layout_digests(tmp_path / "out") == (
        image.blob_digests | image.manifest_digests
    )

    def indexed() -> tuple[str, str] | None:
        connection = sqlite3.connect(blobserve.storage / "index.sqlite")
        try:
            row: tuple[str, str] | None = connection.execute(
                "SELECT media_type, state FROM blobs WHERE digest = ?",
                (image.manifest_digest,),
            ).fetchone()
        finally:
            connection.close()
        return row

    # The store's index keeps its media type.
    await until(lambda: indexed() == (INDEX, "present"), "the index row")


@pytest_twisted.ensureDeferred
async def test_tag_is_revalidated_with_head_after_its_ttl(
    tmp_path: Path, registry: RegistryProcess, relay: Relay
) -> None:
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--tag-ttl=0.5",),
    )
    await server.start()
    try:
        image = await push_image(
            tmp_path, f"127.0.0.1:{registry.port}", "mirror/ttl", "v1"
        )
        await pull_image(f"{host(server)}/{image.reference}", tmp_path / "first")
        await deferLater(reactor, 0.6, lambda: None)
        before = len(relay.requests)
        await pull_image(f"{host(server)}/{image.reference}", tmp_path / "second")
        after = relay.requests[before:]
        assert after == [("HEAD", "/v2/mirror/ttl/manifests/v1")]
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_cached_tag_is_served_when_upstream_is_gone(
    tmp_path: Path, registry: RegistryProcess, relay: Relay
) -> None:
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--tag-ttl=0.5",),
    )
    await server.start()
    try:
        image = await push_image(
            tmp_path, f"127.0.0.1:{registry.port}", "mirror/stale", "v1"
        )
        await pull_image(f"{host(server)}/{image.reference}", tmp_path / "first")
        relay.stop()
        await deferLater(reactor, 0.6, lambda: None)
        # The TTL is over and the upstream unreachable: stale-if-error.
        await pull_image(f"{host(server)}/{image.reference}", tmp_path / "second")
        assert layout_top_digest(tmp_path / "second") == image.manifest_digest
        assert "serving mirror/stale:v1" in server.log.read_text()
    finally:
        server.stop()
