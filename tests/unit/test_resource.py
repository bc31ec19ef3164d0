"""
The registry resource with the real table, download, writer, producer and
store, an upstream double and in-memory connections.
"""

import errno
import json
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from attrs import define
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import IResource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from blobserve.digest import Digest
from blobserve.fetch.download import Download, Landing
from blobserve.fetch.inflight import InFlightTable
from blobserve.fetch.layers import LayerPrefetcher
from blobserve.fetch.progress import ProgressSampler
from blobserve.fetch.slots import UpstreamSlots
from blobserve.store.eviction import Evictor
from blobserve.store.files import DirectoryBlobStore
from blobserve.store.index import Origin
from blobserve.store.layout import index_path
from blobserve.upstream.client import (
    BlobInfo,
    BlobUnknown,
    ManifestInfo,
    RegistryUpstream,
    RepositoryUnknown,
    UpstreamError,
    UpstreamRefused,
    Upstreams,
)
from blobserve.web import resource as resource_module
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache
from blobserve.web.resource import RegistryResource
from blobserve.web.root import site_root
from blobserve.web.status import StatusResource

from fakes import (
    Connection,
    ControlledAgent,
    FakeResponse,
    FakeUpstream,
    LoggedEvents,
    commit_blob,
    connect,
    open_descriptors,
    result_of,
    store_at,
)

DATA = bytes(range(256)) * 400
DIGEST = Digest.of(DATA)
BLOB = f"/v2/library/busybox/blobs/{DIGEST}"


@define
class Registry:
    store: DirectoryBlobStore
    upstream: FakeUpstream
    other: FakeUpstream
    table: InFlightTable
    resource: RegistryResource
    root: Path
    #: What the site serves: the registry and the operator's pages.
    served: IResource
    #: Told of the manifests served, with C{prefetch_layers}.
    layers: LayerPrefetcher | None = None

    def get(
        self,
        path: str = BLOB,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> Connection:
        connection = connect(self.served)
        connection.request(method, path, headers)
        return connection

    def answer(self, index: int = -1, length: int | None = len(DATA)) -> FakeResponse:
        """
        Make the upstream answer a fetch with a 200 whose body the test sends.
        """
        response = FakeResponse(length=UNKNOWN_LENGTH if length is None else length)
        self.upstream.fetches[index][2].callback(response)
        return response

    def committed(self, digest: Digest = DIGEST) -> bool:
        return Path(self.store.path_for(digest)).exists()

    def temporaries(self) -> list[Path]:
        return list((self.root / "tmp").iterdir())


def registry_for(
    tmp_path: Path,
    clock: Clock,
    store_size: int | None = None,
    cache: Callable[[], dict[str, int]] | None = None,
    run_blocking: Callable[..., Deferred[Any]] | None = None,
    prefetch_layers: bool = False,
    **download: Any,
) -> Registry:
    """
    A registry whose downloads get the options in C{download} (and which
    prefetches layers, with C{prefetch_layers}); with
    C{store_size}, its store has an evictor with that limit, and its status
    page says so; its status page shows the counts C{cache} gives, and the
    store's blocking work goes to C{run_blocking}.
    """
    store = store_at(str(tmp_path), run_blocking)
    upstream = FakeUpstream()
    other = FakeUpstream()
    evictor = None if store_size is None else Evictor(store, store_size)
    if evictor is not None:
        download["evictor"] = evictor
    table = InFlightTable(partial(Download, store=store, clock=clock, **download))
    upstreams = Upstreams({"docker.io": upstream, "ghcr.io": other}, "docker.io")
    manifests = ManifestCache(store, clock, ttl=60)
    layers = None
    if prefetch_layers:
        layers = LayerPrefetcher(
            store,
            table,
            slots=download.get("slots"),
            max_size=download.get("max_size"),
        )
    resource = RegistryResource(
        store,
        table,
        manifests,
        upstreams,
        listings=ListingCache(clock, ttl=60),
        layers=layers,
    )
    status = StatusResource(
        store,
        table,
        resource.responses_in_progress,
        store_status=None if evictor is None else evictor.status,
        progress=ProgressSampler(table, clock, resource.following),
        slots=download.get("slots"),
        cache=cache,
    )
    served = site_root(resource, {b"status": status})
    return Registry(store, upstream, other, table, resource, tmp_path, served, layers)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return registry_for(tmp_path, Clock())


def error_code(connection: Connection) -> tuple[int, str]:
    status, headers, body = connection.response()
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)["errors"][0]["code"]


