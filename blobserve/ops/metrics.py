"""
Prometheus metrics: what blobserve counts, and the figures it reads off its
parts when scraped.

Counting stays off the data path: a request is counted once, when it ends;
a download when it resumes, fails or ends; the bytes a download fetches and
the figures of the store and the downloads in flight are read when
Prometheus asks, not counted per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from attrs import define, field, frozen
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from blobserve.fetch.download import Download, IDownloadEvents
from blobserve.ops.access import Exchange, IExchangeObserver
from blobserve.upstream.client import IUpstreamEvents

#: The cache outcomes of a blob or manifest request that the status page
#: counts (a range forwarded from the upstream, "forward", is none of them).
OUTCOMES = ("hit", "miss", "join", "stale")

#: Seconds: from a cached answer (milliseconds) to a large cold blob
#: (minutes).
_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)


@frozen
class Figures:
    """
    What the collector reads off blobserve's parts when scraped, in the
    reactor's thread.

    @ivar downloads: the downloads in flight.
    @ivar clients: how many responses follow each download in flight, by
        its digest.
    @ivar responses: blob responses in progress.
    @ivar store: the store's figures (see L{Evictor.status}), if known.
    @ivar slots: upstream slots taken and downloads waiting for one.
    @ivar connections: client connections C{open} now, C{refused} (over
        C{--max-connections}) and C{dropped} (no complete request in time)
        since start.
    """

    downloads: list[Download]
    clients: int
    responses: int
    store: Mapping[str, int | None] | None
    slots: tuple[int, int] | None
    connections: Mapping[str, int] | None = None


@implementer(IExchangeObserver, IDownloadEvents)
@define
class Metrics:
    """
    blobserve's metrics, in a registry of their own (not the global one,
    so tests and several instances do not share counts).

    It observes requests as they end (L{IExchangeObserver}), downloads as
    they move on (L{IDownloadEvents}), and the upstreams' answers (see
    L{upstream_events}).
    """

    registry: CollectorRegistry = field(factory=CollectorRegistry)
    # Bytes fetched by downloads that have ended, by registry; those in
    # flight add theirs when scraped.
    _fetched: dict[str, int] = field(factory=dict, init=False)
    _requests: Counter = field(init=False)
    _cache: Counter = field(init=False)
    _sent: Counter = field(init=False)
    _aborted: Counter = field(init=False)
    _request_seconds: Histogram = field(init=False)
    _first_byte_seconds: Histogram = field(init=False)
    _upstream_requests: Counter = field(init=False)
    _downloads: Counter = field(init=False)
    _download_seconds: Histogram = field(init=False)
    _resumes: Counter = field(init=False)
    _digest_failures: Counter = field(init=False)
    _retries_exhausted: Counter = field(init=False)
    _prefetches: Counter = field(init=False)
    # Blob and manifest requests by cache outcome, for the status page.
    _outcomes: dict[str, int] = field(
        factory=lambda: dict.fromkeys(OUTCOMES, 0), init=False
    )
    # Label children by label values: labels() costs a lock and a lookup.
    _children: dict[tuple[Any, ...], Any] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self._requests = Counter(
            "blobserve_http_requests",
            "HTTP requests answered, by route, method and status class.",
            ["route", "method", "status"],
            registry=r,
        )
        self._cache = Counter(
            "blobserve_cache_requests",
            "Blob and manifest requests by what the cache did: hit (served"
            " from the store), miss (started a fetch), join (followed a fetch"
            " in flight), stale (served a tag's last manifest, the upstream"
            " failing).",
            ["kind", "outcome"],
            registry=r,
        )
        self._sent = Counter(
            "blobserve_sent_bytes",
            "Response body bytes sent to clients, by cache outcome (none for"
            " other responses); counted when a response ends.",
            ["outcome"],
            registry=r,
        )
        self._aborted = Counter(
            "blobserve_aborted_responses",
            "Responses that ended without their end: the client left, or"
            " blobserve cut the connection.",
            registry=r,
        )
        self._request_seconds = Histogram(
            "blobserve_http_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response, by route.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._first_byte_seconds = Histogram(
            "blobserve_blob_first_byte_seconds",
            "Seconds from a blob request's arrival to the first byte of its"
            " body, by cache outcome.",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._upstream_requests = Counter(
            "blobserve_upstream_requests",
            "Requests to upstream registries, by registry and status (error:"
            " no answer).",
            ["registry", "status"],
            registry=r,
        )
        self._downloads = Counter(
            "blobserve_downloads",
            "Blob downloads ended, by result: committed, failed, abandoned"
            " (every client left before the upstream answered), stopped"
            " (kept for the next run).",
            ["result"],
            registry=r,
        )
        self._download_seconds = Histogram(
            "blobserve_download_duration_seconds",
            "Seconds from a download's start to its end, by result.",
            ["result"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._resumes = Counter(
            "blobserve_download_resumes",
            "Downloads resumed: after a broken transfer (broken), or from the"
            " bytes an earlier run kept (restart).",
            ["cause"],
            registry=r,
        )
        self._digest_failures = Counter(
            "blobserve_digest_failures",
            "Downloads whose bytes did not match their digest.",
            registry=r,
        )
        self._retries_exhausted = Counter(
            "blobserve_download_retries_exhausted",
            "Downloads that failed after resuming as often as allowed.",
            registry=r,
        )
        self._prefetches = Counter(
            "blobserve_prefetched_blobs",
            "Downloads started by --prefetch-layers, with no client.",
            registry=r,
        )

    def watch(self, figures: Callable[[], Figures]) -> None:
        """
        Read C{figures} when scraped: the downloads in flight, the clients
        and responses, the store and the upstream slots.
        """
        self.registry.register(_Figures(figures, self._fetched))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # IExchangeObserver

    def exchange_ended(self, exchange: Exchange) -> None:
        route = exchange.route
        status = f"{exchange.status // 100}xx"
        self._child(self._requests, route, exchange.method_label, status).inc()
        outcome = exchange.outcome
        if outcome is not None:
            self._child(self._cache, route, outcome).inc()
            if outcome in self._outcomes:
                self._outcomes[outcome] += 1
        if exchange.sent:
            self._child(self._sent, outcome or "none").inc(exchange.sent)
        if exchange.aborted:
            self._aborted.inc()
        self._child(self._request_seconds, route).observe(exchange.duration)
        if exchange.first_byte is not None:
            self._child(self._first_byte_seconds, outcome or "none").observe(
                exchange.first_byte
            )

    def identify(self, node: str, version: str) -> None:
        """
        Say which node this is and which blobserve it runs, as
        C{blobserve_node_info{node=…, version=…} 1}: a cluster's series are
        told apart by it.
        """
        Info(
            "blobserve_node",
            "The node's name (--node-name) and the version it runs.",
            registry=self.registry,
        ).info({"node": node, "version": version})

    def cache_counts(self) -> dict[str, int]:
        """
        Blob and manifest requests since start by what the cache did, as
        the status page shows them: C{hits}, C{misses}, C{joins}, C{stale}.
        """
        counts = self._outcomes
        return {
            "hits": counts["hit"],
            "misses": counts["miss"],
            "joins": counts["join"],
            "stale": counts["stale"],
        }

    # IDownloadEvents

    def resumed(self, download: Download, cause: str) -> None:
        self._child(self._resumes, cause).inc()

    def digest_failed(self, download: Download) -> None:
        self._digest_failures.inc()

    def retries_exhausted(self, download: Download) -> None:
        self._retries_exhausted.inc()

    def prefetch_started(self) -> None:
        """
        A download of a manifest's blob started with no client
        (C{--prefetch-layers}).
        """
        self._prefetches.inc()

    def ended(self, download: Download, result: str, seconds: float) -> None:
        self._child(self._downloads, result).inc()
        self._child(self._download_seconds, result).observe(seconds)
        registry = download.registry or ""
        self._fetched[registry] = self._fetched.get(registry, 0) + download.fetched

    def upstream_events(self, registry: str) -> IUpstreamEvents:
        """
        What counts the answers of the upstream C{registry}.
        """
        return _UpstreamCounts(self, registry)

    def upstream_answered(self, registry: str, status: int | None) -> None:
        label = "error" if status is None else str(status)
        self._child(self._upstream_requests, registry, label).inc()


@implementer(IUpstreamEvents)
@frozen
class _UpstreamCounts:
    metrics: Metrics
    registry: str

    def answered(self, status: int | None) -> None:
        self.metrics.upstream_answered(self.registry, status)


class MetricsPage(Resource):
    """
    C{/metrics}: the metrics in Prometheus's text format, or OpenMetrics
    when the scraper asks for it.

    It renders in the reactor's thread, where everything it reads lives
    (a few hundred series take well under a millisecond).
    prometheus_client's own C{MetricsResource} renders in the reactor's
    thread pool instead: its collectors would read blobserve's state from
    another thread, and a scrape under way when the reactor stops waits for
    the reactor forever, and the reactor, joining its pool, for the scrape.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encode, content_type = choose_encoder(
            "" if accept is None else accept.decode("latin-1")
        )
        body = encode(self._registry)
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"Cache-Control", b"no-store")
        return body


