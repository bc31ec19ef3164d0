"""
blobserve-prefetch against an in-memory blobserve: what it asks for, how
many at once, what it counts, and how it ends.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from rich.console import Console
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.prefetch.cli import images_of, main
from blobserve.prefetch.display import PlainDisplay, TerminalDisplay
from blobserve.prefetch.fetching import IPrefetchEvents, Prefetcher, Summary
from blobserve.prefetch.manifests import OCI_INDEX, OCI_MANIFEST, Platform
from blobserve.prefetch.references import BadReference, parse_reference

SERVER = "http://blobserve.test"


@define
class FakeBlobserve(Resource):
    """
    Answers manifests and blobs from dictionaries, as blobserve would; a blob
    named in C{held} waits until the test lets it go.
    """

    isLeaf = True
    manifests: dict[str, tuple[str, bytes]] = field(factory=dict)
    blobs: dict[str, bytes] = field(factory=dict)
    cache: dict[str, str] = field(factory=dict)
    short: set[str] = field(factory=set)
    held: list[Request] = field(factory=list)
    hold: bool = False
    asked: list[str] = field(factory=list)
    most_held: int = 0

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render_GET(self, request: Request) -> bytes | int:
        path = request.path.decode()
        self.asked.append(path)
        if path == "/v2/":
            return b"{}"
        _, _, reference = path.rpartition("/")
        if "/manifests/" in path and reference in self.manifests:
            media_type, content = self.manifests[reference]
            request.setHeader(b"Content-Type", media_type.encode())
            return content
        if "/blobs/" in path and reference in self.blobs:
            request.setHeader(b"X-Blobserve-Cache", self.cache.get(reference, "miss"))
            body = self.blobs[reference]
            if reference in self.short:
                body = body[:-1]
            if self.hold:
                self.held.append(request)
                self.most_held = max(self.most_held, len(self.held))
                request.write(body[:1])
                return NOT_DONE_YET
            return body
        request.setResponseCode(404)
        error = {
            "errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]
        }
        return json.dumps(error).encode()

    def release(self) -> None:
        for request in self.held:
            digest = request.path.decode().rpartition("/")[2]
            request.write(self.blobs[digest][1:])
            request.finish()
        self.held.clear()


def push(server: FakeBlobserve, tag: str, architectures: list[str]) -> set[str]:
    """
    An index of one manifest per architecture, each with a config and two
    layers; the digests of its blobs.
    """
    entries, digests = [], set()
    for architecture in architectures:
        descriptors = []
        for part in ("config", "layer1", "layer2"):
            content = f"{architecture} {part}".encode() * 100
            digest = str(Digest.of(content))
            server.blobs[digest] = content
            digests.add(digest)
            descriptors.append(
                {"mediaType": "x", "digest": digest, "size": len(content)}
            )
        manifest = json.dumps(
            {
                "mediaType": OCI_MANIFEST,
                "config": descriptors[0],
                "layers": descriptors[1:],
            }
        ).encode()
        digest = str(Digest.of(manifest))
        server.manifests[digest] = (OCI_MANIFEST, manifest)
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest),
                "platform": {"os": "linux", "architecture": architecture},
            }
        )
    index = json.dumps({"mediaType": OCI_INDEX, "manifests": entries}).encode()
    server.manifests[tag] = (OCI_INDEX, index)
    return digests


@define
class Run:
    server: FakeBlobserve
    clock: Clock = field(factory=Clock)
    out: StringIO = field(factory=StringIO)
    errors: StringIO = field(factory=StringIO)
    agent: RequestTraversalAgent = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.agent = RequestTraversalAgent(self.server)

    def start(
        self, *images: str, parallel: int = 4, **options: Any
    ) -> Deferred[Summary]:
        prefetcher = Prefetcher(
            SERVER,
            HTTPClient(self.agent),
            self.clock,
            PlainDisplay(self.out, self.errors),
            parallel=parallel,
            **options,
        )
        self.clock.advance(1)
        return Deferred.fromCoroutine(
            prefetcher.run([parse_reference(image) for image in images])
        )

    def finish(self, running: Deferred[Summary]) -> Summary:
        results: list[Summary] = []
        running.addCallback(results.append)
        for _ in range(100):
            if results:
                return results[0]
            self.agent.flush()
        raise AssertionError("the prefetch never ended")

    def __call__(self, *images: str, **options: Any) -> Summary:
        return self.finish(self.start(*images, **options))


@pytest.fixture
def server() -> FakeBlobserve:
    return FakeBlobserve()


def test_every_platforms_blobs_are_fetched_once_and_counted(
    server: FakeBlobserve,
) -> None:
    digests = push(server, "v1", ["amd64", "arm64"])
    cached = sorted(digests)[0]
    server.cache[cached] = "hit"
    run = Run(server)
    summary = run("org/app:v1", "org/app:v1")
    fetched = [p.rpartition("/")[2] for p in server.asked if "/blobs/" in p]
    assert sorted(fetched) == sorted(digests)
    assert (summary.complete, summary.cached, summary.fetched) == (6, 1, 5)
    assert summary.failed == 0 and summary.ok
    assert summary.received == sum(len(server.blobs[d]) for d in digests)
    lines = run.out.getvalue().splitlines()
    assert sum(line.startswith("miss ") for line in lines) == 5
    assert lines[-1].startswith(
        "2 images: 6 blobs complete (1 already cached, 5 fetched), 0 failed"
    )


def test_a_platform_fetches_only_its_manifests_blobs(server: FakeBlobserve) -> None:
    amd64 = push(server, "amd", ["amd64"])
    everything = push(server, "v1", ["amd64", "arm64"])
    summary = Run(server)("org/app:v1", platforms=[Platform.parse("linux/amd64")])
    fetched = {p.rpartition("/")[2] for p in server.asked if "/blobs/" in p}
    assert fetched == amd64 and fetched < everything
    assert summary.ok


def test_a_platform_an_index_lacks_fails_the_image(server: FakeBlobserve) -> None:
    push(server, "v1", ["amd64"])
    run = Run(server)
    summary = run("org/app:v1", platforms=[Platform.parse("linux/s390x")])
    assert (summary.images_failed, summary.ok) == (1, False)
    assert "error: org/app:v1: no manifest for linux/s390x" in run.errors.getvalue()


def test_one_platform_of_several_that_an_index_lacks_fails_the_image(
    server: FakeBlobserve,
) -> None:
    push(server, "v1", ["amd64"])
    run = Run(server)
    asked = [Platform.parse("linux/amd64"), Platform.parse("linux/s390x")]
    summary = run("org/app:v1", platforms=asked)
    assert (summary.images_failed, summary.ok) == (1, False)
    assert "error: org/app:v1: no manifest for linux/s390x" in run.errors.getvalue()


def test_a_missing_tag_fails_the_image_and_others_go_on(server: FakeBlobserve) -> None:
    digests = push(server, "v1", ["amd64"])
    run = Run(server)
    summary = run("org/app:missing", "org/app:v1")
    assert run.errors.getvalue() == (
        "error: org/app:missing: 404 MANIFEST_UNKNOWN: manifest unknown\n"
    )
    assert (summary.images_failed, summary.complete, summary.ok) == (
        1,
        len(digests),
        False,
    )


def test_a_short_blob_fails(server: FakeBlobserve) -> None:
    digests = push(server, "v1", ["amd64"])
    short = sorted(digests)[0]
    server.short.add(short)
    run = Run(server)
    summary = run("org/app:v1")
    size = len(server.blobs[short])
    assert (summary.failed, summary.complete, summary.ok) == (1, 2, False)
    assert f"got {size - 1} of {size} bytes" in run.errors.getvalue()


def test_a_registry_named_is_sent_as_ns(server: FakeBlobserve) -> None:
    push(server, "v1", ["amd64"])
    run = Run(server)
    seen: list[bytes | None] = []
    original = server.render_GET

    def spy(request: Request) -> bytes | int:
        seen.append((request.args or {}).get(b"ns", [None])[0])
        return original(request)

    server.render_GET = spy  # type: ignore[method-assign]
    run("ghcr.io/org/app:v1")
    run("org/app:v1")
    # /v2/, then the index, its manifest and three blobs, for each run.
    assert seen[:6] == [None] + [b"ghcr.io"] * 5
    assert seen[6:] == [None] * 6


def test_no_more_blobs_than_parallel_are_asked_at_once(server: FakeBlobserve) -> None:
    digests = push(server, "v1", ["amd64", "arm64"])
    server.hold = True
    run = Run(server)
    running = run.start("org/app:v1", parallel=2)
    for _ in range(20):
        run.agent.flush()
    assert len(server.held) == 2
    while server.held:
        server.release()
        for _ in range(20):
            run.agent.flush()
    summary = run.finish(running)
    assert server.most_held == 2
    assert summary.complete == len(digests)


def test_a_stalled_blob_fails_after_the_timeout(server: FakeBlobserve) -> None:
    push(server, "v1", ["amd64"])
    server.hold = True
    run = Run(server)
    running = run.start("org/app:v1", timeout=30.0)
    for _ in range(20):
        run.agent.flush()
    run.clock.advance(29)
    assert not running.called
    run.clock.advance(2)
    summary = run.finish(running)
    assert (summary.failed, summary.ok) == (3, False)
    assert "no data for 30 s" in run.errors.getvalue()


def test_quiet_prints_only_the_summary_and_errors() -> None:
    out, errors = StringIO(), StringIO()
    display = PlainDisplay(out, errors, quiet=True)
    display.blobs_found([])
    display.finished(Summary(images=1))
    assert out.getvalue().splitlines() == [
        "1 image: 0 blobs complete (0 already cached, 0 fetched), 0 failed;"
        " 0 bytes in 0.0 s (0 bytes/s)"
    ]


def test_displays_are_prefetch_events() -> None:
    assert verifyObject(IPrefetchEvents, PlainDisplay(StringIO(), StringIO()))
    assert verifyObject(IPrefetchEvents, TerminalDisplay(Console(file=StringIO())))


def test_image_lists_skip_blanks_and_comments_and_name_bad_lines(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("# rollout\n\nalpine:3.20\n  ghcr.io/org/app:v1  \n")
    assert [str(i) for i in images_of(["busybox"], listing)] == [
        "library/busybox",
        "library/alpine:3.20",
        "ghcr.io/org/app:v1",
    ]
    listing.write_text("alpine\n\nBad:tag\n")
    with pytest.raises(BadReference, match=r"images\.txt:3: "):
        images_of([], listing)


@pytest.mark.parametrize(
    "argv",
    [[], ["Alpine"], ["--platform", "linux", "alpine"], ["--parallel", "0", "a"]],
)
def test_usage_errors_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "blobserve-prefetch: error: " in capsys.readouterr().err