def test_base_endpoint_says_registry_v2(registry: Registry) -> None:
    status, headers, body = registry.get("/v2/").response()
    assert status == 200
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    assert json.loads(body) == {}


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Library/busybox/blobs/" + str(DIGEST), 400, "NAME_INVALID"),
        ("/v2/a/../b/blobs/" + str(DIGEST), 400, "NAME_INVALID"),
        ("/v2/a%2f..%2fb/blobs/" + str(DIGEST), 400, "NAME_INVALID"),
        (
            "/v2/busybox/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/busybox/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/busybox/blobs/sha512:" + "0" * 64, 400, "DIGEST_INVALID"),
        ("/v2/busybox/tags/list/x", 404, "UNSUPPORTED"),
        ("/v2/x/unknown/y", 404, "UNSUPPORTED"),
        # Neither a tag nor a digest: no such manifest, as the spec's
        # conformance suite expects of ".INVALID_MANIFEST_NAME".
        ("/v2/busybox/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("/v2/busybox/manifests/.hidden", 404, "MANIFEST_UNKNOWN"),
        ("/v2/busybox/manifests/md5:abc", 404, "MANIFEST_UNKNOWN"),
        ("/v2/busybox/manifests/sha256:baddigeststring", 404, "MANIFEST_UNKNOWN"),
        ("/v2/busybox/manifests/" + "a" * 129, 404, "MANIFEST_UNKNOWN"),
        ("/v2/Busybox/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/Busybox/manifests/.hidden", 400, "NAME_INVALID"),
        ("/etc/passwd", 404, "UNSUPPORTED"),
        ("/_blobserve/nothing", 404, "UNSUPPORTED"),
        ("/_blobserve/", 404, "UNSUPPORTED"),
    ],
)
def test_bad_requests_get_oci_errors_and_never_reach_upstream(
    registry: Registry, path: str, status: int, code: str
) -> None:
    assert error_code(registry.get(path)) == (status, code)
    head = registry.get(path, "HEAD").response()
    assert (head[0], head[2]) == (status, b"")
    assert registry.upstream.fetches == []
    assert registry.upstream.stats == []
    assert registry.upstream.manifest_fetches == []
    assert registry.upstream.manifest_stats == []


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
def test_write_methods_are_unsupported(registry: Registry, method: str) -> None:
    assert error_code(registry.get(BLOB, method)) == (405, "UNSUPPORTED")


def test_concurrent_misses_fetch_once_and_stream_to_all(registry: Registry) -> None:
    clients = [registry.get() for _ in range(3)]
    assert len(registry.upstream.fetches) == 1
    name, digest, _ = registry.upstream.fetches[0]
    assert (name, digest) == ("library/busybox", DIGEST)
    assert all(client.transport.value() == b"" for client in clients)

    response = registry.answer()
    # Headers go out as soon as the upstream has answered, before any byte.
    for client in clients:
        status, headers, body = client.response()
        assert status == 200
        assert headers["content-length"] == str(len(DATA))
        assert headers["docker-content-digest"] == str(DIGEST)
        assert headers["content-type"] == "application/octet-stream"
        assert body == b""

    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:40000])
    late = registry.get()
    assert len(registry.upstream.fetches) == 1
    # The late joiner catches up from disk at once.
    assert late.response()[2] == DATA[:40000]
    response.protocol.dataReceived(DATA[40000:])
    response.protocol.connectionLost(Failure(ResponseDone()))

    for client in [*clients, late]:
        assert client.response()[2] == DATA
        assert not client.transport.aborted
    assert registry.committed()
    assert registry.temporaries() == []
    assert len(registry.table) == 0


def test_unknown_length_is_streamed_chunked(registry: Registry) -> None:
    client = registry.get()
    response = registry.answer(length=None)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    _status, headers, body = client.response()
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"
    assert body.endswith(b"\r\n0\r\n\r\n")
    assert registry.committed()


def test_client_leaving_does_not_stop_the_download(registry: Registry) -> None:
    early = registry.get()
    response = registry.answer()
    early.disconnect()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    halfway = registry.get()
    halfway.disconnect()
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert response.transport.producerState == "producing"
    assert registry.committed()


def test_download_every_client_left_before_the_answer_is_abandoned(
    registry: Registry,
) -> None:
    first, second = registry.get(), registry.get()
    first.disconnect()
    assert registry.upstream.cancelled == []
    assert len(registry.table) == 1
    second.disconnect()
    # The upstream request is cancelled and the download leaves the table.
    assert registry.upstream.cancelled == [DIGEST]
    assert len(registry.table) == 0
    assert registry.temporaries() == []
    # The next client starts afresh.
    registry.get()
    assert len(registry.upstream.fetches) == 2


