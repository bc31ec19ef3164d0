"""
--prefetch-layers: an image manifest served starts the downloads of the
blobs it names that the store lacks, with no client, behind the downloads
clients wait for.
"""

import json
from pathlib import Path
from typing import Any

import pytest
from test_resource import TAG_PATH, Registry, registry_for
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from blobserve.digest import Digest
from blobserve.fetch.slots import UpstreamSlots
from blobserve.upstream.client import Manifest, ManifestInfo

from fakes import Connection, FakeResponse, commit_blob

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
FOREIGN_TYPE = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

CONFIG = b'{"architecture": "amd64", "os": "linux"}'
LAYER_A = b"a" * 3000
LAYER_B = b"b" * 5000
LAYER_C = b"c" * 7000


def descriptor(data: bytes, media_type: str = LAYER_TYPE) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


def image(
    *layers: dict[str, Any], media_type: str = OCI_MANIFEST, config: bytes = CONFIG
) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
            "layers": list(layers),
        }
    ).encode()


def serve(
    registry: Registry,
    content: bytes,
    media_type: str = OCI_MANIFEST,
    path: str = TAG_PATH,
) -> Connection:
    """
    GET a manifest through blobserve, which the upstream answers with
    C{content}; the client has it.
    """
    client = registry.get(path)
    registry.upstream.manifest_fetches[-1][3].callback(
        Manifest(content, media_type, Digest.of(content))
    )
    status, _, body = client.response()
    assert (status, body) == (200, content)
    return client


def fetched(registry: Registry) -> list[Digest]:
    return [digest for _, digest, _ in registry.upstream.fetches]


def deliver(registry: Registry, digest: Digest, data: bytes) -> None:
    """
    Have the upstream answer the fetch of C{digest} with C{data}, whole.
    """
    [d] = [d for _, asked, d in registry.upstream.fetches if asked == digest]
    response = FakeResponse(length=len(data))
    d.callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(data)
    response.protocol.connectionLost(Failure(ResponseDone()))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return registry_for(tmp_path, Clock(), prefetch_layers=True)


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_a_manifest_served_starts_downloads_of_the_blobs_neither_held_nor_in_flight(
    registry: Registry, media_type: str
) -> None:
    commit_blob(registry.store, LAYER_A)
    # B is being fetched for a client already.
    registry.get(f"/v2/library/busybox/blobs/{Digest.of(LAYER_B)}")
    content = image(
        descriptor(LAYER_A),
        descriptor(LAYER_B),
        descriptor(LAYER_C),
        media_type=media_type,
    )
    serve(registry, content, media_type)
    # Largest first.
    assert fetched(registry) == [
        Digest.of(LAYER_B),
        Digest.of(LAYER_C),
        Digest.of(CONFIG),
    ]
    assert all(name == "library/busybox" for name, _, _ in registry.upstream.fetches)


def test_without_slots_two_prefetches_run_at_once_largest_first(
    registry: Registry,
) -> None:
    serve(registry, image(descriptor(LAYER_A), descriptor(LAYER_C)))
    assert fetched(registry) == [Digest.of(LAYER_C), Digest.of(LAYER_A)]
    deliver(registry, Digest.of(LAYER_A), LAYER_A)
    assert fetched(registry) == [
        Digest.of(LAYER_C),
        Digest.of(LAYER_A),
        Digest.of(CONFIG),
    ]


@pytest.mark.parametrize("concurrency", [2, 4, 7])
def test_prefetches_take_at_most_half_the_upstream_slots_largest_first(
    tmp_path: Path, concurrency: int
) -> None:
    clock = Clock()
    slots = UpstreamSlots(concurrency, 10, 30.0, clock)
    registry = registry_for(tmp_path, clock, prefetch_layers=True, slots=slots)
    layers = [bytes([n]) * (1000 + 100 * n) for n in range(8)]
    serve(registry, image(*(descriptor(layer) for layer in layers)))
    share = concurrency // 2
    by_size = [Digest.of(layer) for layer in reversed(layers)]
    assert fetched(registry) == by_size[:share]
    assert slots.taken == share
    # The other half is left to clients: one asking for a blob gets a slot.
    registry.get(f"/v2/library/busybox/blobs/{Digest.of(LAYER_B)}")
    assert fetched(registry)[-1] == Digest.of(LAYER_B)
    # One prefetch ending lets the next largest start.
    deliver(registry, by_size[0], layers[-1])
    assert fetched(registry)[-1] == by_size[share]


