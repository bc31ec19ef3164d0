"""
The metrics page and the access log of a real blobserve in front of the real
registry: a known sequence of pulls, scraped over HTTP and parsed with
prometheus_client's own parser, and the access lines it logged.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from checks import assert_correct, blob_url, until
from clients import Client
from images import MANIFEST, push_image
from processes import DEADLINE, BlobserveProcess, RegistryProcess, free_port
from relay import Fault, Relay

SIZE = 2 * 1024 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def sample(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def scrape(url: str) -> Samples:
    response = await treq.get(url, persistent=False)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = (await response.content()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def until_idle(server: BlobserveProcess) -> None:
    """
    Wait, up to the deadline, until no download is in flight.
    """
    deadline = time.monotonic() + DEADLINE
    while True:
        response = await treq.get(f"{server.url}/_blobserve/status", persistent=False)
        if (await response.json())["downloads"] == 0:
            return
        assert time.monotonic() < deadline, "downloads still in flight"
        await deferLater(reactor, 0.05, lambda: None)


def access_lines(server: BlobserveProcess) -> list[str]:
    return [
        line
        for line in server.log.read_text().splitlines()
        if "[blobserve.access#info]" in line
    ]


@pytest_twisted.ensureDeferred
async def test_a_known_sequence_leaves_exact_counts_and_access_lines(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    image = await push_image(
        tmp_path, f"127.0.0.1:{registry.port}", "test/metrics", "v1"
    )
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.faults = [Fault("cut", SIZE // 2)]
    metrics_port = free_port()
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=(
            "--upstream-retry-delay=0.05",
            "--tag-ttl=0.2",
            f"--metrics-listen=tcp:{metrics_port}:interface=127.0.0.1",
        ),
    )
    await server.start()
    try:
        # A miss, joined by two clients while it lands, resumed once.
        first = client.get(blob_url(server, digest))
        await first.when_received(1)
        joiners = [client.get(blob_url(server, digest)) for _ in range(2)]
        for fetch in await gatherResults([d.finished() for d in [first, *joiners]]):
            assert_correct(fetch, data)
        # Two hits, once the download has left the in-flight table.
        await until_idle(server)
        for _ in range(2):
            assert_correct(await client.get(blob_url(server, digest)).finished(), data)
        # A tag, then, past its TTL and with the upstream gone, the same tag
        # served stale.
        manifest_url = f"{server.url}/v2/test/metrics/manifests/v1"
        accept = {"Accept": MANIFEST}
        assert (await client.get(manifest_url, headers=accept).finished()).status == 200
        await deferLater(reactor, 0.3, lambda: None)
        relay.stop()
        stale = await client.get(manifest_url, headers=accept).finished()
        assert stale.status == 200
        assert stale.headers["docker-content-digest"] == image.manifest_digest

        # Counted when each response ended: scrape once the last is logged.
        # Seven requests, and the status asked for by until_idle.
        await until(
            lambda: (
                sum("/_blobserve/" not in line for line in access_lines(server)) == 7
            ),
            "seven access lines",
        )
        samples = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        main_port = await treq.get(f"{server.url}/metrics", persistent=False)
        assert main_port.code == 404
        await main_port.content()
    finally:
        server.stop()

    blob_count = "blobserve_cache_requests_total"
    upstream = f"127.0.0.1:{relay.port}"
    expected = {
        sample(blob_count, kind="blob", outcome="miss"): 1,
        sample(blob_count, kind="blob", outcome="join"): 2,
        sample(blob_count, kind="blob", outcome="hit"): 2,
        sample(blob_count, kind="manifest", outcome="miss"): 1,
        sample(blob_count, kind="manifest", outcome="stale"): 1,
        sample("blobserve_sent_bytes_total", outcome="join"): 2 * SIZE,
        sample("blobserve_sent_bytes_total", outcome="hit"): 2 * SIZE,
        sample("blobserve_downloads_total", result="committed"): 1,
        sample("blobserve_download_resumes_total", cause="broken"): 1,
        sample(
            "blobserve_upstream_received_bytes_total",
            registry=f"127.0.0.1:{relay.port}",
        ): SIZE,
        sample(
            "blobserve_http_requests_total", route="blob", method="GET", status="2xx"
        ): 5,
        sample("blobserve_aborted_responses_total"): 0,
        sample("blobserve_downloads_in_flight"): 0,
        sample("blobserve_download_clients"): 0,
        sample("blobserve_store_blobs"): 2,
    }
    assert {key: samples.get(key) for key in expected} == expected
    upstream_errors = sample(
        "blobserve_upstream_requests_total", registry=upstream, status="error"
    )
    assert samples[upstream_errors] >= 1

    lines = [line for line in access_lines(server) if "/_blobserve/" not in line]
    short = f"{digest.algorithm}:{digest.hex[:12]}"
    blob_path = f"/v2/test/blobs/blobs/{digest}"
    outcomes = sorted(
        re.search(r" (miss|join|hit|stale)\b", line)[1]  # type: ignore[index]
        for line in lines
        if blob_path in line
    )
    assert outcomes == ["hit", "hit", "join", "join", "miss"]
    for line in lines:
        if blob_path in line:
            assert re.search(
                rf'127\.0\.0\.1 "GET {blob_path}" 200 {SIZE} \d+\.\d{{3}}s '
                rf"(miss|join|hit) {short}$",
                line,
            ), line
    assert any(" stale sha256:" in line for line in lines)


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_is_logged_as_aborted_and_counted(
    tmp_path: Path, registry: RegistryProcess, relay: Relay, client: Client
) -> None:
    data = os.urandom(SIZE)
    digest = registry.push_blob("test/blobs", data)
    relay.rate = 512 * 1024
    server = BlobserveProcess(
        tmp_path, f"http://127.0.0.1:{relay.port}", tmp_path / "storage"
    )
    await server.start()
    try:
        leaving = await client.get(blob_url(server, digest), stop_after=1).finished()
        assert not leaving.complete
        await until(lambda: bool(access_lines(server)), "the access line")
        samples = await scrape(f"{server.url}/metrics")
    finally:
        server.stop()
    [line] = [line for line in access_lines(server) if str(digest) in line]
    assert line.endswith(" aborted"), line
    assert f'"GET /v2/test/blobs/blobs/{digest}" 200 ' in line
    assert samples[sample("blobserve_aborted_responses_total")] == 1
    # The download goes on without its client.
    assert samples[sample("blobserve_downloads_in_flight")] == 1
