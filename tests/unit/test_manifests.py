"""
ManifestCache: digests fetched once and kept, tags trusted for a TTL, then
revalidated with HEAD, and served stale when the upstream fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from blobserve.digest import Digest
from blobserve.store.files import DirectoryBlobStore
from blobserve.upstream.client import (
    Manifest,
    ManifestInfo,
    ManifestUnknown,
    RepositoryUnknown,
    UpstreamError,
    UpstreamRefused,
)
from blobserve.web.manifests import ACCEPT_SETS_PER_TAG, ManifestCache, accept_key

from fakes import FakeUpstream, failure_of, has_fired, result_of, store_at

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ACCEPT = [INDEX_TYPE, "application/vnd.oci.image.manifest.v1+json"]


def manifest(n: int) -> Manifest:
    content = json.dumps({"schemaVersion": 2, "n": n}, indent=3).encode()
    return Manifest(content, INDEX_TYPE, Digest.of(content))


V1, V2 = manifest(1), manifest(2)


@define
class Cache:
    cache: ManifestCache
    upstream: FakeUpstream
    clock: Clock
    store: DirectoryBlobStore

    def get(self, reference: str = "latest") -> Deferred[Manifest]:
        return self.cache.get(
            "docker.io", self.upstream, "library/x", reference, ACCEPT
        )

    def head(self, reference: str = "latest") -> Deferred[ManifestInfo]:
        return self.cache.head(
            "docker.io", self.upstream, "library/x", reference, ACCEPT
        )


@pytest.fixture
def subject(tmp_path: Path) -> Cache:
    store = store_at(str(tmp_path))
    clock = Clock()
    return Cache(ManifestCache(store, clock, ttl=60), FakeUpstream(), clock, store)


def test_manifest_by_digest_is_fetched_once_and_kept(subject: Cache) -> None:
    first = subject.get(str(V1.digest))
    second = subject.get(str(V1.digest))
    assert len(subject.upstream.manifest_fetches) == 1
    name, reference, accept, d = subject.upstream.manifest_fetches[0]
    assert (name, reference, accept) == ("library/x", str(V1.digest), ACCEPT)
    d.callback(V1)
    assert result_of(first) == result_of(second) == V1

    assert subject.store.media_type(V1.digest) == INDEX_TYPE
    assert result_of(subject.get(str(V1.digest))) == V1
    assert len(subject.upstream.manifest_fetches) == 1


def cold_fetch(subject: Cache, version: Manifest = V1) -> None:
    d = subject.get()
    subject.upstream.manifest_fetches[-1][3].callback(version)
    assert result_of(d) == version


def test_tag_is_trusted_within_its_ttl(subject: Cache) -> None:
    cold_fetch(subject)
    assert subject.upstream.manifest_fetches[0][1] == "latest"
    subject.clock.advance(59)
    assert result_of(subject.get()) == V1
    assert result_of(subject.head()) == ManifestInfo(
        V1.digest, INDEX_TYPE, len(V1.content)
    )
    assert len(subject.upstream.manifest_fetches) == 1
    assert subject.upstream.manifest_stats == []


def test_stale_tag_is_revalidated_with_head(subject: Cache) -> None:
    cold_fetch(subject)
    subject.clock.advance(60)
    d = subject.get()
    assert len(subject.upstream.manifest_stats) == 1
    subject.upstream.manifest_stats[0][3].callback(
        ManifestInfo(V1.digest, INDEX_TYPE, len(V1.content))
    )
    assert result_of(d) == V1
    assert len(subject.upstream.manifest_fetches) == 1
    # Revalidated: trusted for another TTL.
    subject.clock.advance(30)
    assert result_of(subject.get()) == V1
    assert len(subject.upstream.manifest_stats) == 1


def test_moved_tag_fetches_the_new_manifest_by_digest(subject: Cache) -> None:
    cold_fetch(subject)
    subject.clock.advance(61)
    d = subject.get()
    subject.upstream.manifest_stats[0][3].callback(
        ManifestInfo(V2.digest, INDEX_TYPE, len(V2.content))
    )
    assert subject.upstream.manifest_fetches[-1][1] == str(V2.digest)
    subject.upstream.manifest_fetches[-1][3].callback(V2)
    assert result_of(d) == V2


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("unreachable"),
        UpstreamError("the upstream registry answered 503 Service Unavailable"),
        UpstreamRefused(429, "the upstream registry is rate-limiting (429)", "60"),
    ],
)
def test_stale_manifest_is_served_when_upstream_fails(
    subject: Cache, error: Exception
) -> None:
    cold_fetch(subject)
    subject.clock.advance(120)
    d = subject.get()
    subject.upstream.manifest_stats[0][3].errback(Failure(error))
    assert result_of(d) == V1
    h = subject.head()
    subject.upstream.manifest_stats[1][3].errback(Failure(error))
    assert result_of(h).digest == V1.digest


@pytest.mark.parametrize("status", [401, 403])
def test_refused_access_is_passed_on_not_served_stale(
    subject: Cache, status: int
) -> None:
    cold_fetch(subject)
    record = dict(subject.cache._tags)
    subject.clock.advance(120)
    d = subject.get()
    h = subject.head()
    refusal = UpstreamRefused(status, f"refused ({status})")
    for stat in subject.upstream.manifest_stats:
        stat[3].errback(Failure(refusal))
    assert failure_of(d).value is refusal
    assert failure_of(h).value is refusal
    # Kept: an outage after the refusal serves the tag stale again.
    assert subject.cache._tags == record
    d = subject.get()
    subject.upstream.manifest_stats[-1][3].errback(Failure(UpstreamError("down")))
    assert result_of(d) == V1


@pytest.mark.parametrize("gone", [ManifestUnknown(), RepositoryUnknown()])
def test_tag_gone_upstream_is_gone(subject: Cache, gone: Exception) -> None:
    cold_fetch(subject)
    subject.clock.advance(120)
    d = subject.get()
    subject.upstream.manifest_stats[0][3].errback(Failure(gone))
    failure_of(d).trap(type(gone))
    # Forgotten: the next request asks the upstream from scratch.
    subject.get()
    assert subject.upstream.manifest_fetches[-1][1] == "latest"
    assert len(subject.upstream.manifest_fetches) == 2


def test_cold_tag_with_failing_upstream_fails(subject: Cache) -> None:
    d = subject.get()
    subject.upstream.manifest_fetches[0][3].errback(Failure(UpstreamError("down")))
    failure_of(d).trap(UpstreamError)


def test_concurrent_requests_for_a_tag_ask_upstream_once(subject: Cache) -> None:
    requests = [subject.get() for _ in range(5)]
    assert len(subject.upstream.manifest_fetches) == 1
    assert not any(has_fired(d) for d in requests)
    subject.upstream.manifest_fetches[0][3].callback(V1)
    assert all(result_of(d) == V1 for d in requests)


def test_tags_are_cached_per_accepted_types(subject: Cache) -> None:
    cold_fetch(subject)
    subject.cache.get(
        "docker.io", subject.upstream, "library/x", "latest", ["application/json"]
    )
    subject.cache.get("ghcr.io", subject.upstream, "library/x", "latest", ACCEPT)
    assert len(subject.upstream.manifest_fetches) == 3


def test_head_of_uncached_tag_asks_upstream_head_only(subject: Cache) -> None:
    d = subject.head()
    subject.upstream.manifest_stats[0][3].callback(ManifestInfo(V1.digest, None, 10))
    assert result_of(d).digest == V1.digest
    assert subject.upstream.manifest_fetches == []


def test_accept_key_ignores_order_case_and_parameters() -> None:
    assert accept_key(["b/c;q=0.5, A/B", "a/b"]) == ("a/b", "b/c")


def test_head_of_a_tag_whose_caller_leaves_serves_nothing_stale(
    subject: Cache,
) -> None:
    cold_fetch(subject)
    record = dict(subject.cache._tags)
    subject.clock.advance(120)
    h = subject.head()
    h.cancel()
    failure_of(h).trap(CancelledError)
    # The upstream's HEAD is stopped, and the tag's record is as it was.
    assert len(subject.upstream.manifest_stats) == 1
    assert subject.upstream.manifest_stats[0][3].called
    assert subject.cache._tags == record


def test_caller_leaving_a_shared_tag_resolution_leaves_it_to_the_others(
    subject: Cache,
) -> None:
    cold_fetch(subject)
    subject.clock.advance(120)
    leaving, staying = subject.get(), subject.get()
    leaving.cancel()
    failure_of(leaving).trap(CancelledError)
    stat = subject.upstream.manifest_stats[0][3]
    assert not stat.called
    stat.callback(ManifestInfo(V2.digest, INDEX_TYPE, len(V2.content)))
    subject.upstream.manifest_fetches[-1][3].callback(V2)
    assert result_of(staying) == V2
    (records,) = subject.cache._tags.values()
    assert records[accept_key(ACCEPT)].digest == V2.digest


def test_each_caller_is_told_what_the_cache_did_for_it(subject: Cache) -> None:
    said: list[tuple[str, str]] = []

    def asking(who: str, method: str = "get") -> Deferred[Any]:
        ask = subject.cache.get if method == "get" else subject.cache.head
        d: Deferred[Any] = ask(
            "docker.io",
            subject.upstream,
            "library/x",
            "latest",
            ACCEPT,
            lambda outcome: said.append((who, outcome)),
        )
        return d

    first, second = asking("first"), asking("second")
    subject.upstream.manifest_fetches[-1][3].callback(V1)
    assert has_fired(first) and has_fired(second)
    asking("fresh")
    asking("fresh head", "head")
    subject.clock.advance(60)
    # Past the TTL the upstream says the tag still points to a stored
    # manifest: a hit, for a HEAD as for a GET.
    revalidated = asking("revalidated head", "head")
    subject.upstream.manifest_stats[-1][3].callback(
        ManifestInfo(V1.digest, INDEX_TYPE, len(V1.content))
    )
    assert has_fired(revalidated)
    subject.clock.advance(60)
    stale = asking("stale")
    subject.upstream.manifest_stats[-1][3].errback(UpstreamError("unreachable"))
    assert has_fired(stale)
    moved = asking("moved head", "head")
    subject.upstream.manifest_stats[-1][3].callback(
        ManifestInfo(V2.digest, INDEX_TYPE, len(V2.content))
    )
    assert has_fired(moved)
    # The first caller is told once its fetch is done, after the second
    # joined it.
    assert said == [
        ("second", "join"),
        ("first", "miss"),
        ("fresh", "hit"),
        ("fresh head", "hit"),
        ("revalidated head", "hit"),
        ("stale", "stale"),
        ("moved head", "miss"),
    ]


DOCKER_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def ask(
    subject: Cache,
    accept: list[str],
    tag: str = "latest",
    note: Callable[[str], object] = lambda outcome: None,
) -> tuple[Deferred[Manifest], Deferred[ManifestInfo]]:
    """
    A GET and a HEAD of C{tag} from a client sending C{accept}.
    """
    cache, upstream = subject.cache, subject.upstream
    return (
        cache.get("docker.io", upstream, "library/x", tag, accept, note),
        cache.head("docker.io", upstream, "library/x", tag, accept),
    )


def fail_upstream(subject: Cache) -> None:
    """
    Fail every upstream request not answered yet, as an unreachable upstream.
    """
    for *_, d in subject.upstream.manifest_fetches + subject.upstream.manifest_stats:
        if not d.called:
            d.errback(Failure(UpstreamError("unreachable")))


def ask_in_outage(
    subject: Cache, accept: list[str]
) -> tuple[Deferred[Manifest], Deferred[ManifestInfo], list[str]]:
    """
    A GET and a HEAD of a tag resolved for L{ACCEPT} (to V1, of INDEX_TYPE),
    from a client sending C{accept}, past the TTL, the upstream failing;
    and what the GET was told the cache did.
    """
    cold_fetch(subject)
    subject.clock.advance(120)
    said: list[str] = []
    d, h = ask(subject, accept, note=said.append)
    fail_upstream(subject)
    return d, h, said


@pytest.mark.parametrize(
    "accept",
    [
        [INDEX_TYPE],
        [f"{DOCKER_TYPE}, {INDEX_TYPE};q=0.5"],
        ["application/*"],
        ["*/*"],
        [],
    ],
)
def test_stale_tag_is_served_to_any_client_accepting_its_media_type(
    subject: Cache, accept: list[str]
) -> None:
    d, h, said = ask_in_outage(subject, accept)
    assert result_of(d) == V1
    assert result_of(h).digest == V1.digest
    assert said == ["stale"]


@pytest.mark.parametrize("accept", [[DOCKER_TYPE], ["text/*"]])
def test_stale_tag_is_not_served_to_a_client_refusing_its_media_type(
    subject: Cache, accept: list[str]
) -> None:
    d, h, said = ask_in_outage(subject, accept)
    failure_of(d).trap(UpstreamError)
    failure_of(h).trap(UpstreamError)
    assert said == ["miss"]


def test_stale_tag_prefers_what_it_resolved_to_for_the_same_accept(
    subject: Cache,
) -> None:
    # The tag resolved to V1 for ACCEPT, then to V2 for another client;
    # a client sending ACCEPT again gets V1, any other the most recent, V2.
    cold_fetch(subject)
    subject.clock.advance(30)
    d, _ = ask(subject, [INDEX_TYPE])
    subject.upstream.manifest_fetches[-1][3].callback(V2)
    subject.upstream.manifest_stats[-1][3].callback(ManifestInfo(V2.digest, None, 1))
    assert result_of(d) == V2
    subject.clock.advance(120)
    same, _ = ask(subject, ACCEPT)
    other, _ = ask(subject, ["*/*"])
    fail_upstream(subject)
    assert result_of(same) == V1
    assert result_of(other) == V2


def test_tag_cache_forgets_the_least_recently_used_tag(tmp_path: Path) -> None:
    store = store_at(str(tmp_path))
    clock = Clock()
    subject = Cache(
        ManifestCache(store, clock, ttl=60, max_tags=2), FakeUpstream(), clock, store
    )
    for tag in ("a", "b"):
        d = subject.get(tag)
        subject.upstream.manifest_fetches[-1][3].callback(V1)
        result_of(d)
    result_of(subject.get("a"))  # a hit: "a" is now the more recently used
    d = subject.get("c")
    subject.upstream.manifest_fetches[-1][3].callback(V2)
    result_of(d)
    assert len(subject.cache._tags) == 2
    subject.clock.advance(120)
    a, b, c = subject.get("a"), subject.get("b"), subject.get("c")
    fail_upstream(subject)
    assert result_of(a) == V1
    failure_of(b).trap(UpstreamError)
    assert result_of(c) == V2


def test_records_of_a_tag_are_bounded_whatever_clients_accept(tmp_path: Path) -> None:
    cache = ManifestCache(store_at(str(tmp_path)), Clock(), ttl=60, max_tags=10)
    upstream = FakeUpstream()
    for i in range(100):
        d = cache.get("docker.io", upstream, "library/x", "latest", [f"x/y{i:03}"])
        upstream.manifest_fetches[-1][3].callback(V1)
        assert result_of(d) == V1
    [records] = cache._tags.values()
    # The latest sets are the ones kept.
    assert sorted(records) == [(f"x/y{i:03}",) for i in range(92, 100)]
    assert len(records) == ACCEPT_SETS_PER_TAG


def test_an_accept_key_is_bounded_whatever_the_header() -> None:
    key = accept_key(["x/" + "z" * 5000, ", ".join(f"a/b{n:03}" for n in range(99))])
    assert key == tuple(f"a/b{n:03}" for n in range(32))
