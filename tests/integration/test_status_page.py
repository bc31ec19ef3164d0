"""
The status page in a real headless Chromium: it shows a real download's
progress as it grows, and shows what clients and upstreams name as text,
never as markup.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.fetch.inflight import InFlightTable
from blobserve.fetch.progress import ProgressSampler
from blobserve.store.database import ImmediateDatabase
from blobserve.store.files import DirectoryBlobStore
from blobserve.store.index import StoreIndex
from blobserve.store.layout import index_path
from blobserve.upstream.client import IUpstream
from blobserve.web.status import StatusResource

from authservers import listen
from checks import blob_url, until
from clients import Client
from processes import DEADLINE, BlobserveProcess, RegistryProcess
from relay import Relay

CHROMIUM = next(
    filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])),
    None,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium to load the page in (apt install chromium)"
)

#: Slow enough that the page sees the blob grow between two loads.
RATE = 256 * 1024
SIZE = 4 * 1024 * 1024


def chromium(url: str, *flags: str) -> Deferred[str]:
    """
    Load C{url} in a fresh headless Chromium, give its scripts two seconds
    of virtual time (fetches complete within it), and fire with what it
    writes: the DOM with C{--dump-dom}. Runs in a thread, so the reactor
    (and the relay in it) goes on meanwhile; the browser is killed after
    L{DEADLINE} seconds.
    """
    assert CHROMIUM is not None

    def run() -> str:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=2000",
                    *flags,
                    url,
                ],
                capture_output=True,
                timeout=DEADLINE,
                check=True,
            )
        return done.stdout.decode()

    return deferToThread(run)


class _Page(HTMLParser):
    """
    What a dumped status page shows: its rows by digest, with their
    progress bars' attributes and text, and every element's tag.
    """

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, Any]] = {}
        self.tags: list[str] = []
        self._row: dict[str, Any] | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("data-digest"):
            self._row = self.rows[str(attributes["data-digest"])] = {
                "state": attributes.get("data-state"),
                "text": "",
            }
        elif tag == "progress" and self._row is not None:
            self._row["progress"] = attributes

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self._row["text"] += data


@pytest_twisted.ensureDeferred
async def test_the_page_shows_a_download_growing(
    tmp_path: Path, registry: RegistryProcess, client: Client
) -> None:
    relay = Relay(reactor, registry.port, rate=RATE)
    relay.listen()
    server = BlobserveProcess(
        tmp_path,
        f"http://127.0.0.1:{relay.port}",
        tmp_path / "storage",
        extra=("--progress-interval=1",),
    )
    try:
        data = os.urandom(SIZE)
        digest = registry.push_blob("test/blobs", data)
        await server.start()
        download = client.get(blob_url(server, digest))
        await download.when_received(64 * 1024).addTimeout(DEADLINE, reactor)
        page = f"{server.url}/_blobserve/status"

        first = _Page(await chromium(page, "--dump-dom")).rows[str(digest)]
        second = _Page(await chromium(page, "--dump-dom")).rows[str(digest)]
        assert first["state"] == second["state"] == "fetching"
        assert first["progress"]["max"] == second["progress"]["max"] == str(SIZE)
        assert 0 < int(first["progress"]["value"]) < int(second["progress"]["value"])
        assert "test/blobs" in second["text"]

        screenshot = tmp_path / "status-page.png"
        await chromium(page, f"--screenshot={screenshot}", "--window-size=1200,700")
        assert screenshot.read_bytes().startswith(b"\x89PNG")
        print(f"status page screenshot: {screenshot}")

        def progress_line() -> bool:
            return f"fetching {str(digest)[:19]}… from " in server.log.read_text()

        await until(progress_line, "a progress line in the log")
        done = await download.finished().addTimeout(DEADLINE, reactor)
        assert done.length == SIZE
    finally:
        server.stop()
        relay.stop()


@implementer(IUpstream)
class _Silent:
    """
    An upstream that never answers.
    """

    base_url = "http://upstream.invalid"

    def fetch_blob(
        self, name: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> Deferred[Any]:
        return Deferred()

    def fetch_manifest(self, name: str, reference: str, accept: Any) -> Deferred[Any]:
        return Deferred()

    def stat_manifest(self, name: str, reference: str, accept: Any) -> Deferred[Any]:
        return Deferred()

    def stat_blob(self, name: str, digest: Digest) -> Deferred[Any]:
        return Deferred()

    def fetch_tags(self, name: str, n: Any, last: Any) -> Deferred[Any]:
        return Deferred()

    def fetch_referrers(self, name: str, digest: Digest, kind: Any) -> Deferred[Any]:
        return Deferred()


SCRIPT = "<script>document.title='pwned'</script>"
IMAGE = "<img src=x onerror=\"document.title='pwned'\">"


@pytest_twisted.ensureDeferred
async def test_names_from_clients_and_upstreams_show_as_text(tmp_path: Path) -> None:
    # Names that reach a real blobserve are validated (no "<" passes); this
    # page is fed ones that are not, as a bug there would let through.
    database = ImmediateDatabase(index_path(str(tmp_path)))
    index = StoreIndex(str(tmp_path), database, reactor)
    store = DirectoryBlobStore(str(tmp_path), index)
    await index.load()
    downloads = InFlightTable(partial(Download, store=store, clock=reactor))
    digest = Digest.of(b"hostile")
    download = downloads.join(SCRIPT, digest, _Silent(), registry=IMAGE)
    progress = ProgressSampler(downloads, reactor)
    status = StatusResource(store, downloads, lambda: 0, progress=progress)
    port, number = listen(reactor, status)
    try:
        dom = await chromium(f"http://127.0.0.1:{number}/", "--dump-dom")
    finally:
        await maybeDeferred(port.stopListening)
        await download.stop_and_keep()
    page = _Page(dom)
    assert page.rows[str(digest)]["text"].count(f"{IMAGE}/{SCRIPT}") == 1
    assert re.search(r"&lt;img src=x onerror=.*&lt;script&gt;", dom)
    # The page's own script only, no image, and the title untouched.
    assert page.tags.count("script") == 1
    assert "img" not in page.tags
    assert "<title>blobserve status</title>" in dom
