"""
Repository-scoped answers against a real docker-registry upstream: a blob
stored because one repository asked for it is served under another only
once the upstream holds it there too.
"""

from __future__ import annotations

import json
import os

import pytest_twisted

from blobserve.digest import Digest

from checks import assert_correct, committed_path, until
from clients import Client
from processes import BlobserveProcess, RegistryProcess
from relay import Relay

SIZE = 256 * 1024


@pytest_twisted.ensureDeferred
async def test_a_blob_is_served_under_a_repository_once_the_upstream_holds_it_there(
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
    client: Client,
) -> None:
    suffix = os.urandom(4).hex()
    owner, other = f"scope/owner-{suffix}", f"scope/other-{suffix}"
    data = os.urandom(SIZE)
    digest = registry.push_blob(owner, data)
    # The other repository exists upstream, but does not hold the blob.
    registry.push_blob(other, os.urandom(1024))

    def url(name: str) -> str:
        return f"{blobserve.url}/v2/{name}/blobs/{digest}"

    def heads(name: str) -> int:
        return relay.count("HEAD", f"/{name}/blobs/{digest}")

    assert_correct(await client.get(url(owner)).finished(), data)
    await until(committed_path(blobserve, digest).exists, "the commit")
    assert relay.count("GET", f"/{owner}/blobs/{digest}") == 1
    assert heads(owner) == 0

    denied = await client.get(url(other)).finished()
    assert denied.status == 404
    assert json.loads(denied.opening)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert heads(other) == 1
    assert relay.count("GET", f"/{other}/blobs/{digest}") == 0

    # The repository it was fetched for: a hit, the upstream not asked.
    before = list(relay.requests)
    assert_correct(await client.get(url(owner)).finished(), data)
    assert relay.requests == before

    registry.push_blob(other, data)
    assert_correct(await client.get(url(other)).finished(), data)
    assert heads(other) == 2
    assert relay.count("GET", f"/{other}/blobs/{digest}") == 0

    # Confirmed once, for good: in this run and the next.
    before = list(relay.requests)
    assert_correct(await client.get(url(other)).finished(), data)
    assert (await client.get(url(other), method="HEAD").finished()).status == 200
    assert relay.requests == before
    await blobserve.terminate()
    await blobserve.start()
    assert_correct(await client.get(url(other)).finished(), data)
    assert relay.requests == before


@pytest_twisted.ensureDeferred
async def test_a_manifest_is_served_by_digest_under_a_repository_that_holds_it(
    registry: RegistryProcess,
    relay: Relay,
    blobserve: BlobserveProcess,
    client: Client,
) -> None:
    suffix = os.urandom(4).hex()
    owner, other = f"scope/owner-{suffix}", f"scope/other-{suffix}"
    config = registry.push_blob(owner, b"{}")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(config),
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    registry.push_manifest(owner, "v1", manifest)
    registry.push_blob(other, b"{}")
    digest = Digest.of(manifest)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    def url(name: str) -> str:
        return f"{blobserve.url}/v2/{name}/manifests/{digest}"

    assert (await client.get(url(owner), headers=accept).finished()).status == 200
    denied = await client.get(url(other), headers=accept).finished()
    assert denied.status == 404
    assert json.loads(denied.opening)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert relay.count("HEAD", f"/{other}/manifests/{digest}") == 1

    registry.push_manifest(other, "v1", manifest)
    served = await client.get(url(other), headers=accept).finished()
    assert served.status == 200
    assert served.headers["docker-content-digest"] == str(digest)
    assert relay.count("HEAD", f"/{other}/manifests/{digest}") == 2
    assert relay.count("GET", f"/{other}/manifests/{digest}") == 0
