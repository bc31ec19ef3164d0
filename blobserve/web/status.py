"""
C{/_blobserve/status}: what blobserve is doing now, as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.fetch.inflight import IInFlightTable
from blobserve.store.files import IBlobStore


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
    ) -> None:
        """
        @param responses: how many blob responses are in progress.
        @param store_status: the store's figures, shown under C{"store"}.
        """
        super().__init__()
        self._store = store
        self._downloads = downloads
        self._responses = responses
        self._store_status = store_status

    def render_GET(self, request: Request) -> bytes:
        """
        What is running now: downloads, their observers, blob responses; and
        the store's figures under C{"store"}, and the unfinished downloads the
        store holds (running or kept from an earlier run) with their bytes on
        disk.
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
        body = json.dumps(status).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body
