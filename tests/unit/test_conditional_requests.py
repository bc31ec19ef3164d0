"""
Conditional requests on the registry resource: If-None-Match answered 304
for blobs and manifests, on hits and misses, with no body fetched from the
upstream; If-Range deciding between a range and the whole blob.
"""

from pathlib import Path

import pytest
from test_metrics import access_lines, served_at
from test_resource import (
    BLOB,
    DATA,
    DIGEST,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFEST_TYPE,
    TAG_PATH,
    Registry,
    commit,
    error_code,
    registry_for,
)
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from blobserve.digest import Digest
from blobserve.upstream.client import BlobUnknown, Manifest, ManifestInfo

from fakes import Connection, LoggedEvents, commit_blob

ETAG = f'"{DIGEST}"'
OTHER_ETAG = f'"{Digest.of(b"other")}"'
MANIFEST_ETAG = f'"{MANIFEST_DIGEST}"'
DIGEST_PATH = f"/v2/library/busybox/manifests/{MANIFEST_DIGEST}"

#: If-None-Match values that name DIGEST: weak comparison, lists, any.
HOLDING = [ETAG, f"W/{ETAG}", f"{OTHER_ETAG}, {ETAG}", "*"]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return registry_for(tmp_path, Clock())


def assert_not_modified(client: Connection, digest: Digest = DIGEST) -> None:
    status, headers, body = client.response()
    assert (status, body) == (304, b"")
    assert headers["etag"] == f'"{digest}"'
    assert headers["docker-content-digest"] == str(digest)
    # A length would have to be the whole object's; no representation
    # metadata either.
    assert "content-length" not in headers
    assert "content-type" not in headers
    assert "transfer-encoding" not in headers


def store_manifest(registry: Registry) -> None:
    """
    Have the tag fetched once through blobserve: its manifest is stored and
    the tag is fresh for the TTL.
    """
    client = registry.get(TAG_PATH)
    registry.upstream.manifest_fetches[-1][3].callback(
        Manifest(MANIFEST, MANIFEST_TYPE, MANIFEST_DIGEST)
    )
    assert client.response()[0] == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("holding", HOLDING)
def test_stored_blob_the_client_holds_is_not_modified_without_the_upstream(
    registry: Registry, method: str, holding: str
) -> None:
    commit(registry)
    assert_not_modified(registry.get(BLOB, method, {"If-None-Match": holding}))
    assert registry.upstream.fetches == []
    assert registry.upstream.stats == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("holding", HOLDING)
def test_blob_not_stored_is_confirmed_with_a_head_and_never_downloaded(
    registry: Registry, method: str, holding: str
) -> None:
    registry.upstream.size = len(DATA)
    client = registry.get(BLOB, method, {"If-None-Match": holding})
    assert_not_modified(client)
    assert registry.upstream.stats == [("library/busybox", DIGEST)]
    assert registry.upstream.fetches == []
    assert len(registry.table) == 0
    assert registry.temporaries() == []


def test_blob_the_upstream_does_not_have_is_404_not_304(registry: Registry) -> None:
    registry.upstream.stat_answer = fail(BlobUnknown("no such blob"))
    client = registry.get(BLOB, headers={"If-None-Match": ETAG})
    assert error_code(client) == (404, "BLOB_UNKNOWN")
    assert registry.upstream.fetches == []


def test_blob_in_flight_is_not_modified_without_joining_the_download(
    registry: Registry,
) -> None:
    first = registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    assert_not_modified(registry.get(BLOB, headers={"If-None-Match": ETAG}))
    assert len(registry.upstream.fetches) == 1
    assert registry.resource.following() == {DIGEST: 1}
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert first.response()[2] == DATA


@pytest.mark.parametrize(
    "other", [OTHER_ETAG, f"W/{OTHER_ETAG}", DIGEST.hex, f'"{DIGEST}', "", ETAG[:-2]]
)
def test_if_none_match_naming_something_else_gets_the_whole_blob(
    registry: Registry, other: str
) -> None:
    commit(registry)
    status, headers, body = registry.get(headers={"If-None-Match": other}).response()
    assert (status, body) == (200, DATA)
    assert headers["etag"] == ETAG


def test_tag_resolved_from_the_cache_is_not_modified_without_the_upstream(
    registry: Registry,
) -> None:
    store_manifest(registry)
    for method in ("GET", "HEAD"):
        client = registry.get(TAG_PATH, method, {"If-None-Match": MANIFEST_ETAG})
        assert_not_modified(client, MANIFEST_DIGEST)
    assert len(registry.upstream.manifest_fetches) == 1
    assert registry.upstream.manifest_stats == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_tag_not_cached_is_resolved_with_a_head_and_no_manifest_is_fetched(
    registry: Registry, method: str
) -> None:
    client = registry.get(TAG_PATH, method, {"If-None-Match": f"W/{MANIFEST_ETAG}"})
    [(name, reference, _, answer)] = registry.upstream.manifest_stats
    assert (name, reference) == ("library/busybox", "latest")
    answer.callback(ManifestInfo(MANIFEST_DIGEST, MANIFEST_TYPE, len(MANIFEST)))
    assert_not_modified(client, MANIFEST_DIGEST)
    assert registry.upstream.manifest_fetches == []