def test_corrupt_blob_is_never_committed_and_clients_are_cut_off(
    registry: Registry,
) -> None:
    clients = [registry.get(), registry.get()]
    response = registry.answer()
    assert response.protocol is not None
    corrupt = bytearray(DATA)
    corrupt[5] ^= 0xFF
    response.protocol.dataReceived(bytes(corrupt))
    response.protocol.connectionLost(Failure(ResponseDone()))

    for client in clients:
        assert client.transport.aborted
        assert len(client.response()[2]) < len(DATA)
    assert not registry.committed()
    assert registry.temporaries() == []
    assert len(registry.table) == 0

    # The next request starts afresh.
    retry = registry.get()
    assert len(registry.upstream.fetches) == 2
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert retry.response()[2] == DATA
    assert registry.committed()


@pytest.mark.parametrize(
    ("reason", "status", "code"),
    [
        (BlobUnknown("no such blob"), 404, "BLOB_UNKNOWN"),
        (UpstreamError("upstream answered 503"), 502, "UNKNOWN"),
        (UpstreamError("unreachable: connection refused"), 502, "UNKNOWN"),
    ],
)
def test_upstream_failure_before_headers_is_an_oci_error(
    registry: Registry, reason: Exception, status: int, code: str
) -> None:
    client = registry.get()
    registry.upstream.fetches[0][2].errback(Failure(reason))
    assert error_code(client) == (status, code)
    assert len(registry.table) == 0
    registry.get()
    assert len(registry.upstream.fetches) == 2


def test_unexpected_failure_is_a_500_without_details(registry: Registry) -> None:
    client = registry.get()
    registry.upstream.fetches[0][2].errback(Failure(ConnectionRefusedError()))
    assert error_code(client) == (500, "UNKNOWN")
    assert b"Traceback" not in client.response()[2]
    assert b"Connection" not in client.response()[2]


def test_store_that_cannot_create_files_answers_503(registry: Registry) -> None:
    (registry.root / "tmp").rmdir()
    client = registry.get()
    response = registry.answer()
    assert error_code(client) == (503, "UNAVAILABLE")
    assert response.transport.producerState == "stopped"
    assert len(registry.table) == 0


def commit(registry: Registry) -> None:
    """
    Store the blob as if it had been fetched for the repository the tests
    ask for it in.
    """
    commit_blob(registry.store, DATA)
    registry.store.saw("docker.io", "library/busybox", DIGEST)


def test_hit_is_served_from_store_without_upstream(registry: Registry) -> None:
    commit(registry)
    status, headers, body = registry.get().response()
    assert (status, body) == (200, DATA)
    assert headers["content-length"] == str(len(DATA))
    assert headers["docker-content-digest"] == str(DIGEST)
    assert headers["content-type"] == "application/octet-stream"
    assert headers["etag"] == f'"{DIGEST}"'
    assert registry.upstream.fetches == []
    assert registry.upstream.stats == []


def test_head_of_hit_answers_from_store(registry: Registry) -> None:
    commit(registry)
    status, headers, body = registry.get(method="HEAD").response()
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(DATA))
    assert headers["docker-content-digest"] == str(DIGEST)
    assert registry.upstream.stats == []


def test_head_of_miss_asks_upstream_and_never_downloads(registry: Registry) -> None:
    registry.upstream.size = 1234
    status, headers, body = registry.get(method="HEAD").response()
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "1234"
    assert headers["docker-content-digest"] == str(DIGEST)
    assert registry.upstream.stats == [("library/busybox", DIGEST)]
    assert registry.upstream.fetches == []
    assert len(registry.table) == 0


def test_blob_answers_say_whether_the_cache_held_them(registry: Registry) -> None:
    first, joiner = registry.get(), registry.get()
    head = registry.get(method="HEAD")
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert first.response()[1]["x-blobserve-cache"] == "miss"
    assert joiner.response()[1]["x-blobserve-cache"] == "join"
    assert head.response()[1]["x-blobserve-cache"] == "miss"
    for method in ("GET", "HEAD"):
        status, headers, _ = registry.get(method=method).response()
        assert (status, headers["x-blobserve-cache"]) == (200, "hit")


def test_client_leaving_during_head_is_left_alone(registry: Registry) -> None:
    # Unlike RegistryUpstream, this upstream reports a cancelled request as an
    # upstream error rather than as a cancellation.
    pending: Deferred[BlobInfo] = Deferred(
        lambda d: d.errback(UpstreamError("no answer"))
    )
    registry.upstream.stat_answer = pending
    client = registry.get(method="HEAD")
    client.disconnect()
    assert client.transport.value() == b""
    errors: list[Failure] = []
    pending.addErrback(errors.append)
    assert errors == []


