"""
The metrics and the access log, seen through the site as clients use it: a
known sequence of requests, and the exact counts and lines it leaves.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.fetch.inflight import InFlightTable
from blobserve.fetch.retry import RetryPolicy
from blobserve.ops.access import AccessLog, Exchange
from blobserve.ops.metrics import Figures, Metrics, MetricsPage
from blobserve.store.eviction import Evictor
from blobserve.store.files import DirectoryBlobStore
from blobserve.upstream.client import (
    Listing,
    Manifest,
    ManifestInfo,
    UpstreamError,
    Upstreams,
)
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache
from blobserve.web.resource import RegistryResource
from blobserve.web.root import site_root
from blobserve.web.site import IConnectionCounts, RegistrySite, registry_site

from fakes import (
    ClientTransport,
    Connection,
    FakeResponse,
    FakeUpstream,
    LoggedEvents,
    commit_blob,
    store_at,
)

DATA = bytes(range(256)) * 400
DIGEST = Digest.of(DATA)
BLOB = f"/v2/library/busybox/blobs/{DIGEST}"
MANIFEST = b'{"schemaVersion": 2}'
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TAG = "/v2/library/busybox/manifests/latest"


@define
class Served:
    """
    blobserve's site, in memory, with its metrics and access log.
    """

    store: DirectoryBlobStore
    upstream: FakeUpstream
    clock: Clock
    metrics: Metrics
    #: The site, behind its connection limit.
    factory: WrappingFactory

    def get(
        self,
        path: str = BLOB,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> Connection:
        channel = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = ClientTransport()
        channel.makeConnection(transport)
        connection = Connection(channel, transport)
        connection.request(method, path, headers)
        return connection

    def answer(self, status: int = 200, start: int = 0) -> FakeResponse:
        headers = Headers()
        if status == 206:
            headers.setRawHeaders(
                b"content-range",
                [b"bytes %d-%d/%d" % (start, len(DATA) - 1, len(DATA))],
            )
        response = FakeResponse(length=len(DATA) - start, code=status, headers=headers)
        self.upstream.fetches[-1][2].callback(response)
        return response

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """
        Every sample the metrics page shows, by name and labels.
        """
        text = generate_latest(self.metrics.registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def served_at(tmp_path: Path) -> Served:
    store = store_at(str(tmp_path))
    upstream = FakeUpstream()
    clock = Clock()
    metrics = Metrics()
    evictor = Evictor(store, 100 * len(DATA))
    table = InFlightTable(
        partial(
            Download,
            store=store,
            clock=clock,
            retry=RetryPolicy(retries=2, delay=1),
            evictor=evictor,
            events=metrics,
        )
    )
    resource = RegistryResource(
        store,
        table,
        ManifestCache(store, clock, ttl=60),
        Upstreams({"docker.io": upstream}, "docker.io"),
        clock=clock,
        sink_for=lambda request: None,
        listings=ListingCache(clock, ttl=60),
    )
    factory = registry_site(
        site_root(resource, {}, MetricsPage(metrics.registry)),
        timeout=60,
        reactor=clock,
        observers=(metrics, AccessLog()),
    )
    metrics.watch(
        lambda: Figures(
            downloads=list(table),
            clients=sum(resource.following().values()),
            responses=resource.responses_in_progress(),
            store=evictor.status(),
            slots=None,
            connections=IConnectionCounts(factory).figures(),
        )
    )
    assert isinstance(factory.wrappedFactory, RegistrySite)
    return Served(store, upstream, clock, metrics, factory)


@pytest.fixture
def served(tmp_path: Path) -> Served:
    return served_at(tmp_path)


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def access_lines(logged: LoggedEvents) -> list[dict[str, Any]]:
    return [e for e in logged.events if e.get("log_namespace") == "blobserve.access"]


def test_a_miss_joined_then_hits_a_resume_and_a_stale_tag_are_counted_exactly(
    served: Served,
) -> None:
    # A miss, joined by two clients while it lands; its transfer breaks once
    # and is resumed.
    first = served.get()
    joiners = [served.get(), served.get()]
    assert len(served.upstream.fetches) == 1
    broken = served.answer()
    assert broken.protocol is not None
    served.clock.advance(2)
    broken.protocol.dataReceived(DATA[:30000])
    during = served.scrape()
    assert during[sample("blobserve_downloads_in_flight")] == 1
    assert during[sample("blobserve_download_clients")] == 3
    assert during[sample("blobserve_blob_responses_in_progress")] == 3
    assert during[
        sample("blobserve_upstream_received_bytes_total", registry="docker.io")
    ] == (30000)
    broken.protocol.connectionLost(Failure(ConnectionLost()))
    served.clock.advance(1)
    resumed = served.answer(206, 30000)
    assert resumed.protocol is not None
    resumed.protocol.dataReceived(DATA[30000:])
    resumed.protocol.connectionLost(Failure(ResponseDone()))
    for client in [first, *joiners]:
        assert client.response()[2] == DATA

    # Two hits.
    hits = [served.get(), served.get()]
    for client in hits:
        assert client.response()[2] == DATA

    # A tag: fetched once, then, past its TTL, served stale.
    tag = served.get(TAG)
    _, _, _, fetched = served.upstream.manifest_fetches[-1]
    fetched.callback(Manifest(MANIFEST, MANIFEST_TYPE, Digest.of(MANIFEST)))
    assert tag.response()[0] == 200
    served.clock.advance(61)
    stale = served.get(TAG)
    _, _, _, asked = served.upstream.manifest_stats[-1]
    asked.errback(UpstreamError("upstream unreachable"))
    assert stale.response()[2] == MANIFEST

    samples = served.scrape()
    expected = {
        sample("blobserve_cache_requests_total", kind="blob", outcome="miss"): 1,
        sample("blobserve_cache_requests_total", kind="blob", outcome="join"): 2,
        sample("blobserve_cache_requests_total", kind="blob", outcome="hit"): 2,
        sample("blobserve_cache_requests_total", kind="manifest", outcome="miss"): 1,
        sample("blobserve_cache_requests_total", kind="manifest", outcome="stale"): 1,
        sample("blobserve_sent_bytes_total", outcome="miss"): len(DATA) + len(MANIFEST),
        sample("blobserve_sent_bytes_total", outcome="join"): 2 * len(DATA),
        sample("blobserve_sent_bytes_total", outcome="hit"): 2 * len(DATA),
        sample("blobserve_sent_bytes_total", outcome="stale"): len(MANIFEST),
        sample(
            "blobserve_http_requests_total", route="blob", method="GET", status="2xx"
        ): 5,
        sample(
            "blobserve_http_requests_total",
            route="manifest",
            method="GET",
            status="2xx",
        ): 2,
        sample("blobserve_downloads_total", result="committed"): 1,
        sample("blobserve_download_duration_seconds_count", result="committed"): 1,
        sample("blobserve_download_duration_seconds_sum", result="committed"): 3,
        sample("blobserve_download_resumes_total", cause="broken"): 1,
        sample("blobserve_upstream_received_bytes_total", registry="docker.io"): len(
            DATA
        ),
        sample("blobserve_download_retries_exhausted_total"): 0,
        sample("blobserve_digest_failures_total"): 0,
        sample("blobserve_aborted_responses_total"): 0,
        sample("blobserve_downloads_in_flight"): 0,
        sample("blobserve_download_clients"): 0,
        sample("blobserve_store_blobs"): 2,
        sample("blobserve_store_bytes"): len(DATA) + len(MANIFEST),
        sample("blobserve_store_limit_bytes"): 100 * len(DATA),
        # Built, never closed: every client of the test's.
        sample("blobserve_connections_open"): 7,
        sample("blobserve_connections_refused_total"): 0,
        sample("blobserve_connections_dropped_total"): 0,
        sample("blobserve_blob_first_byte_seconds_count", outcome="miss"): 1,
        sample("blobserve_blob_first_byte_seconds_count", outcome="join"): 2,
        sample("blobserve_blob_first_byte_seconds_count", outcome="hit"): 2,
        # Their first byte came 2 s after their request, with the first
        # bytes of the upstream's body.
        sample("blobserve_blob_first_byte_seconds_sum", outcome="miss"): 2,
        sample("blobserve_blob_first_byte_seconds_sum", outcome="join"): 4,
    }
    assert {key: samples.get(key) for key in expected} == expected
    # The status page's figures, blobs and manifests together.
    assert served.metrics.cache_counts() == {
        "hits": 2,
        "misses": 2,
        "joins": 2,
        "stale": 1,
    }


def test_retries_spent_and_digest_failures_are_counted(tmp_path: Path) -> None:
    served = served_at(tmp_path)
    client = served.get()
    for _ in range(3):
        response = served.answer(200)
        assert response.protocol is not None
        response.protocol.connectionLost(Failure(ConnectionLost()))
        served.clock.advance(2)
    assert client.transport.aborted
    # As a real socket would, once aborted.
    client.disconnect()
    other = served_at(tmp_path / "other")
    other.get()
    corrupt = other.answer()
    assert corrupt.protocol is not None
    corrupt.protocol.dataReceived(b"x" * len(DATA))
    corrupt.protocol.connectionLost(Failure(ResponseDone()))

    assert served.scrape()[sample("blobserve_download_retries_exhausted_total")] == 1
    assert served.scrape()[sample("blobserve_downloads_total", result="failed")] == 1
    assert served.scrape()[sample("blobserve_aborted_responses_total")] == 1
    assert other.scrape()[sample("blobserve_digest_failures_total")] == 1
    assert other.scrape()[sample("blobserve_download_retries_exhausted_total")] == 0


def test_access_log_says_hit_miss_join_and_aborted(served: Served) -> None:
    with LoggedEvents() as logged:
        miss = served.get()
        join = served.get()
        response = served.answer()
        assert response.protocol is not None
        response.protocol.dataReceived(DATA[:1000])
        join.disconnect()
        response.protocol.dataReceived(DATA[1000:])
        response.protocol.connectionLost(Failure(ResponseDone()))
        assert miss.response()[2] == DATA
        served.get()
        served.get("/v2/")
    lines = access_lines(logged)
    short = DIGEST.short()
    assert [
        (e["outcome"], e["status"], e["bytes"], e["aborted"], e["digest"])
        for e in lines
    ] == [
        ("join", 200, 1000, True, str(DIGEST)),
        ("miss", 200, len(DATA), False, str(DIGEST)),
        ("hit", 200, len(DATA), False, str(DIGEST)),
        ("-", 200, 2, False, None),
    ]
    messages = [m for m in logged.messages() if '"GET ' in m]
    assert messages[0] == (
        f'192.168.1.1 "GET {BLOB}" 200 1000 0.000s join {short} aborted'
    )
    assert messages[1].endswith(f" miss {short}")
    assert messages[2].endswith(f" hit {short}")
    assert messages[3] == '192.168.1.1 "GET /v2/" 200 2 0.000s -'


def test_a_client_gone_before_any_header_shows_as_499(served: Served) -> None:
    with LoggedEvents() as logged:
        client = served.get()
        client.disconnect()
    [line] = access_lines(logged)
    assert (line["status"], line["aborted"], line["outcome"]) == (499, True, "miss")


def test_refused_requests_are_logged_and_counted(served: Served) -> None:
    with LoggedEvents() as logged:
        served.get(BLOB, "DELETE")
    [line] = access_lines(logged)
    assert (line["method"], line["status"]) == ("DELETE", 405)
    key = sample(
        "blobserve_http_requests_total", route="other", method="other", status="4xx"
    )
    assert served.scrape()[key] == 1


def test_a_manifest_head_and_a_blob_head_note_their_outcome(served: Served) -> None:
    commit_blob(served.store, DATA)
    served.get(BLOB, "HEAD")
    head = served.get(TAG, "HEAD")
    _, _, _, asked = served.upstream.manifest_stats[-1]
    asked.callback(ManifestInfo(Digest.of(MANIFEST), MANIFEST_TYPE, len(MANIFEST)))
    assert head.response()[0] == 200
    samples = served.scrape()
    assert samples[sample("blobserve_cache_requests_total", kind="blob", outcome="hit")]
    assert samples[
        sample("blobserve_cache_requests_total", kind="manifest", outcome="miss")
    ]


def test_tags_lists_and_referrers_note_their_route_and_outcome(
    served: Served,
) -> None:
    subject = Digest.of(MANIFEST)
    with LoggedEvents() as logged:
        miss, join = served.get("/v2/a/tags/list"), served.get("/v2/a/tags/list")
        served.upstream.tags_fetches[-1][3].callback(Listing(b"{}"))
        served.get("/v2/a/tags/list")
        referrers = served.get(f"/v2/a/referrers/{subject}")
        served.upstream.referrers_fetches[-1][3].callback(Listing(b'{"manifests":[]}'))
        served.get(f"/v2/a/referrers/{subject}", "HEAD")
        assert [c.response()[0] for c in (miss, join, referrers)] == [200] * 3
    assert [e["outcome"] for e in access_lines(logged)] == [
        "miss",
        "join",
        "hit",
        "miss",
        "hit",
    ]
    samples = served.scrape()
    requests = "blobserve_http_requests_total"
    assert samples[sample(requests, route="tags", method="GET", status="2xx")] == 3
    assert samples[sample(requests, route="referrers", method="HEAD", status="2xx")]
    assert samples[sample("blobserve_cache_requests_total", kind="tags", outcome="hit")]
    assert samples[
        sample("blobserve_cache_requests_total", kind="referrers", outcome="miss")
    ]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (b"/v2/a/blobs/x?ns=docker.io", "/v2/a/blobs/x?ns=docker.io"),
        (b"/v2/a/tags/list?n=10&last=b", "/v2/a/tags/list?n=10&last=b"),
        (
            b"/v2/a?token=s3cret&X-Amz-Signature=abc",
            "/v2/a?token=***&X-Amz-Signature=***",
        ),
        (b"/v2/\x1b[31m\n", "/v2/%1B%5B31m%0A"),
        (b"/v2/a?ns=x;token=s3cret", "/v2/a?ns=x&token=***"),
        (b"/v2/a?token", "/v2/a?token"),
        (b"http://u:s3cret@mirror/v2/?t=1", "http://mirror/v2/?t=***"),
        (b"/" + b"a" * 2000, "/" + "a" * 511 + "..."),
    ],
)
def test_the_logged_path_hides_secrets_and_escapes_what_is_not_printable(
    uri: bytes, shown: str
) -> None:
    exchange = Exchange(client="127.0.0.1", method="GET", uri=uri, started=0)
    assert exchange.shown_path() == shown


def test_the_metrics_page_is_rendered_at_once_in_either_format(served: Served) -> None:
    served.get("/v2/")
    status, headers, body = served.get("/metrics").response()
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert headers["cache-control"] == "no-store"
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"blobserve_http_requests", "blobserve_downloads_in_flight"} <= families
    openmetrics = served.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    ).response()
    assert openmetrics[1]["content-type"].startswith("application/openmetrics-text")
    assert openmetrics[2].endswith(b"# EOF\n")


def test_error_lines_hide_query_secrets_as_the_access_log_does(served: Served) -> None:
    with LoggedEvents() as logged:
        client = served.get(TAG + "?ns=docker.io&token=s3cret")
        _, _, _, fetched = served.upstream.manifest_fetches[-1]
        fetched.errback(OSError(28, "No space left on device"))
        assert client.response()[0] == 503
    [line] = [m for m in logged.messages() if m.startswith("storage error")]
    assert line == (
        f"storage error answering GET {TAG}?ns=docker.io&token=***:"
        " [Errno 28] No space left on device"
    )


def test_a_forwarded_range_is_counted_but_not_as_a_cache_outcome() -> None:
    metrics = Metrics()
    exchange = Exchange(
        client="127.0.0.1",
        method="GET",
        uri=BLOB.encode(),
        started=0,
        route="blob",
        outcome="forward",
        sent=51,
    )
    metrics.exchange_ended(exchange)
    text = generate_latest(metrics.registry).decode()
    assert 'blobserve_cache_requests_total{kind="blob",outcome="forward"} 1.0' in text
    assert 'blobserve_sent_bytes_total{outcome="forward"} 51.0' in text
    assert metrics.cache_counts() == {"hits": 0, "misses": 0, "joins": 0, "stale": 0}


def test_prefetches_started_are_counted() -> None:
    metrics = Metrics()
    metrics.prefetch_started()
    metrics.prefetch_started()
    text = generate_latest(metrics.registry).decode()
    assert "blobserve_prefetched_blobs_total 2.0" in text


def test_the_node_says_its_name_and_version() -> None:
    metrics = Metrics()
    metrics.identify("cache-2", "1.2.3")
    text = generate_latest(metrics.registry).decode()
    assert 'blobserve_node_info{node="cache-2",version="1.2.3"} 1.0' in text
