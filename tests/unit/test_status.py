"""
The status page's downloads in flight, its HTML face, and the progress lines
in the log, with the real table, downloads and store, the upstream double and
a fake clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_resource import DATA, DIGEST, Registry, registry_for
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from blobserve.digest import Digest
from blobserve.fetch.progress import (
    ProgressLines,
    ProgressSampler,
    size_text,
)
from blobserve.fetch.retry import RetryPolicy
from blobserve.fetch.slots import UpstreamSlots
from blobserve.web.root import site_root
from blobserve.web.status import StatusResource
from blobserve.web.status_page import CONTENT_SECURITY_POLICY, PAGE

from fakes import FakeResponse, LoggedEvents, connect, run_now

STATUS = "/_blobserve/status"
OTHER = b"another blob" * 100
OTHER_BLOB = f"/v2/library/alpine/blobs/{Digest.of(OTHER)}"


def in_flight(registry: Registry) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(registry.get(STATUS).response()[2])[
        "in_flight"
    ]
    return result


def states(registry: Registry) -> list[str]:
    return [download["state"] for download in in_flight(registry)]


def test_a_download_in_flight_shows_its_bytes_rate_clients_and_age(
    tmp_path: Path,
) -> None:
    clock = Clock()
    registry = registry_for(tmp_path, clock)
    clock.advance(100)
    clients = [registry.get() for _ in range(2)]
    clock.advance(1)
    [waiting] = in_flight(registry)
    # Before the upstream answers, the clients wait for it.
    assert (waiting["clients"], waiting["written"], waiting["expected"]) == (2, 0, None)

    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    clock.advance(1)
    first = in_flight(registry)
    assert first == [
        {
            "digest": str(DIGEST),
            "registry": "docker.io",
            "repository": "library/busybox",
            "written": 1000,
            "expected": len(DATA),
            "rate": 1000.0,
            "clients": 2,
            "age": 2.0,
            "state": "fetching",
            "segments": 0,
        }
    ]
    response.protocol.dataReceived(DATA[1000:6000])
    clients[0].disconnect()
    clock.advance(2)
    [second] = in_flight(registry)
    assert second["written"] == 6000
    # 6000 bytes since the first sample, three seconds ago.
    assert second["rate"] == 2000.0
    assert second["clients"] == 1
    assert second["age"] == 4.0

    response.protocol.dataReceived(DATA[6000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert in_flight(registry) == []


def test_the_rate_is_measured_over_the_last_seconds_only(tmp_path: Path) -> None:
    clock = Clock()
    registry = registry_for(tmp_path, clock)
    registry.get()
    response = registry.answer()
    assert response.protocol is not None
    for _ in range(10):
        response.protocol.dataReceived(DATA[:1000])
        clock.advance(1)
        in_flight(registry)
    # Then it stalls: once the window has passed, nothing came in it.
    clock.advance(3)
    assert in_flight(registry)[0]["rate"] == pytest.approx(1000 * 2 / 5)
    clock.advance(3)
    assert in_flight(registry)[0]["rate"] == 0.0


def test_samples_stay_few_however_often_the_status_is_asked(
    tmp_path: Path,
) -> None:
    clock = Clock()
    registry = registry_for(tmp_path, clock)
    sampler = ProgressSampler(registry.table, clock, window=5.0)
    registry.get()
    for _ in range(1000):
        clock.advance(0.01)
        sampler.survey()
    [samples] = sampler._samples.values()
    assert len(samples) <= 12
    registry.get()
    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA)
    response.protocol.connectionLost(Failure(ResponseDone()))
    sampler.survey()
    assert sampler._samples == {}


def test_a_download_says_whether_it_queues_connects_fetches_resumes_or_commits(
    tmp_path: Path,
) -> None:
    clock = Clock()
    held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
    holding = False

    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not holding:
            return run_now(f, *args)
        d: Deferred[Any] = Deferred()
        held.append((f, args, d))
        return d

    registry = registry_for(
        tmp_path,
        clock,
        run_blocking=run_blocking,
        slots=UpstreamSlots(1, 10, 30.0, clock),
        retry=RetryPolicy(retries=3, delay=1.0),
    )
    registry.get()
    other = registry.get(OTHER_BLOB)
    assert states(registry) == ["connecting", "queued"]

    response = registry.answer()
    assert response.protocol is not None
    response.protocol.dataReceived(DATA[:1000])
    assert states(registry) == ["fetching", "queued"]

    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert states(registry) == ["resuming", "queued"]
    clock.advance(1)
    # Asked again, not answered yet: still between two transfers.
    assert registry.upstream.offsets[-1] == 1000
    assert states(registry) == ["resuming", "queued"]

    resumed = FakeResponse(
        length=len(DATA) - 1000,
        code=206,
        headers=Headers(
            {b"content-range": [f"bytes 1000-{len(DATA) - 1}/{len(DATA)}".encode()]}
        ),
    )
    registry.upstream.fetches[-1][2].callback(resumed)
    assert states(registry) == ["fetching", "queued"]

    holding = True
    assert resumed.protocol is not None
    resumed.protocol.dataReceived(DATA[1000:])
    resumed.protocol.connectionLost(Failure(ResponseDone()))
    assert states(registry) == ["committing", "queued"]
    holding = False
    while held:
        f, args, d = held.pop(0)
        run_now(f, *args).chainDeferred(d)
    assert registry.committed()
    # Its slot went to the next download.
    assert states(registry) == ["connecting"]
    other.disconnect()
    assert states(registry) == []


def test_the_status_shows_the_upstream_slots_and_the_cache_counts(
    tmp_path: Path,
) -> None:
    clock = Clock()
    counts = {"hits": 3, "misses": 1, "joins": 2, "stale": 0}
    registry = registry_for(
        tmp_path,
        clock,
        cache=lambda: counts,
        slots=UpstreamSlots(1, 10, 30.0, clock),
    )
    clients = [registry.get(), registry.get(OTHER_BLOB)]
    status = json.loads(registry.get(STATUS).response()[2])
    assert status["upstream_slots"] == {"in_use": 1, "queued": 1, "limit": 1}
    assert status["cache"] == counts
    counts["hits"] = 4
    assert json.loads(registry.get(STATUS).response()[2])["cache"]["hits"] == 4
    for client in clients:
        client.disconnect()


BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER, True),
        ("text/html", True),
        ("application/json", False),
        ("*/*", False),
        ("", False),
        ("text/html;q=0.5, application/json", False),
        ("text/html;q=0, */*", False),
        ("text/*", True),
    ],
)
def test_a_browser_gets_the_page_and_everyone_else_the_json(
    tmp_path: Path, accept: str, html: bool
) -> None:
    registry = registry_for(tmp_path, Clock())
    headers = {"Accept": accept} if accept else {}
    status, answer, body = registry.get(STATUS, headers=headers).response()
    assert status == 200
    assert answer["vary"] == "Accept"
    if html:
        assert answer["content-type"] == "text/html; charset=utf-8"
        assert body == PAGE
        assert answer["content-security-policy"] == CONTENT_SECURITY_POLICY.decode()
    else:
        assert answer["content-type"] == "application/json"
        assert "in_flight" in json.loads(body)


def _hash_source(source: bytes) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source).digest()).decode() + "'"


def test_the_page_policy_allows_its_own_inline_script_and_style_and_nothing_else() -> (
    None
):
    [script] = re.findall(rb"<script>(.*?)</script>", PAGE, re.DOTALL)
    [style] = re.findall(rb"<style>(.*?)</style>", PAGE, re.DOTALL)
    directives = dict(
        directive.strip().split(" ", 1)
        for directive in CONTENT_SECURITY_POLICY.decode().split(";")
    )
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == _hash_source(script)
    assert directives["style-src"] == _hash_source(style)
    assert directives["connect-src"] == "'self'"
    # Data goes into the page as text only.
    assert b"innerHTML" not in PAGE
    assert b"outerHTML" not in PAGE
    assert b"insertAdjacentHTML" not in PAGE
    assert b"document.write" not in PAGE


def test_sizes_read_as_a_person_reads_them() -> None:
    assert size_text(512) == "512 B"
    assert size_text(12.5 * 1024 * 1024) == "12.5 MiB"
    assert size_text(3 * 1024**3) == "3.0 GiB"
    assert size_text(5000 * 1024**4) == "5000.0 TiB"


def progress_lines(events: LoggedEvents) -> list[str]:
    return [
        message
        for event, message in zip(events.events, events.messages(), strict=True)
        if event.get("log_namespace") == "blobserve.fetch.progress"
    ]


def lines_for(registry: Registry, clock: Clock) -> ProgressLines:
    """
    Progress lines every ten seconds on the downloads of C{registry}.
    """
    sampler = ProgressSampler(registry.table, clock, registry.resource.following)
    return ProgressLines(sampler, 10.0, clock)


def test_a_long_download_logs_a_progress_line_every_interval(tmp_path: Path) -> None:
    clock = Clock()
    registry = registry_for(tmp_path, clock)
    lines = lines_for(registry, clock)
    with LoggedEvents() as events:
        lines.startService()
        clock.advance(1)
        clients = [registry.get() for _ in range(3)]
        response = registry.answer()
        assert response.protocol is not None
        response.protocol.dataReceived(DATA[:10240])
        clock.advance(9)
        # Nine seconds old at the first tick: too young for a line.
        assert progress_lines(events) == []
        response.protocol.dataReceived(DATA[10240:20480])
        clock.advance(10)
        assert progress_lines(events) == [
            f"fetching {str(DIGEST)[:19]}… from docker.io/library/busybox:"
            " 20.0 KiB of 100.0 KiB (20 %) at 1.0 KiB/s, 3 clients"
        ]
        clients[0].disconnect()
        clients[1].disconnect()
        clock.advance(5)
        assert len(progress_lines(events)) == 1
        clock.advance(5)
        assert progress_lines(events)[-1].endswith("at 0 B/s, 1 client")
        response.protocol.dataReceived(DATA[20480:])
        response.protocol.connectionLost(Failure(ResponseDone()))
        clock.advance(10)
        assert len(progress_lines(events)) == 2
        lines.stopService()
    assert clock.getDelayedCalls() == []


def test_a_download_younger_than_the_interval_gets_no_line_yet(
    tmp_path: Path,
) -> None:
    clock = Clock()
    registry = registry_for(tmp_path, clock)
    lines = lines_for(registry, clock)
    with LoggedEvents() as events:
        lines.startService()
        clock.advance(5)
        registry.get()
        response = registry.answer(length=None)
        assert response.protocol is not None
        response.protocol.dataReceived(DATA[:2048])
        clock.advance(5)
        # Five seconds old at the tick.
        assert progress_lines(events) == []
        clock.advance(10)
        lines.stopService()
        response.protocol.dataReceived(DATA[2048:])
        response.protocol.connectionLost(Failure(ResponseDone()))
    # Of a blob of unknown length, the bytes so far.
    assert progress_lines(events) == [
        f"fetching {str(DIGEST)[:19]}… from docker.io/library/busybox: 2.0 KiB"
        " at 0 B/s, 1 client"
    ]
    assert registry.committed()


def test_the_status_names_the_node(tmp_path: Path) -> None:
    registry = registry_for(tmp_path, Clock())
    status = StatusResource(registry.store, registry.table, lambda: 0, node="cache-4")
    served = site_root(registry.resource, {b"status": status})
    connection = connect(served)
    connection.request("GET", "/_blobserve/status")
    assert json.loads(connection.response()[2])["node"] == "cache-4"
    assert b'text("node", s.node' in PAGE


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
@pytest.mark.parametrize("path", ["/_blobserve", "/_blobserve/"])
def test_the_operator_folder_itself_is_answered_as_an_unknown_path(
    tmp_path: Path, method: str, path: str
) -> None:
    registry = registry_for(tmp_path, Clock())
    status = StatusResource(registry.store, registry.table, lambda: 0)
    connection = connect(site_root(registry.resource, {b"status": status}))
    connection.request(method, path)
    code, _, body = connection.response()
    expected = connect(registry.resource)
    expected.request(method, "/v2/_unknown_")
    assert (code, body) == expected.response()[0::2]
    assert code in (404, 405)
