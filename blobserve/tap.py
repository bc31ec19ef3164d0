"""
What C{twistd blobserve} runs: command-line options and the service they make.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from blobserve.download import Download
from blobserve.inflight import InFlightTable
from blobserve.resource import RegistryResource
from blobserve.storage import DirectoryBlobStore
from blobserve.upstream import RegistryUpstream

log = Logger()


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"must be a positive number, not {value}")
    return number


class Options(usage.Options):
    """
    C{twistd blobserve} options.
    """

    optParameters: ClassVar[list[list[Any]]] = [
        [
            "listen",
            "l",
            "tcp:5000:interface=127.0.0.1",
            "Where to listen, as a Twisted server endpoint string.",
        ],
        [
            "upstream",
            "u",
            "https://registry-1.docker.io",
            "The registry to fetch blobs from, as an http or https URL.",
        ],
        ["storage", "s", "./blobserve-data", "The directory blobs are kept in."],
        [
            "upstream-timeout",
            None,
            30.0,
            "Seconds to wait for the upstream's response headers.",
            _positive_float,
        ],
        [
            "upstream-idle-timeout",
            None,
            30.0,
            "Seconds without body bytes after which an upstream transfer fails.",
            _positive_float,
        ],
    ]

    def postOptions(self) -> None:
        upstream = self["upstream"]
        if not upstream.startswith(("http://", "https://")):
            raise usage.UsageError(
                f"--upstream must be an http(s) URL, not {upstream!r}"
            )


class _ConnectionPoolService(Service):
    """
    Closes the upstream connection pool when the service stops.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Wire the store, the upstream client, the in-flight table and the web site
    into one service listening where C{options} say.
    """
    if reactor is None:
        from twisted.internet import reactor

    store = DirectoryBlobStore(options["storage"])
    stale = store.remove_stale_temporaries()
    if stale:
        log.info("removed {count} unfinished downloads of an earlier run", count=stale)

    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool, connectTimeout=options["upstream-timeout"])
    upstream = RegistryUpstream(
        options["upstream"], HTTPClient(agent), timeout=options["upstream-timeout"]
    )
    downloads = InFlightTable(
        partial(
            Download,
            upstream=upstream,
            store=store,
            clock=reactor,
            idle_timeout=options["upstream-idle-timeout"],
        )
    )
    site = Site(RegistryResource(store, downloads, upstream))
    site.displayTracebacks = False

    service = MultiService()
    _ConnectionPoolService(pool).setServiceParent(service)
    endpoint = serverFromString(reactor, options["listen"])
    StreamServerEndpointService(endpoint, site).setServiceParent(service)
    return service