@pytest.mark.parametrize(
    ("flag", "media_type", "method"),
    [
        (False, OCI_MANIFEST, "GET"),
        (True, OCI_INDEX, "GET"),
        (True, OCI_MANIFEST, "HEAD"),
    ],
)
def test_nothing_is_prefetched_without_the_flag_for_an_index_or_a_head(
    tmp_path: Path, flag: bool, media_type: str, method: str
) -> None:
    registry = registry_for(tmp_path, Clock(), prefetch_layers=flag)
    content = image(descriptor(LAYER_A), media_type=media_type)
    if media_type == OCI_INDEX:
        content = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [descriptor(image(descriptor(LAYER_A)), OCI_MANIFEST)],
            }
        ).encode()
    if method == "HEAD":
        client = registry.get(TAG_PATH, "HEAD")
        registry.upstream.manifest_stats[-1][3].callback(
            ManifestInfo(Digest.of(content), media_type, len(content))
        )
        assert client.response()[0] == 200
    else:
        serve(registry, content, media_type)
    assert fetched(registry) == []


def test_a_manifest_the_client_holds_prefetches_nothing(registry: Registry) -> None:
    content = image(descriptor(LAYER_A))
    digest = Digest.of(content)
    client = registry.get(TAG_PATH, headers={"If-None-Match": f'"{digest}"'})
    registry.upstream.manifest_stats[-1][3].callback(
        ManifestInfo(digest, OCI_MANIFEST, len(content))
    )
    assert client.response()[0] == 304
    assert fetched(registry) == []


def test_foreign_layers_and_blobs_over_the_size_limit_are_not_prefetched(
    tmp_path: Path,
) -> None:
    registry = registry_for(
        tmp_path, Clock(), prefetch_layers=True, max_size=len(LAYER_B)
    )
    serve(
        registry,
        image(descriptor(LAYER_A, FOREIGN_TYPE), descriptor(LAYER_C)),
    )
    assert fetched(registry) == [Digest.of(CONFIG)]


def test_prefetched_blobs_commit_with_no_client_for_the_repository(
    registry: Registry,
) -> None:
    serve(registry, image(descriptor(LAYER_A)))
    deliver(registry, Digest.of(CONFIG), CONFIG)
    deliver(registry, Digest.of(LAYER_A), LAYER_A)
    for data in (CONFIG, LAYER_A):
        assert registry.committed(Digest.of(data))
        assert registry.store.holds("docker.io", "library/busybox", Digest.of(data))
    # Served from the store: no second upstream GET.
    client = registry.get(f"/v2/library/busybox/blobs/{Digest.of(LAYER_A)}")
    assert client.response()[2] == LAYER_A
    assert len(registry.upstream.fetches) == 2


def test_a_client_joins_a_prefetch_and_its_leaving_does_not_abandon_it(
    registry: Registry,
) -> None:
    serve(registry, image(descriptor(LAYER_A)))
    blob = f"/v2/library/busybox/blobs/{Digest.of(LAYER_A)}"
    leaving = registry.get(blob)
    leaving.disconnect()
    assert registry.upstream.cancelled == []
    client = registry.get(blob)
    deliver(registry, Digest.of(LAYER_A), LAYER_A)
    status, _, body = client.response()
    assert (status, body) == (200, LAYER_A)
    assert fetched(registry).count(Digest.of(LAYER_A)) == 1
    assert registry.committed(Digest.of(LAYER_A))


def test_a_prefetch_takes_no_slot_while_a_client_download_waits_for_one(
    tmp_path: Path,
) -> None:
    clock = Clock()
    slots = UpstreamSlots(1, 10, 30.0, clock)
    registry = registry_for(tmp_path, clock, prefetch_layers=True, slots=slots)
    registry.get(f"/v2/library/busybox/blobs/{Digest.of(LAYER_B)}")
    serve(registry, image())
    # The config waits for the slot; then a client's download queues for it.
    registry.get(f"/v2/library/busybox/blobs/{Digest.of(LAYER_C)}")
    assert fetched(registry) == [Digest.of(LAYER_B)]
    deliver(registry, Digest.of(LAYER_B), LAYER_B)
    # The slot went to the client's download, not to the prefetch.
    assert fetched(registry) == [Digest.of(LAYER_B), Digest.of(LAYER_C)]
    deliver(registry, Digest.of(LAYER_C), LAYER_C)
    assert fetched(registry) == [
        Digest.of(LAYER_B),
        Digest.of(LAYER_C),
        Digest.of(CONFIG),
    ]
    deliver(registry, Digest.of(CONFIG), CONFIG)
    assert registry.committed(Digest.of(CONFIG))
    assert slots.taken == 0


def test_a_stopped_prefetcher_starts_no_more(registry: Registry) -> None:
    serve(registry, image(descriptor(LAYER_A), descriptor(LAYER_B)))
    assert registry.layers is not None
    registry.layers.stopService()
    deliver(registry, Digest.of(LAYER_B), LAYER_B)
    assert fetched(registry) == [Digest.of(LAYER_B), Digest.of(LAYER_A)]
    serve(registry, image(descriptor(LAYER_C)), path=TAG_PATH + "2")
    assert Digest.of(LAYER_C) not in fetched(registry)
