"""
Tags lists and referrers: the upstream client's queries, the cache of their
answers (TTL, stale-if-error, a bound), the referrers tag schema fallback,
and the answers over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_resource import Registry, registry_for
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.digest import Digest
from blobserve.upstream.client import (
    MAX_LISTING_SIZE,
    Listing,
    Manifest,
    ManifestUnknown,
    ReferrersUnsupported,
    RegistryUpstream,
    RepositoryUnknown,
    UpstreamError,
    UpstreamRefused,
)
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache
from blobserve.web.referrers import INDEX_MEDIA_TYPE, Referrers, referrers_tag
from blobserve.web.tags import InvalidPage, next_link, parse_page

from fakes import FakeUpstream, failure_of, has_fired, result_of, store_at

SUBJECT = Digest.of(b"the subject manifest")
SIGNATURE = "application/vnd.example.signature"
SBOM = "application/vnd.example.sbom"
IMAGE_TYPE = "application/vnd.oci.image.manifest.v1+json"


def index(*artifact_types: str) -> bytes:
    manifests = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": str(Digest.of(kind.encode())),
            "size": 100,
            "artifactType": kind,
        }
        for kind in artifact_types
    ]
    body = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests}
    return json.dumps(body).encode()


def kinds(content: bytes) -> list[str]:
    return [m["artifactType"] for m in json.loads(content)["manifests"]]


# The upstream client.


class ListingDouble(Resource):
    """
    An upstream that answers every request with C{status}, C{headers} and
    C{body}, and records the URIs asked for.
    """

    isLeaf = True

    def __init__(
        self, status: int, body: bytes, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__()
        self.status, self.body, self.headers = status, body, headers or {}
        self.uris: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.uris.append(request.uri)
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(self.body))
        return self.body


def ask_double(double: ListingDouble, ask: str) -> Deferred[Listing]:
    agent = RequestTraversalAgent(double)
    upstream = RegistryUpstream("http://registry.test", HTTPClient(agent), Clock())
    d = (
        upstream.fetch_tags("lib/x", 2, "b")
        if ask == "tags"
        else upstream.fetch_referrers("lib/x", SUBJECT, SIGNATURE)
    )
    for _ in range(10):
        agent.flush()
    return d


def test_tags_query_passes_n_and_last_and_keeps_the_link() -> None:
    link = b'</v2/lib/x/tags/list?last=d&n=2>; rel="next"'
    double = ListingDouble(200, b'{"name": "lib/x", "tags": ["c", "d"]}')
    double.headers[b"Link"] = link
    listing = result_of(ask_double(double, "tags"))
    assert double.uris == [b"/v2/lib/x/tags/list?n=2&last=b"]
    assert listing == Listing(double.body, link.decode(), False)


def test_referrers_query_passes_the_artifact_type_and_reads_the_filter() -> None:
    double = ListingDouble(200, index(SIGNATURE))
    double.headers[b"OCI-Filters-Applied"] = b"artifactType"
    listing = result_of(ask_double(double, "referrers"))
    assert double.uris == [
        f"/v2/lib/x/referrers/{SUBJECT}?artifactType="
        "application%2Fvnd.example.signature".encode()
    ]
    assert listing == Listing(double.body, None, True)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"errors": [{"code": "NAME_UNKNOWN"}]}', RepositoryUnknown),
        (b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}', ManifestUnknown),
        (b"404 page not found", ReferrersUnsupported),
        (b'{"errors": [{"code": "UNSUPPORTED"}]}', ReferrersUnsupported),
    ],
)
def test_referrers_404_tells_no_api_from_unknown_names(
    body: bytes, error: type
) -> None:
    reason = failure_of(ask_double(ListingDouble(404, body), "referrers"))
    assert type(reason.value) is error


@pytest.mark.parametrize("ask", ["tags", "referrers"])
@pytest.mark.parametrize(
    "body", [b"[1, 2]", b"not json", b"{" + b" " * MAX_LISTING_SIZE + b"}"]
)
def test_listing_that_is_no_bounded_json_object_is_refused(
    ask: str, body: bytes
) -> None:
    failure_of(ask_double(ListingDouble(200, body), ask)).trap(UpstreamError)


def test_tags_of_an_unknown_repository() -> None:
    reason = failure_of(ask_double(ListingDouble(404, b""), "tags"))
    reason.trap(RepositoryUnknown)


# The cache.


class Cache:
    def __init__(self, size: int = 100, max_bytes: int = 2**20) -> None:
        self.clock = Clock()
        self.cache = ListingCache(self.clock, ttl=60, size=size, max_bytes=max_bytes)
        self.asked: list[tuple[str, Deferred[Listing]]] = []
        self.said: list[str] = []

    def get(self, key: str = "k") -> Deferred[Listing]:
        def fetch() -> Deferred[Listing]:
            d: Deferred[Listing] = Deferred()
            self.asked.append((key, d))
            return d

        return self.cache.get(key, fetch, self.said.append)

    def answer(self, outcome: Listing | Exception, index: int = -1) -> None:
        d = self.asked[index][1]
        if isinstance(outcome, Exception):
            d.errback(Failure(outcome))
        else:
            d.callback(outcome)


ONE, TWO = Listing(b'{"tags": ["1"]}'), Listing(b'{"tags": ["2"]}')


def test_answer_is_kept_for_the_ttl_and_asked_once_however_many_ask() -> None:
    subject = Cache()
    first, second = subject.get(), subject.get()
    assert not has_fired(first)
    subject.answer(ONE)
    assert result_of(first) == result_of(second) == ONE
    subject.clock.advance(59)
    assert result_of(subject.get()) == ONE
    assert len(subject.asked) == 1
    subject.clock.advance(1)
    d = subject.get()
    subject.answer(TWO)
    assert result_of(d) == TWO
    assert subject.said == ["join", "miss", "hit", "miss"]


def refreshed_with(error: Exception) -> tuple[Cache, Deferred[Listing]]:
    """
    A cache that kept an answer, and a query past its TTL that the upstream
    fails with C{error}.
    """
    subject = Cache()
    subject.get()
    subject.answer(ONE)
    subject.clock.advance(60)
    d = subject.get()
    subject.answer(error)
    return subject, d


@pytest.mark.parametrize(
    "error",
    [UpstreamError("unreachable"), UpstreamRefused(429, "rate-limiting", "60")],
)
def test_answer_is_served_stale_when_the_upstream_fails(error: Exception) -> None:
    subject, d = refreshed_with(error)
    assert result_of(d) == ONE
    assert subject.said[-1] == "stale"


@pytest.mark.parametrize(
    "error",
    [UpstreamRefused(401, "refused"), UpstreamRefused(403, "denied")],
)
def test_refusal_is_passed_on_not_served_stale(error: Exception) -> None:
    subject, d = refreshed_with(error)
    assert failure_of(d).value is error
    assert subject.said[-1] == "miss"


def test_gone_repository_is_gone_and_forgotten() -> None:
    subject, d = refreshed_with(RepositoryUnknown("gone"))
    failure_of(d).trap(RepositoryUnknown)
    d = subject.get()
    subject.answer(UpstreamError("unreachable"))
    failure_of(d).trap(UpstreamError)


def test_cold_query_with_a_failing_upstream_fails() -> None:
    subject = Cache()
    d = subject.get()
    subject.answer(UpstreamError("unreachable"))
    failure_of(d).trap(UpstreamError)


def test_caller_leaving_leaves_the_answer_to_the_others() -> None:
    subject = Cache()
    leaving, staying = subject.get(), subject.get()
    leaving.cancel()
    failure_of(leaving).trap(CancelledError)
    subject.answer(ONE)
    assert result_of(staying) == ONE
    assert result_of(subject.get()) == ONE


def test_cache_keeps_at_most_its_size_least_recently_used_out() -> None:
    subject = Cache(size=2)
    for key in ("a", "b"):
        subject.get(key)
        subject.answer(ONE)
    subject.get("a")  # a hit: "b" is now the least recently used
    subject.get("c")
    subject.answer(TWO)
    assert len(subject.cache) == 2
    asked = len(subject.asked)
    assert result_of(subject.get("a")) == ONE
    assert result_of(subject.get("c")) == TWO
    subject.get("b")
    assert len(subject.asked) == asked + 1


def test_cache_keeps_at_most_its_bytes_least_recently_used_out() -> None:
    big = Listing(b'{"tags": ["' + b"x" * 1000 + b'"]}')
    subject = Cache(max_bytes=3 * len(big.content))
    for key in "abcde":
        subject.get(key)
        subject.answer(big)
    assert len(subject.cache) == 3
    asked = len(subject.asked)
    assert result_of(subject.get("e")) == big
    subject.get("a")
    assert len(subject.asked) == asked + 1
    # An answer asked again replaces its bytes, not adds to them.
    for _ in range(5):
        subject.clock.advance(61)
        subject.get("e")
        subject.answer(big)
    assert len(subject.cache) == 3


# Tags list pages and links.


def test_page_is_n_and_last() -> None:
    assert parse_page("10", "v1.2") == (10, "v1.2")
    assert parse_page(None, None) == (None, None)


@pytest.mark.parametrize(
    ("n", "last"), [("-1", None), ("1" * 10, None), ("x", None), (None, "../a")]
)
def test_page_out_of_bounds_is_invalid(n: str | None, last: str | None) -> None:
    with pytest.raises(InvalidPage):
        parse_page(n, last)


@pytest.mark.parametrize(
    ("link", "registry", "expected"),
    [
        (
            '</v2/lib/x/tags/list?last=b&n=2>; rel="next"',
            None,
            '</v2/mirror/x/tags/list?n=2&last=b>; rel="next"',
        ),
        (
            "<https://other.test/v2/lib/x/tags/list?n=2&last=b&secret=1>;rel=next",
            "ghcr.io",
            '</v2/mirror/x/tags/list?n=2&last=b&ns=ghcr.io>; rel="next"',
        ),
        ('</v2/lib/x/tags/list?last=b>; rel="prev"', None, None),
        ('</v2/lib/x/tags/list?last=..%2F&n=2>; rel="next"', None, None),
        (None, None, None),
    ],
)
def test_next_link_leads_back_to_blobserve(
    link: str | None, registry: str | None, expected: str | None
) -> None:
    assert next_link(link, "mirror/x", registry) == expected


# Referrers.


class ReferrersSubject:
    def __init__(self, tmp_path: Path) -> None:
        clock = Clock()
        self.store = store_at(str(tmp_path))
        self.manifests = ManifestCache(self.store, clock, ttl=60)
        self.referrers = Referrers(ListingCache(clock, ttl=60), self.manifests)
        self.upstream = FakeUpstream()

    def get(self, artifact_type: str | None = None) -> Deferred[Listing]:
        return self.referrers.get(
            "docker.io", self.upstream, "lib/x", SUBJECT, artifact_type, lambda _: None
        )

    def no_api(self) -> None:
        self.upstream.referrers_fetches[-1][3].errback(
            Failure(ReferrersUnsupported("no referrers API"))
        )


@pytest.fixture
def referrers(tmp_path: Path) -> ReferrersSubject:
    return ReferrersSubject(tmp_path)


def test_referrers_tag_is_alg_dash_hex() -> None:
    assert referrers_tag(SUBJECT) == f"sha256-{SUBJECT.hex}"


def test_referrers_api_answer_is_passed_through(referrers: ReferrersSubject) -> None:
    d = referrers.get()
    name, digest, kind, fetch = referrers.upstream.referrers_fetches[0]
    assert (name, digest, kind) == ("lib/x", SUBJECT, None)
    fetch.callback(Listing(index(SIGNATURE, SBOM), "<x>; rel=next"))
    assert result_of(d) == Listing(index(SIGNATURE, SBOM))


def test_referrers_api_answer_not_filtered_upstream_is_filtered_here(
    referrers: ReferrersSubject,
) -> None:
    d = referrers.get(SBOM)
    assert referrers.upstream.referrers_fetches[0][2] == SBOM
    referrers.upstream.referrers_fetches[0][3].callback(Listing(index(SIGNATURE, SBOM)))
    listing = result_of(d)
    assert listing.filtered
    assert kinds(listing.content) == [SBOM]


def test_without_api_the_referrers_tag_index_is_served(
    referrers: ReferrersSubject,
) -> None:
    d = referrers.get(SIGNATURE)
    referrers.no_api()
    name, tag, accept, fetch = referrers.upstream.manifest_fetches[0]
    assert (name, tag, accept) == ("lib/x", referrers_tag(SUBJECT), [INDEX_MEDIA_TYPE])
    content = index(SIGNATURE, SBOM, SIGNATURE)
    fetch.callback(Manifest(content, INDEX_MEDIA_TYPE, Digest.of(content)))
    listing = result_of(d)
    assert listing.filtered
    assert kinds(listing.content) == [SIGNATURE, SIGNATURE]
    # The tag's index is kept as any tagged manifest is.
    assert referrers.store.media_type(Digest.of(content)) == INDEX_MEDIA_TYPE


def test_without_api_or_referrers_tag_the_index_is_empty(
    referrers: ReferrersSubject,
) -> None:
    d = referrers.get()
    referrers.no_api()
    referrers.upstream.manifest_fetches[0][3].errback(Failure(ManifestUnknown()))
    listing = result_of(d)
    assert json.loads(listing.content) == {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [],
    }
    assert not listing.filtered


@pytest.mark.parametrize(
    "tagged",
    [
        Manifest(
            b'{"layers": []}', "application/vnd.oci.image.manifest.v1+json", SUBJECT
        ),
        Manifest(b'{"manifests": 1}', INDEX_MEDIA_TYPE, SUBJECT),
    ],
)
def test_referrers_tag_that_is_no_index_is_an_upstream_error(
    referrers: ReferrersSubject, tagged: Manifest
) -> None:
    d = referrers.get()
    referrers.no_api()
    referrers.upstream.manifest_fetches[0][3].callback(tagged)
    failure_of(d).trap(UpstreamError)


def test_referrers_in_an_unknown_repository_are_unknown(
    referrers: ReferrersSubject,
) -> None:
    d = referrers.get()
    referrers.no_api()
    referrers.upstream.manifest_fetches[0][3].errback(Failure(RepositoryUnknown()))
    failure_of(d).trap(RepositoryUnknown)


# Over HTTP.


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return registry_for(tmp_path, Clock())


def test_tags_list_is_served_with_the_link_rewritten(registry: Registry) -> None:
    connection = registry.get("/v2/lib/x/tags/list?n=2&last=a&ns=ghcr.io")
    assert registry.upstream.tags_fetches == []
    name, n, last, d = registry.other.tags_fetches[0]
    assert (name, n, last) == ("lib/x", 2, "a")
    body = b'{"name": "lib/x", "tags": ["b", "c"]}'
    d.callback(Listing(body, '</v2/lib/x/tags/list?last=c&n=2>; rel="next"'))
    status, headers, answered = connection.response()
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["link"] == '</v2/lib/x/tags/list?n=2&last=c&ns=ghcr.io>; rel="next"'
    assert answered == body
    # The same page again: from the cache, headers only for a HEAD.
    status, headers, answered = registry.get(
        "/v2/lib/x/tags/list?n=2&last=a&ns=ghcr.io", "HEAD"
    ).response()
    assert (status, answered) == (200, b"")
    assert headers["content-length"] == str(len(body))
    assert len(registry.other.tags_fetches) == 1


def test_tags_list_with_a_bad_page_is_refused_without_asking(
    registry: Registry,
) -> None:
    status, _, body = registry.get("/v2/lib/x/tags/list?n=lots").response()
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert registry.upstream.tags_fetches == []


@pytest.mark.parametrize(
    ("query", "filtered"), [("", False), (f"?artifactType={SIGNATURE}", True)]
)
def test_referrers_are_served_as_an_oci_index(
    registry: Registry, query: str, filtered: bool
) -> None:
    connection = registry.get(f"/v2/lib/x/referrers/{SUBJECT}{query}")
    registry.upstream.referrers_fetches[0][3].callback(Listing(index(SIGNATURE, SBOM)))
    status, headers, body = connection.response()
    assert status == 200
    assert headers["content-type"] == INDEX_MEDIA_TYPE
    assert headers.get("oci-filters-applied") == ("artifactType" if filtered else None)
    assert kinds(body) == ([SIGNATURE] if filtered else [SIGNATURE, SBOM])


def test_referrers_of_a_bad_digest_are_refused(registry: Registry) -> None:
    status, _, _ = registry.get("/v2/lib/x/referrers/sha256:nothex").response()
    assert status == 400
    assert registry.upstream.referrers_fetches == []
