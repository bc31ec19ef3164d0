"""
Repository-scoped answers: what the store holds because one repository asked
for it is served under another only once the upstream has confirmed, with a
HEAD for that repository, that it holds it too; once per repository and
digest, however many ask at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_manifests import ACCEPT, V1
from test_metrics import access_lines, served_at
from test_resource import BLOB, DATA, DIGEST, Registry, error_code, registry_for
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from blobserve.digest import Digest
from blobserve.upstream.client import (
    BlobInfo,
    BlobUnknown,
    ManifestInfo,
    ManifestUnknown,
    RepositoryUnknown,
    UpstreamError,
    UpstreamRefused,
)
from blobserve.web.manifests import ManifestCache
from blobserve.web.scope import RepositoryScope

from fakes import (
    FakeUpstream,
    LoggedEvents,
    commit_blob,
    failure_of,
    has_fired,
    result_of,
    store_at,
)

#: The repository the blob was fetched for, and another one.
OWNER, OTHER = "library/busybox", "library/other"
OTHER_BLOB = f"/v2/{OTHER}/blobs/{DIGEST}"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """
    A registry whose store holds the blob, fetched for L{OWNER}.
    """
    registry = registry_for(tmp_path, Clock())
    commit_blob(registry.store, DATA)
    registry.store.saw("docker.io", OWNER, DIGEST)
    return registry


def test_a_blob_is_served_under_another_repository_once_the_upstream_confirms(
    registry: Registry,
) -> None:
    registry.upstream.size = len(DATA)
    status, _, body = registry.get(OTHER_BLOB).response()
    assert (status, body) == (200, DATA)
    assert registry.upstream.stats == [(OTHER, DIGEST)]
    assert registry.upstream.fetches == []
    # Once, ever: GET and HEAD answer from the store without asking again.
    assert registry.get(OTHER_BLOB).response()[2] == DATA
    assert registry.get(OTHER_BLOB, "HEAD").response()[0] == 200
    assert registry.upstream.stats == [(OTHER, DIGEST)]
    assert registry.store.holds("docker.io", OTHER, DIGEST)


def test_the_repository_a_blob_was_fetched_for_is_served_without_asking(
    registry: Registry,
) -> None:
    assert registry.get(BLOB).response()[2] == DATA
    assert registry.get(BLOB, "HEAD").response()[0] == 200
    assert registry.upstream.stats == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_blob_the_upstream_denies_to_a_repository_is_not_served_under_it(
    registry: Registry, method: str
) -> None:
    registry.upstream.stat_answer = fail(BlobUnknown("no such blob"))
    client = registry.get(OTHER_BLOB, method)
    if method == "GET":
        assert error_code(client) == (404, "BLOB_UNKNOWN")
    else:
        assert client.response()[0] == 404
    assert registry.upstream.stats == [(OTHER, DIGEST)]
    assert not registry.store.holds("docker.io", OTHER, DIGEST)
    # The owner still gets it.
    assert registry.get(BLOB).response()[2] == DATA


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (RepositoryUnknown("no such repository"), (404, "NAME_UNKNOWN")),
        (UpstreamRefused(401, "who are you"), (401, "UNAUTHORIZED")),
        (UpstreamRefused(403, "not yours"), (403, "DENIED")),
        (UpstreamError("connection refused"), (502, "UNKNOWN")),
    ],
)
def test_what_the_upstream_answers_instead_of_a_confirmation_is_passed_on(
    registry: Registry, answer: Exception, expected: tuple[int, str]
) -> None:
    registry.upstream.stat_answer = fail(answer)
    assert error_code(registry.get(OTHER_BLOB)) == expected
    assert not registry.store.holds("docker.io", OTHER, DIGEST)


def test_an_outage_is_not_remembered_and_serves_nothing_stored(
    registry: Registry,
) -> None:
    registry.upstream.stat_answer = fail(UpstreamError("connection refused"))
    assert error_code(registry.get(OTHER_BLOB)) == (502, "UNKNOWN")
    registry.upstream.stat_answer = None
    assert registry.get(OTHER_BLOB).response()[2] == DATA
    assert registry.upstream.stats == [(OTHER, DIGEST), (OTHER, DIGEST)]


def test_concurrent_first_requests_share_one_confirmation(
    registry: Registry,
) -> None:
    pending: Deferred[BlobInfo] = Deferred()
    registry.upstream.stat_answer = pending
    clients = [registry.get(OTHER_BLOB), registry.get(OTHER_BLOB)]
    head = registry.get(OTHER_BLOB, "HEAD")
    assert registry.upstream.stats == [(OTHER, DIGEST)]
    assert all(c.transport.value() == b"" for c in [*clients, head])
    pending.callback(BlobInfo(len(DATA)))
    assert [c.response()[:3:2] for c in clients] == [(200, DATA)] * 2
    assert head.response()[0] == 200
    assert registry.upstream.stats == [(OTHER, DIGEST)]


def test_a_client_that_leaves_before_the_confirmation_leaves_it_running(
    registry: Registry,
) -> None:
    pending: Deferred[BlobInfo] = Deferred()
    registry.upstream.stat_answer = pending
    registry.get(OTHER_BLOB).disconnect()
    pending.callback(BlobInfo(len(DATA)))
    # Its answer is remembered all the same.
    assert registry.store.holds("docker.io", OTHER, DIGEST)
    assert registry.get(OTHER_BLOB).response()[2] == DATA
    assert registry.upstream.stats == [(OTHER, DIGEST)]


def test_a_repository_of_another_registry_is_confirmed_by_that_registry(
    registry: Registry,
) -> None:
    client = registry.get(f"{BLOB}?ns=ghcr.io")
    assert client.response()[2] == DATA
    assert registry.upstream.stats == []
    assert registry.other.stats == [(OWNER, DIGEST)]
    assert registry.store.holds("ghcr.io", OWNER, DIGEST)


def test_joining_a_download_for_another_repository_waits_for_a_confirmation(
    tmp_path: Path,
) -> None:
    registry = registry_for(tmp_path, Clock())
    owner = registry.get(BLOB)
    same = registry.get(BLOB)
    # A second client of the same repository joins without asking.
    assert registry.upstream.stats == []
    pending: Deferred[BlobInfo] = Deferred()
    registry.upstream.stat_answer = pending
    other = registry.get(OTHER_BLOB)
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    assert owner.response()[2] == same.response()[2] == DATA[:1000]
    assert other.transport.value() == b""
    pending.callback(BlobInfo(len(DATA)))
    # It joins the same download: still one fetch.
    assert other.response()[:3:2] == (200, DATA[:1000])
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert other.response()[2] == DATA
    assert len(registry.upstream.fetches) == 1
    assert registry.upstream.stats == [(OTHER, DIGEST)]


def test_a_download_for_another_repository_is_not_joined_when_denied(
    tmp_path: Path,
) -> None:
    registry = registry_for(tmp_path, Clock())
    owner = registry.get(BLOB)
    registry.upstream.stat_answer = fail(BlobUnknown("no such blob"))
    assert error_code(registry.get(OTHER_BLOB)) == (404, "BLOB_UNKNOWN")
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert owner.response()[2] == DATA


def test_a_miss_needs_no_confirmation_and_records_its_repository(
    tmp_path: Path,
) -> None:
    registry = registry_for(tmp_path, Clock())
    client = registry.get(OTHER_BLOB)
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert client.response()[2] == DATA
    assert registry.upstream.stats == []
    assert registry.store.holds("docker.io", OTHER, DIGEST)
    assert not registry.store.holds("docker.io", OWNER, DIGEST)


def test_a_hit_after_a_confirmation_is_logged_as_a_hit(tmp_path: Path) -> None:
    served = served_at(tmp_path)
    commit_blob(served.store, DATA)
    with LoggedEvents() as logged:
        assert served.get(OTHER_BLOB).response()[2] == DATA
    [line] = access_lines(logged)
    assert (line["outcome"], line["status"]) == ("hit", 200)
    assert served.upstream.stats == [(OTHER, DIGEST)]


# Manifests by digest.


def manifests(tmp_path: Path) -> tuple[ManifestCache, FakeUpstream]:
    """
    A manifest cache whose store holds L{V1}, fetched for L{OWNER}.
    """
    store = store_at(str(tmp_path))
    cache = ManifestCache(store, Clock(), ttl=60)
    upstream = FakeUpstream()
    d = cache.get("docker.io", upstream, OWNER, str(V1.digest), ACCEPT)
    upstream.manifest_fetches[0][3].callback(V1)
    assert result_of(d) == V1
    return cache, upstream


def test_a_manifest_fetched_by_digest_or_tag_records_its_repository(
    tmp_path: Path,
) -> None:
    store = store_at(str(tmp_path))
    cache = ManifestCache(store, Clock(), ttl=60)
    upstream = FakeUpstream()
    d = cache.get("docker.io", upstream, OWNER, "latest", ACCEPT)
    upstream.manifest_fetches[0][3].callback(V1)
    assert result_of(d) == V1
    assert store.holds("docker.io", OWNER, V1.digest)
    assert not store.holds("docker.io", OTHER, V1.digest)


@pytest.mark.parametrize("method", ["get", "head"])
def test_a_stored_manifest_is_served_under_another_repository_once_confirmed(
    tmp_path: Path, method: str
) -> None:
    cache, upstream = manifests(tmp_path)
    ask = getattr(cache, method)
    first = ask("docker.io", upstream, OTHER, str(V1.digest), ACCEPT)
    second = ask("docker.io", upstream, OTHER, str(V1.digest), ACCEPT)
    assert [stat[:3] for stat in upstream.manifest_stats] == [
        (OTHER, str(V1.digest), ACCEPT)
    ]
    assert not has_fired(first)
    upstream.manifest_stats[0][3].callback(
        ManifestInfo(V1.digest, V1.media_type, len(V1.content))
    )
    expected = (
        V1
        if method == "get"
        else ManifestInfo(V1.digest, V1.media_type, len(V1.content))
    )
    assert result_of(first) == result_of(second) == expected
    outcomes: list[str] = []
    third = ask("docker.io", upstream, OTHER, str(V1.digest), ACCEPT, outcomes.append)
    assert result_of(third) == expected
    assert outcomes == ["hit"]
    assert len(upstream.manifest_stats) == 1
    assert len(upstream.manifest_fetches) == 1


@pytest.mark.parametrize("method", ["get", "head"])
def test_a_stored_manifest_the_upstream_denies_to_a_repository_is_not_served(
    tmp_path: Path, method: str
) -> None:
    cache, upstream = manifests(tmp_path)
    d = getattr(cache, method)("docker.io", upstream, OTHER, str(V1.digest), ACCEPT)
    upstream.manifest_stats[0][3].errback(ManifestUnknown("no such manifest"))
    assert failure_of(d).check(ManifestUnknown)
    # Not remembered: the next request asks again.
    getattr(cache, method)("docker.io", upstream, OTHER, str(V1.digest), ACCEPT)
    assert len(upstream.manifest_stats) == 2


def test_manifest_fetches_by_digest_for_two_repositories_are_not_shared(
    tmp_path: Path,
) -> None:
    store = store_at(str(tmp_path))
    cache = ManifestCache(store, Clock(), ttl=60)
    upstream = FakeUpstream()
    first = cache.get("docker.io", upstream, OWNER, str(V1.digest), ACCEPT)
    second = cache.get("docker.io", upstream, OTHER, str(V1.digest), ACCEPT)
    assert [fetch[0] for fetch in upstream.manifest_fetches] == [OWNER, OTHER]
    upstream.manifest_fetches[1][3].errback(ManifestUnknown("no such manifest"))
    upstream.manifest_fetches[0][3].callback(V1)
    assert result_of(first) == V1
    assert failure_of(second).check(ManifestUnknown)


def test_a_manifest_denied_under_another_repository_answers_manifest_unknown(
    registry: Registry,
) -> None:
    content = json.dumps({"schemaVersion": 2}).encode()
    commit_blob(registry.store, content, "application/vnd.oci.image.manifest.v1+json")
    client = registry.get(f"/v2/{OTHER}/manifests/{Digest.of(content)}")
    registry.upstream.manifest_stats[0][3].errback(ManifestUnknown("unknown"))
    assert error_code(client) == (404, "MANIFEST_UNKNOWN")


# The scope on its own.


def test_a_confirmation_answered_at_once_is_remembered(tmp_path: Path) -> None:
    store = store_at(str(tmp_path))
    scope = RepositoryScope(store)
    asked: list[int] = []

    def ask() -> Deferred[BlobInfo]:
        asked.append(1)
        d: Deferred[BlobInfo] = Deferred()
        d.callback(BlobInfo(1))
        return d

    assert result_of(scope.confirm("docker.io", OTHER, DIGEST, ask)) is None
    assert result_of(scope.confirm("docker.io", OTHER, DIGEST, ask)) is None
    assert asked == [1]
    assert scope.holds("docker.io", OTHER, DIGEST)