def test_tag_that_moved_is_fetched_by_its_new_digest_after_one_head(
    registry: Registry,
) -> None:
    client = registry.get(TAG_PATH, headers={"If-None-Match": OTHER_ETAG})
    registry.upstream.manifest_stats[0][3].callback(
        ManifestInfo(MANIFEST_DIGEST, MANIFEST_TYPE, len(MANIFEST))
    )
    [(_, reference, _, answer)] = registry.upstream.manifest_fetches
    assert reference == str(MANIFEST_DIGEST)
    answer.callback(Manifest(MANIFEST, MANIFEST_TYPE, MANIFEST_DIGEST))
    status, headers, body = client.response()
    assert (status, body) == (200, MANIFEST)
    assert headers["etag"] == MANIFEST_ETAG
    assert len(registry.upstream.manifest_stats) == 1


def test_tag_whose_head_gives_no_digest_is_compared_once_fetched(
    registry: Registry,
) -> None:
    client = registry.get(TAG_PATH, headers={"If-None-Match": MANIFEST_ETAG})
    registry.upstream.manifest_stats[0][3].callback(ManifestInfo(None, None, None))
    [(_, reference, _, answer)] = registry.upstream.manifest_fetches
    assert reference == "latest"
    answer.callback(Manifest(MANIFEST, MANIFEST_TYPE, MANIFEST_DIGEST))
    assert_not_modified(client, MANIFEST_DIGEST)


def test_manifest_by_digest_the_client_holds(registry: Registry) -> None:
    headers = {"If-None-Match": MANIFEST_ETAG}
    miss = registry.get(DIGEST_PATH, headers=headers)
    [(_, reference, _, answer)] = registry.upstream.manifest_stats
    assert reference == str(MANIFEST_DIGEST)
    answer.callback(ManifestInfo(MANIFEST_DIGEST, MANIFEST_TYPE, len(MANIFEST)))
    assert_not_modified(miss, MANIFEST_DIGEST)
    assert registry.upstream.manifest_fetches == []

    store_manifest(registry)
    assert_not_modified(registry.get(DIGEST_PATH, headers=headers), MANIFEST_DIGEST)
    assert len(registry.upstream.manifest_stats) == 1


def test_manifest_by_another_digest_is_fetched_without_a_head(
    registry: Registry,
) -> None:
    client = registry.get(DIGEST_PATH, headers={"If-None-Match": OTHER_ETAG})
    assert registry.upstream.manifest_stats == []
    registry.upstream.manifest_fetches[0][3].callback(
        Manifest(MANIFEST, MANIFEST_TYPE, MANIFEST_DIGEST)
    )
    assert client.response()[2] == MANIFEST


def test_access_log_says_hit_for_a_stored_304_and_miss_for_one_asked_upstream(
    tmp_path: Path,
) -> None:
    served = served_at(tmp_path)
    served.upstream.size = len(DATA)
    with LoggedEvents() as logged:
        served.get(BLOB, headers={"If-None-Match": ETAG})
        commit_blob(served.store, DATA)
        served.store.saw("docker.io", "library/busybox", DIGEST)
        served.get(BLOB, headers={"If-None-Match": ETAG})
    lines = access_lines(logged)
    assert [(e["status"], e["outcome"], e["bytes"]) for e in lines] == [
        (304, "miss", 0),
        (304, "hit", 0),
    ]


@pytest.mark.parametrize("validator", [ETAG, f" {ETAG} "])
def test_range_with_a_matching_if_range_is_served(
    registry: Registry, validator: str
) -> None:
    commit(registry)
    client = registry.get(headers={"Range": "bytes=10-19", "If-Range": validator})
    status, headers, body = client.response()
    assert (status, body) == (206, DATA[10:20])
    assert headers["content-range"] == f"bytes 10-19/{len(DATA)}"


@pytest.mark.parametrize(
    "validator",
    [
        f"W/{ETAG}",
        OTHER_ETAG,
        "Sat, 29 Oct 1994 19:43:31 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        str(DIGEST),
    ],
)
@pytest.mark.parametrize("asked", ["bytes=10-19", f"bytes={len(DATA)}-"])
def test_range_with_another_if_range_gets_the_whole_blob(
    registry: Registry, validator: str, asked: str
) -> None:
    commit(registry)
    client = registry.get(headers={"Range": asked, "If-Range": validator})
    status, headers, body = client.response()
    assert (status, body) == (200, DATA)
    assert "content-range" not in headers


def test_if_range_on_a_blob_in_flight(registry: Registry) -> None:
    registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    ranged = registry.get(headers={"Range": "bytes=0-9", "If-Range": ETAG})
    whole = registry.get(headers={"Range": "bytes=0-9", "If-Range": OTHER_ETAG})
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert ranged.response()[::2] == (206, DATA[:10])
    assert whole.response()[::2] == (200, DATA)
