"""
C{/_blobserve/status}: what blobserve is doing now, as JSON, or as a page
that shows it live to a browser.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.fetch.inflight import IInFlightTable
from blobserve.fetch.progress import ProgressSampler
from blobserve.fetch.slots import UpstreamSlots
from blobserve.store.files import IBlobStore
from blobserve.web.status_page import CONTENT_SECURITY_POLICY, PAGE


class StatusResource(Resource):
    """
    The status page: downloads running and their observers, blob responses
    in progress, the unfinished downloads the store holds, and the store's
    figures.
    """

    isLeaf = True

    def __init__(
        self,
        store: IBlobStore,
        downloads: IInFlightTable,
        responses: Callable[[], int],
        store_status: Callable[[], Mapping[str, int | None]] | None = None,
        progress: ProgressSampler | None = None,
        slots: UpstreamSlots | None = None,
        cache: Callable[[], Mapping[str, int]] | None = None,
        node: str | None = None,
    ) -> None:
        """
        @param responses: how many blob responses are in progress.
        @param store_status: the store's figures, shown under C{"store"}.
        @param progress: reports each download in flight, under
            C{"in_flight"}.
        @param slots: the upstream slots, whose use is shown under
            C{"upstream_slots"}.
        @param cache: counts of requests by outcome (C{"hits"},
            C{"misses"}, C{"joins"}, C{"stale"}), shown under C{"cache"}.
        @param node: this node's name, shown under C{"node"}.
        """
        super().__init__()
        self._store = store
        self._downloads = downloads
        self._responses = responses
        self._store_status = store_status
        self._progress = progress
        self._slots = slots
        self._cache = cache
        self._node = node

    def render_GET(self, request: Request) -> bytes:
        """
        The page for a client that prefers HTML to JSON (a browser); else the
        JSON of L{status}.
        """
        request.setHeader(b"Vary", b"Accept")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        accept = b",".join(request.requestHeaders.getRawHeaders(b"accept") or [])
        if _prefers_html(accept.decode("latin-1")):
            body = PAGE
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
        else:
            body = json.dumps(self.status()).encode()
            request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def status(self) -> dict[str, object]:
        """
        What is running now: downloads, their observers, blob responses; and
        the store's figures under C{"store"}, and the unfinished downloads the
        store holds (running or kept from an earlier run) with their bytes on
        disk; each download in flight under C{"in_flight"}, the upstream
        slots' use under C{"upstream_slots"}, and requests by outcome under
        C{"cache"}, each if the resource was given what it takes.
        """
        downloads = list(self._downloads)
        written = {
            d.digest: d.progress.written for d in downloads if d.progress is not None
        }
        partials = self._store.partials()
        status: dict[str, object] = {
            "downloads": len(downloads),
            "observers": sum(
                d.progress.observers for d in downloads if d.progress is not None
            ),
            "responses": self._responses(),
            "partials": {
                "count": len(partials),
                "bytes": sum(
                    written.get(digest, entry.written)
                    for digest, entry in partials.items()
                ),
            },
        }
        if self._store_status is not None:
            status["store"] = dict(self._store_status())
        if self._progress is not None:
            status["in_flight"] = [
                download.as_json() for download in self._progress.survey()
            ]
        if self._slots is not None:
            status["upstream_slots"] = {
                "in_use": self._slots.taken,
                "queued": self._slots.waiting,
                "limit": self._slots.limit,
            }
        if self._cache is not None:
            status["cache"] = dict(self._cache())
        if self._node is not None:
            status["node"] = self._node
        return status


def _prefers_html(accept: str) -> bool:
    """
    Whether an C{Accept} header ranks HTML above JSON (a tie is JSON's).
    """
    quality = {}
    for media_range in accept.split(","):
        kind, *parameters = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value[:8])
                except ValueError:
                    q = 0.0
        quality[kind.lower()] = q

    def of(media_type: str) -> float:
        main = media_type.split("/")[0]
        for kind in (media_type, f"{main}/*", "*/*"):
            if kind in quality:
                return quality[kind]
        return 0.0

    return of("text/html") > of("application/json")