#: Figures of the store that are gauges, and their help.
_STORE_GAUGES = {
    "size": ("blobserve_store_bytes", "Bytes of blobs in the store."),
    "max_size": ("blobserve_store_limit_bytes", "The store's --max-size."),
    "min_free": (
        "blobserve_store_min_free_bytes",
        "The free space --min-free keeps on the store's file system.",
    ),
    "free": (
        "blobserve_store_free_bytes",
        "Free bytes on the store's file system.",
    ),
    "blobs": ("blobserve_store_blobs", "Blobs in the store."),
    "reserved": (
        "blobserve_store_reserved_bytes",
        "Bytes held in the store for downloads in flight.",
    ),
}

#: Figures of the store that are counters.
_STORE_COUNTERS = {
    "evictions": ("blobserve_store_evictions", "Blobs evicted since start."),
    "evicted_bytes": (
        "blobserve_store_evicted_bytes",
        "Bytes of blobs evicted since start.",
    ),
}


class _Figures(Collector):
    """
    The metrics read off blobserve's parts at each scrape.
    """

    def __init__(
        self, figures: Callable[[], Figures], fetched: Mapping[str, int]
    ) -> None:
        self._figures = figures
        self._fetched = fetched

    def describe(self) -> list[Any]:
        # Names only: registering must not read figures (the registry asks
        # for a description to check names against the other metrics).
        return list(self._families(_NO_FIGURES, {}))

    def collect(self) -> Iterable[Any]:
        # In the reactor's thread (see MetricsPage), like what changes them:
        # the figures and the bytes of the downloads that have ended are
        # read in the same turn.
        return list(self._families(self._figures(), self._fetched))

    def _families(self, figures: Figures, ended: Mapping[str, int]) -> Iterator[Any]:
        fetched = dict(ended)
        for download in figures.downloads:
            registry = download.registry or ""
            fetched[registry] = fetched.get(registry, 0) + download.fetched
        upstream = CounterMetricFamily(
            "blobserve_upstream_received_bytes",
            "Blob bytes received from upstream registries, by registry.",
            labels=["registry"],
        )
        for registry, count in sorted(fetched.items()):
            upstream.add_metric([registry], count)
        yield upstream
        yield GaugeMetricFamily(
            "blobserve_downloads_in_flight",
            "Blob downloads running now.",
            value=len(figures.downloads),
        )
        yield GaugeMetricFamily(
            "blobserve_download_clients",
            "Responses following a download in flight.",
            value=figures.clients,
        )
        yield GaugeMetricFamily(
            "blobserve_blob_responses_in_progress",
            "Blob responses being sent now.",
            value=figures.responses,
        )
        if figures.slots is not None:
            taken, waiting = figures.slots
            yield GaugeMetricFamily(
                "blobserve_upstream_slots_taken",
                "Upstream slots held by downloads (--upstream-concurrency).",
                value=taken,
            )
            yield GaugeMetricFamily(
                "blobserve_upstream_slots_waiting",
                "Downloads waiting for an upstream slot (--upstream-queue).",
                value=waiting,
            )
        connections = figures.connections
        if connections is not None:
            yield GaugeMetricFamily(
                "blobserve_connections_open",
                "Client connections open now.",
                value=connections["open"],
            )
            yield CounterMetricFamily(
                "blobserve_connections_refused",
                "Client connections refused at once, over --max-connections.",
                value=connections["refused"],
            )
            yield CounterMetricFamily(
                "blobserve_connections_dropped",
                "Client connections dropped because no complete request came"
                " within --client-timeout of its first byte.",
                value=connections["dropped"],
            )
        store = figures.store
        if store is None:
            return
        for key, (name, text) in _STORE_GAUGES.items():
            value = store.get(key)
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        for key, (name, text) in _STORE_COUNTERS.items():
            value = store.get(key)
            if value is not None:
                yield CounterMetricFamily(name, text, value=value)


#: What describe() reports: every family that a scrape may yield.
_NO_FIGURES = Figures(
    [],
    0,
    0,
    dict.fromkeys([*_STORE_GAUGES, *_STORE_COUNTERS], 0),
    (0, 0),
    {"open": 0, "refused": 0, "dropped": 0},
)
