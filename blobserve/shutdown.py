"""
How blobserve stops: its services one after another, the last started
first; and, once it no longer listens, its clients and downloads: responses
in progress run for a grace period, the rest are cut, downloads whose bytes
have all arrived are committed, and the others kept for the next run.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from blobserve.fetch.inflight import IInFlightTable
from blobserve.web.site import IConnections

log = Logger()


class StopInOrder(MultiService):
    """
    A L{MultiService} whose children stop one at a time, the last started
    first, each once the one started after it has stopped (a plain
    L{MultiService} stops them all at once). So a service still has, while
    it stops, everything started before it: a download being committed has
    its store's index.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)

        async def stop_each() -> None:
            for service in reversed(list(self)):
                try:
                    await maybeDeferred(service.stopService)
                except Exception:
                    log.failure("{service} did not stop cleanly", service=service)

        return Deferred.fromCoroutine(stop_each())


class GracefulStop(Service):
    """
    Ends the clients' connections and the downloads when it stops: every
    connection closes once its response in progress is sent (idle ones at
    once), and those still open after C{grace} seconds are cut; then every
    download stops, a download whose bytes have all arrived once it is
    committed, the others keeping their bytes for the next run.

    In a L{StopInOrder}, it goes after what downloads need while they stop
    (the upstream connection pool, the store's index) and before the
    listener, so that it stops once nothing new can connect.
    """

    def __init__(
        self,
        connections: IConnections,
        downloads: IInFlightTable,
        grace: float,
        clock: IReactorTime,
    ) -> None:
        self._connections = connections
        self._downloads = downloads
        self._grace = grace
        self._clock = clock

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        log.info(
            "stopping: responses in progress have {grace:g}s to end", grace=self._grace
        )
        drained = self._connections.drain()
        if not drained.called:
            drained.addTimeout(self._grace, self._clock)
        try:
            await drained
        except TimeoutError:
            count = self._connections.cut()
            log.warn(
                "cut {count} connections still busy after {grace:g}s",
                count=count,
                grace=self._grace,
            )
        count = len(self._downloads)
        await self._downloads.stop_all()
        log.info("stopped cleanly; {count} downloads were running", count=count)
