"""
--prefetch-layers against a real upstream: a manifest served through
blobserve brings its config and layers into the store with no client, one
upstream GET each, and a pull after it is all hits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest_twisted
import treq

from blobserve.digest import Digest

from checks import committed_path, until
from clients import Client
from images import MANIFEST, push_image
from processes import BlobserveProcess, RegistryProcess
from relay import Relay


@pytest_twisted.ensureDeferred
async def test_a_manifest_served_brings_its_blobs_in_and_a_pull_is_all_hits(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    image = await push_image(
        tmp_path,
        f"127.0.0.1:{registry.port}",
        "prefetch/layers",
        "v1",
        layer_sizes=(300_000, 200_000, 100_000),
    )
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--prefetch-layers",),
    )
    await server.start()
    try:
        manifest = await client.get(
            f"{server.url}/v2/prefetch/layers/manifests/v1",
            headers={"Accept": MANIFEST},
        ).finished()
        assert manifest.status == 200, manifest.opening
        assert manifest.headers["docker-content-digest"] == image.manifest_digest
        digests = [Digest.parse(d) for d in image.blob_digests]
        # The config and three layers.
        assert len(digests) == 4

        await until(
            lambda: all(committed_path(server, d).exists() for d in digests),
            "every prefetched blob to be committed",
        )
        for digest in digests:
            assert relay.count("GET", f"/blobs/{digest}") == 1

        metrics = await treq.text_content(
            await treq.get(f"{server.url}/metrics", pool=client.pool)
        )
        assert "blobserve_prefetched_blobs_total 4.0" in metrics

        blobs = image.layout / "blobs" / "sha256"
        for digest in digests:
            fetch = await client.get(
                f"{server.url}/v2/prefetch/layers/blobs/{digest}"
            ).finished()
            assert fetch.complete, fetch.error
            assert fetch.headers["x-blobserve-cache"] == "hit"
            expected = (blobs / digest.hex).read_bytes()
            assert fetch.sha256 == hashlib.sha256(expected).hexdigest()
            assert relay.count("GET", f"/blobs/{digest}") == 1
    finally:
        server.stop()