def test_range_of_stored_blob(registry: Registry) -> None:
    commit(registry)
    client = registry.get(headers={"Range": "bytes=1000-1999"})
    status, headers, body = client.response()
    assert (status, body) == (206, DATA[1000:2000])
    assert headers["content-range"] == f"bytes 1000-1999/{len(DATA)}"
    assert headers["content-length"] == "1000"
    assert headers["accept-ranges"] == "bytes"


def test_suffix_range_of_stored_blob(registry: Registry) -> None:
    commit(registry)
    status, _, body = registry.get(headers={"Range": "bytes=-10"}).response()
    assert (status, body) == (206, DATA[-10:])


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", "bytes=9-3", "bytes=x"])
def test_unsatisfiable_range_is_416_with_the_length_and_no_body(
    registry: Registry, header: str
) -> None:
    commit(registry)
    client = registry.get(headers={"Range": header})
    status, headers, body = client.response()
    assert (status, body) == (416, b"")
    assert headers["content-range"] == f"bytes */{len(DATA)}"
    assert headers["content-length"] == "0"
    assert "content-type" not in headers


def test_range_of_blob_in_flight_waits_for_its_bytes(registry: Registry) -> None:
    first = registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    ranged = registry.get(headers={"Range": "bytes=50000-50999"})
    status, headers, body = ranged.response()
    assert (status, body) == (206, b"")
    assert headers["content-range"] == f"bytes 50000-50999/{len(DATA)}"

    response.protocol.dataReceived(DATA[1000:50500])
    assert ranged.response()[2] == DATA[50000:50500]
    # The whole range as soon as it is on disk, before the blob is verified.
    response.protocol.dataReceived(DATA[50500:60000])
    assert ranged.response()[2] == DATA[50000:51000]
    response.protocol.dataReceived(DATA[60000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert not ranged.transport.aborted
    assert first.response()[2] == DATA
    assert len(registry.upstream.fetches) == 1


def test_range_is_not_held_back_for_verification(registry: Registry) -> None:
    # A client of a range cannot verify it: the range is sent whole as soon
    # as it is on disk, even of a blob that then fails verification; the
    # full body is cut off.
    ranged = registry.get(headers={"Range": "bytes=0-99"})
    whole = registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(b"\0" * len(DATA))
    assert ranged.response()[2] == b"\0" * 100
    assert whole.response()[2] == b"\0" * (len(DATA) - 1)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert not ranged.transport.aborted
    assert whole.transport.aborted


def test_ns_routes_to_that_registrys_upstream(registry: Registry) -> None:
    registry.get(f"{BLOB}?ns=ghcr.io")
    registry.get(f"{BLOB}?ns=ghcr.io", method="HEAD")
    assert len(registry.other.fetches) == 1
    assert len(registry.other.stats) == 1
    assert registry.upstream.fetches == []
    assert registry.upstream.stats == []


def test_no_ns_routes_to_the_default_upstream(registry: Registry) -> None:
    registry.get(f"{BLOB}?other=1")
    assert len(registry.upstream.fetches) == 1
    assert registry.other.fetches == []


def test_unknown_ns_is_name_unknown(registry: Registry) -> None:
    assert error_code(registry.get(f"{BLOB}?ns=quay.io")) == (404, "NAME_UNKNOWN")
    assert registry.upstream.fetches == registry.other.fetches == []


def status(registry: Registry) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        registry.get("/_blobserve/status").response()[2]
    )
    return result


def running(registry: Registry) -> dict[str, int]:
    """
    What the status says runs now.
    """
    result = status(registry)
    return {key: result[key] for key in ("downloads", "observers", "responses")}


def test_status_counts_what_runs_and_ends_at_zero(registry: Registry) -> None:
    assert running(registry) == {"downloads": 0, "observers": 0, "responses": 0}
    clients = [registry.get() for _ in range(3)]
    response = registry.answer()
    assert response.protocol is not None
    assert running(registry) == {"downloads": 1, "observers": 3, "responses": 3}
    response.protocol.dataReceived(DATA[:1000])
    clients[0].disconnect()
    assert running(registry) == {"downloads": 1, "observers": 2, "responses": 2}
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert running(registry) == {"downloads": 0, "observers": 0, "responses": 0}


def test_status_counts_unfinished_downloads_and_their_bytes(
    registry: Registry,
) -> None:
    assert status(registry)["partials"] == {"count": 0, "bytes": 0}
    # One kept from an earlier run, and one running.
    kept = Digest.of(b"kept")
    temporary = registry.store.create_temporary(kept, Origin("docker.io", "x", 10))
    temporary.write(b"kept")
    registry.store.keep_partial(temporary)
    registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    assert status(registry)["partials"] == {"count": 2, "bytes": 1004}
    response.protocol.dataReceived(DATA[1000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert status(registry)["partials"] == {"count": 1, "bytes": 4}


def test_status_says_what_the_store_holds(tmp_path: Path) -> None:
    registry = registry_for(tmp_path, Clock(), store_size=10 * len(DATA))
    commit_blob(registry.store, DATA)
    result: dict[str, Any] = json.loads(
        registry.get("/_blobserve/status").response()[2]
    )
    store = result.pop("store")
    assert result == {
        "downloads": 0,
        "observers": 0,
        "responses": 0,
        "partials": {"count": 0, "bytes": 0},
        "in_flight": [],
    }
    assert store["size"] == len(DATA)
    assert store["max_size"] == 10 * len(DATA)
    assert store["min_free"] is None
    assert store["blobs"] == 1
    assert store["evictions"] == store["evicted_bytes"] == 0


def test_a_blob_the_store_has_no_room_for_is_a_507(tmp_path: Path) -> None:
    registry = registry_for(tmp_path, Clock(), store_size=len(DATA) - 1)
    client = registry.get()
    response = registry.answer()
    status, _, body = client.response()
    assert (status, json.loads(body)["errors"][0]["code"]) == (507, "UNAVAILABLE")
    assert "no room for a blob of" in json.loads(body)["errors"][0]["message"]
    assert response.transport.producerState == "stopped"
    assert registry.temporaries() == []
    assert not registry.committed()


HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("header", "status"),
    [(f"bytes=0-{HUGE}", 206), (f"bytes={HUGE}-", 416), (f"bytes=-{HUGE}", 206)],
)
def test_range_of_thousands_of_digits_on_a_hit_is_answered(
    registry: Registry, header: str, status: int
) -> None:
    commit_blob(registry.store, DATA)
    before = open_descriptors(registry.root)
    client = registry.get(headers={"Range": header})
    answer, _headers, body = client.response()
    assert answer == status
    if status == 206:
        assert body == DATA
    assert not client.transport.aborted
    assert open_descriptors(registry.root) == before


def test_range_of_thousands_of_digits_on_a_miss_is_answered_and_leaks_nothing(
    registry: Registry,
) -> None:
    before = open_descriptors(registry.root)
    client = registry.get(headers={"Range": f"bytes={HUGE}-"})
    response = registry.answer()
    assert response.protocol is not None
    assert client.response()[0] == 416
    assert client.response()[1]["content-range"] == f"bytes */{len(DATA)}"
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert registry.committed()
    assert open_descriptors(registry.root) == before


def test_reader_is_closed_when_a_response_fails_before_it_starts(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit_blob(registry.store, DATA)

    def broken(*args: object) -> None:
        raise RuntimeError("a new way to fail")

    monkeypatch.setattr(resource_module, "_blob_headers", broken)
    before = open_descriptors(registry.root)
    client = registry.get()
    assert error_code(client) == (500, "UNKNOWN")
    assert open_descriptors(registry.root) == before


def test_error_while_following_a_download_reaches_the_client(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Landing) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(Landing, "open_reader", broken)
    client = registry.get()
    with LoggedEvents() as logged:
        registry.answer()
    assert error_code(client) == (503, "UNAVAILABLE")
    # The store's failure, not a bug: one line, without a traceback.
    assert logged.messages() == [
        f"storage error answering GET {BLOB}: [Errno 24] Too many open files"
    ]
    assert logged.failures() == []


def test_client_arriving_after_a_failure_starts_afresh(registry: Registry) -> None:
    first = registry.get()
    response = registry.answer()
    assert response.protocol is not None
    # More than the declared length: the download fails while the upstream
    # connection is still open.
    response.protocol.dataReceived(DATA + b"!")
    assert first.transport.aborted
    assert len(registry.table) == 0
    late = registry.get()
    assert len(registry.upstream.fetches) == 2
    retry = registry.answer()
    assert retry.protocol is not None
    retry.protocol.dataReceived(DATA)
    retry.protocol.connectionLost(Failure(ResponseDone()))
    assert late.response()[:1] == (200,)
    assert late.response()[2] == DATA
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert registry.committed()


def test_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    clock = Clock()
    slots = UpstreamSlots(1, queue_limit=1, wait=30, clock=clock)
    registry = registry_for(tmp_path, clock, slots=slots)
    running = registry.get(f"/v2/a/blobs/{Digest.of(b'a')}")
    queued = registry.get(f"/v2/a/blobs/{Digest.of(b'b')}")
    refused = registry.get(f"/v2/a/blobs/{Digest.of(b'c')}")
    assert error_code(refused) == (503, "TOOMANYREQUESTS")
    assert refused.response()[1]["retry-after"] == "30"
    assert len(registry.upstream.fetches) == 1
    assert slots.waiting == 1
    # Waiting longer than allowed for a slot is answered the same way.
    clock.advance(30)
    assert error_code(queued) == (503, "TOOMANYREQUESTS")
    assert slots.waiting == 0
    assert len(registry.table) == 1
    assert running.transport.value() == b""


def test_queued_download_whose_clients_all_left_leaves_the_queue(
    tmp_path: Path,
) -> None:
    clock = Clock()
    slots = UpstreamSlots(1, queue_limit=4, wait=30, clock=clock)
    registry = registry_for(tmp_path, clock, slots=slots)
    running = registry.get()
    queued = [registry.get(f"/v2/a/blobs/{Digest.of(b'b')}") for _ in range(2)]
    assert slots.waiting == 1
    for client in queued:
        client.disconnect()
    assert slots.waiting == 0
    assert len(registry.table) == 1
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert running.response()[2] == DATA
    # The slot is free, and nothing asks the upstream for the abandoned blob.
    assert slots.taken == 0
    assert len(registry.upstream.fetches) == 1


def test_blob_declared_over_the_size_limit_is_refused_before_any_write(
    tmp_path: Path,
) -> None:
    registry = registry_for(tmp_path, Clock(), max_size=len(DATA) - 1)
    client = registry.get()
    response = registry.answer()
    assert error_code(client) == (403, "DENIED")
    assert response.transport.producerState == "stopped"
    assert registry.temporaries() == []
    assert len(registry.table) == 0


def test_body_without_length_past_the_size_limit_is_cut_off_and_discarded(
    tmp_path: Path,
) -> None:
    registry = registry_for(tmp_path, Clock(), max_size=len(DATA) - 1)
    client = registry.get()
    response = registry.answer(length=None)
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    assert len(registry.temporaries()) == 1
    response.protocol.dataReceived(DATA[1000:])
    assert response.transport.producerState == "stopped"
    assert client.transport.aborted
    assert registry.temporaries() == []
    assert not registry.committed()


MANIFEST = b'{"schemaVersion": 2, "layers": []}'
MANIFEST_DIGEST = Digest.of(MANIFEST)
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TAG_PATH = "/v2/library/busybox/manifests/latest"


def fail_get_manifest(registry: Registry, reason: Exception) -> Connection:
    client = registry.get(TAG_PATH)
    registry.upstream.manifest_fetches[0][3].errback(Failure(reason))
    return client


def fail_head_manifest(registry: Registry, reason: Exception) -> Connection:
    client = registry.get(TAG_PATH, "HEAD")
    registry.upstream.manifest_stats[0][3].errback(Failure(reason))
    return client


def fail_get_blob(registry: Registry, reason: Exception) -> Connection:
    client = registry.get()
    registry.upstream.fetches[0][2].errback(Failure(reason))
    return client


def fail_head_blob(registry: Registry, reason: Exception) -> Connection:
    registry.upstream.stat_answer = fail(reason)
    return registry.get(method="HEAD")


@pytest.mark.parametrize(
    "ask", [fail_get_manifest, fail_head_manifest, fail_get_blob, fail_head_blob]
)
@pytest.mark.parametrize(
    ("reason", "status", "code"),
    [
        (
            UpstreamRefused(401, "the upstream registry refused access (401)"),
            401,
            "UNAUTHORIZED",
        ),
        (
            UpstreamRefused(403, "the upstream registry denied access (403)"),
            403,
            "DENIED",
        ),
        (UpstreamRefused(429, "rate-limiting (429)", "120"), 429, "TOOMANYREQUESTS"),
        (UpstreamRefused(429, "rate-limiting (429)"), 429, "TOOMANYREQUESTS"),
        (RepositoryUnknown("repository unknown (404)"), 404, "NAME_UNKNOWN"),
        (UpstreamError("the upstream registry answered 503"), 502, "UNKNOWN"),
        (UpstreamError("upstream unreachable: refused"), 502, "UNKNOWN"),
    ],
)
def test_upstream_answers_keep_their_meaning(
    registry: Registry,
    ask: Callable[[Registry, Exception], Connection],
    reason: Exception,
    status: int,
    code: str,
) -> None:
    client = ask(registry, reason)
    answered, headers, body = client.response()
    assert answered == status
    if ask in (fail_get_manifest, fail_get_blob):
        assert error_code(client) == (status, code)
        if isinstance(reason, UpstreamRefused):
            assert json.loads(body)["errors"][0]["message"] == str(reason)
    else:
        assert body == b""
    # Never the upstream's challenge: its realm is no business of a client.
    assert "www-authenticate" not in headers
    retry_after = getattr(reason, "retry_after", None)
    assert headers.get("retry-after") == retry_after


@define
class Mirror:
    """
    The resource in front of a real RegistryUpstream whose HTTP requests the
    test answers.
    """

    agent: ControlledAgent
    clock: Clock
    manifests: ManifestCache
    resource: RegistryResource

    def get(self, path: str = TAG_PATH, method: str = "GET") -> Connection:
        connection = connect(self.resource)
        connection.request(method, path)
        return connection

    def answer(self) -> None:
        """
        Answer the last upstream request with the manifest.
        """
        headers = Headers(
            {
                b"Content-Type": [MANIFEST_TYPE.encode()],
                b"Docker-Content-Digest": [str(MANIFEST_DIGEST).encode()],
            }
        )
        response = FakeResponse(headers=headers, length=len(MANIFEST))
        method, _, _, d = self.agent.requests[-1]
        d.callback(response)
        if method == b"GET":
            assert response.protocol is not None
            response.protocol.dataReceived(MANIFEST)
            response.protocol.connectionLost(Failure(ResponseDone()))


@pytest.fixture
def mirror(tmp_path: Path) -> Mirror:
    store = store_at(str(tmp_path))
    clock = Clock()
    agent = ControlledAgent()
    upstream = RegistryUpstream("http://registry.test", HTTPClient(agent), clock)
    manifests = ManifestCache(store, clock, ttl=60)
    table = InFlightTable(partial(Download, store=store, clock=clock))
    upstreams = Upstreams({"docker.io": upstream}, "docker.io")
    resource = RegistryResource(store, table, manifests, upstreams, clock=clock)
    return Mirror(agent, clock, manifests, resource)


def known_then_stale(mirror: Mirror) -> None:
    """
    Resolve the tag once, then let its TTL pass.
    """
    client = mirror.get()
    mirror.answer()
    assert client.response()[2] == MANIFEST
    mirror.clock.advance(61)


@pytest.mark.parametrize(
    "path",
    [
        TAG_PATH,
        f"/v2/library/busybox/manifests/{Digest.of(b'x')}",
        f"/v2/library/busybox/blobs/{DIGEST}",
    ],
)
def test_client_leaving_a_head_is_no_upstream_failure(
    mirror: Mirror, path: str
) -> None:
    known_then_stale(mirror)
    tags = dict(mirror.manifests._tags)
    with LoggedEvents() as logged:
        client = mirror.get(path, "HEAD")
        asked = mirror.agent.requests[-1][:2]
        assert asked == (b"HEAD", f"http://registry.test{path}".encode())
        client.disconnect()
        # The upstream request is stopped; nothing is served stale or written
        # to the gone client; the tag's record is untouched; nothing logged.
        assert mirror.agent.cancelled == [asked[1]]
        assert client.transport.value() == b""
        assert mirror.manifests._tags == tags
        assert logged.failures() == []
        assert not [m for m in logged.messages() if "from the cache" in m]


def test_client_leaving_a_shared_tag_revalidation_leaves_it_to_the_others(
    mirror: Mirror,
) -> None:
    known_then_stale(mirror)
    with LoggedEvents() as logged:
        leaving, staying = mirror.get(), mirror.get()
        # One upstream HEAD revalidates the tag for both.
        assert [r[0] for r in mirror.agent.requests] == [b"GET", b"HEAD"]
        leaving.disconnect()
        assert mirror.agent.cancelled == []
        mirror.answer()
        status, _, body = staying.response()
        assert (status, body) == (200, MANIFEST)
        assert leaving.transport.value() == b""
        assert logged.failures() == []


class AnsweringOnCancel(FakeUpstream):
    """
    An upstream that, asked to stop, answers anyway.
    """

    def stat_manifest(
        self, name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[ManifestInfo]:
        info = ManifestInfo(MANIFEST_DIGEST, MANIFEST_TYPE, len(MANIFEST))
        return Deferred(lambda d: d.callback(info))

    def stat_blob(self, name: str, digest: Digest) -> Deferred[BlobInfo]:
        return Deferred(lambda d: d.callback(BlobInfo(5)))


@pytest.mark.parametrize(
    "path", [f"/v2/x/manifests/{MANIFEST_DIGEST}", f"/v2/x/blobs/{DIGEST}"]
)
def test_nothing_is_written_to_a_request_whose_client_has_gone(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(str(tmp_path))
    upstreams = Upstreams({"docker.io": AnsweringOnCancel()}, "docker.io")
    manifests = ManifestCache(store, Clock(), ttl=60)
    table = InFlightTable(partial(Download, store=store, clock=Clock()))
    resource = RegistryResource(store, table, manifests, upstreams)
    errors: list[Failure] = []
    monkeypatch.setattr(
        resource_module, "_finish_with_error", lambda _, reason: errors.append(reason)
    )
    with LoggedEvents() as logged:
        client = connect(resource)
        client.request("HEAD", path)
        client.disconnect()
        assert client.transport.value() == b""
        assert logged.failures() == []
    # The answer came and was dropped: it did not try to write, and fail.
    assert errors == []


def test_a_joiner_in_the_turn_a_download_ends_starts_afresh(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, lambda f, *a: fail(OSError(errno.EIO, "EIO")))
    upstream = FakeUpstream()
    slots = UpstreamSlots(1, queue_limit=4, wait=30, clock=clock)
    table = InFlightTable(partial(Download, store=store, clock=clock, slots=slots))
    upstreams = Upstreams({"docker.io": upstream}, "docker.io")
    resource = RegistryResource(
        store, table, ManifestCache(store, clock, 60), upstreams
    )
    connect(resource).request("GET", BLOB)
    # A client pipelines a queued blob, then the blob being downloaded: the
    # second request is read when the first is answered, which happens when
    # the download ends and hands its slot on.
    pipelined = connect(resource)
    queued = f"/v2/library/busybox/blobs/{Digest.of(b'b')}"
    pipelined.send(
        f"GET {queued} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET {BLOB} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    response = FakeResponse(length=len(DATA))
    upstream.fetches[0][2].callback(response)
    upstream.refusal = UpstreamError("upstream down")
    assert response.protocol is not None
    with LoggedEvents() as logged:
        response.protocol.dataReceived(DATA)
        # The commit fails; the slot goes to the queued blob, which fails.
        response.protocol.connectionLost(Failure(ResponseDone()))
        # The failed commit is logged in one line, without a traceback: the
        # disk failed, not blobserve.
        assert f"could not commit {DIGEST}: [Errno 5] EIO" in logged.messages()
        assert logged.failures() == []
    # The second request found no download of its blob, and started one.
    assert [fetch[1] for fetch in upstream.fetches] == [DIGEST, Digest.of(b"b"), DIGEST]
    answers = pipelined.transport.value()
    assert answers.count(b"HTTP/1.1 502 ") == 2
    assert b" 500 " not in answers


def test_request_answered_elsewhere_stops_waiting(registry: Registry) -> None:
    pending: Deferred[BlobInfo] = Deferred()
    registry.upstream.stat_answer = pending
    client = registry.get(method="HEAD")
    with LoggedEvents() as logged:
        # Something else (a deadline, say) answers the request first: the
        # upstream's answer is no longer waited for.
        request = client.channel._channel.requests[0]
        request.setResponseCode(503)
        request.finish()
        assert pending.called
        assert logged.failures() == []


def test_blobs_and_manifests_served_are_recorded_per_repository(
    registry: Registry,
) -> None:
    commit_blob(registry.store, DATA)
    registry.get()
    other = Digest.of(b"other")
    client = registry.get(f"/v2/ghcr/thing/blobs/{other}?ns=ghcr.io")
    response = FakeResponse(length=5)
    registry.other.fetches[0][2].callback(response)
    assert client.response()[0] == 200
    registry.get(f"/v2/x/blobs/{other}?ns=nowhere.example")
    result_of(registry.store.index.flush())
    connection = sqlite3.connect(index_path(registry.store.root))
    try:
        recorded = connection.execute("SELECT * FROM repositories").fetchall()
    finally:
        connection.close()
    assert sorted(recorded) == [
        ("docker.io", "library/busybox", str(DIGEST)),
        ("ghcr.io", "ghcr/thing", str(other)),
    ]


def test_a_finished_request_is_over() -> None:
    """
    A request answered is over, though Twisted removes a finished request's
    channel: what it waited for, failing late, is dropped (the check raised
    from the errback, an unhandled error in a Deferred).
    """
    request = Request(DummyChannel())
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.finish()
    assert resource_module._over(request)
