"""
Conditional requests over real sockets, in front of the real registry:
If-None-Match answered 304 for blobs and a manifest by tag without a body
from the upstream, and If-Range deciding between a range and the whole blob.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest_twisted

from checks import Blob, assert_correct, blob_url, committed_path, until
from clients import Client, Fetch
from images import MANIFEST, push_image
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

OTHER = '"sha256:' + "0" * 64 + '"'


def assert_not_modified(fetch: Fetch, digest: str) -> None:
    assert fetch.status == 304
    assert fetch.complete
    assert fetch.length == 0
    assert fetch.headers["etag"] == f'"{digest}"'
    assert fetch.headers["docker-content-digest"] == digest


@pytest_twisted.ensureDeferred
async def test_blob_the_client_holds_is_304_on_a_miss_and_on_a_hit(
    blobserve: BlobserveProcess, relay: Relay, client: Client, blob: Blob
) -> None:
    digest, data = blob
    url = blob_url(blobserve, digest)
    holding = {"If-None-Match": f'"{digest}"'}

    miss = await client.get(url, headers=holding).finished()
    assert_not_modified(miss, str(digest))
    # Confirmed with a HEAD; no body fetched, no download started.
    assert relay.count("HEAD", str(digest)) == 1
    assert relay.count("GET", str(digest)) == 0
    assert sum(relay.body_bytes.values()) == 0
    assert not committed_path(blobserve, digest).exists()

    assert_correct(await client.get(url).finished(), data)
    await until(committed_path(blobserve, digest).exists, "the commit")
    asked = len(relay.requests)
    listed = {"If-None-Match": f'{OTHER}, W/"{digest}"'}
    hit = await client.get(url, headers=listed).finished()
    assert_not_modified(hit, str(digest))
    assert len(relay.requests) == asked

    other = await client.get(url, headers={"If-None-Match": OTHER}).finished()
    assert_correct(other, data)


@pytest_twisted.ensureDeferred
async def test_manifest_by_tag_the_client_holds_is_304(
    tmp_path: Path,
    registry: RegistryProcess,
    blobserve: BlobserveProcess,
    relay: Relay,
    client: Client,
) -> None:
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "test/conditional", "v1"
    )
    url = f"{blobserve.url}/v2/test/conditional/manifests/v1"
    holding = {"Accept": MANIFEST, "If-None-Match": f'"{image.manifest_digest}"'}

    miss = await client.get(url, headers=holding).finished()
    assert_not_modified(miss, image.manifest_digest)
    assert relay.requests == [("HEAD", "/v2/test/conditional/manifests/v1")]

    # Another version held: the manifest, fetched by the digest the tag
    # resolves to.
    other = {"Accept": MANIFEST, "If-None-Match": OTHER}
    whole = await client.get(url, headers=other).finished()
    assert whole.status == 200
    assert whole.headers["docker-content-digest"] == image.manifest_digest
    assert f"sha256:{whole.sha256}" == image.manifest_digest

    # Stored, and the tag fresh: no upstream request at all.
    asked = len(relay.requests)
    hit = await client.get(url, headers=holding).finished()
    assert_not_modified(hit, image.manifest_digest)
    assert len(relay.requests) == asked


@pytest_twisted.ensureDeferred
async def test_if_range_gets_the_range_only_for_the_blobs_own_etag(
    blobserve: BlobserveProcess, client: Client, blob: Blob
) -> None:
    digest, data = blob
    url = blob_url(blobserve, digest)
    assert_correct(await client.get(url).finished(), data)
    await until(committed_path(blobserve, digest).exists, "the commit")

    asked = {"Range": "bytes=100-199", "If-Range": f'"{digest}"'}
    ranged = await client.get(url, headers=asked).finished()
    assert ranged.status == 206
    assert ranged.sha256 == hashlib.sha256(data[100:200]).hexdigest()

    for validator in (OTHER, f'W/"{digest}"', "Sat, 29 Oct 1994 19:43:31 GMT"):
        asked = {"Range": "bytes=100-199", "If-Range": validator}
        whole = await client.get(url, headers=asked).finished()
        assert_correct(whole, data)
        assert "content-range" not in whole.headers
