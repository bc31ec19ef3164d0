"""
The single-flight table: at most one running L{Download} per digest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import Interface, implementer

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.upstream.client import IUpstream

log = Logger()


class DownloadFactory(Protocol):
    """
    Makes a download (not yet started) of C{digest} from repository C{name}
    of C{upstream}, which is the registry C{registry}.
    """

    def __call__(
        self,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        *,
        registry: str | None,
    ) -> Download: ...


class IInFlightTable(Interface):
    """
    The downloads running now, by digest.
    """

    def join(
        name: str, digest: Digest, upstream: IUpstream, registry: str | None = None
    ) -> Download:
        """
        The running download of C{digest}; if there is none, start one from
        repository C{name} of C{upstream} (the registry C{registry}, as
        C{--upstream} names it) and return it. However many callers join, a
        digest is fetched once at a time.
        """

    def stop_all() -> Deferred[None]:
        """
        Stop every running download, keeping what each has for the next run
        (see L{Download.stop_and_keep}), and fire once all have ended.
        """

    def get(digest: Digest) -> Download | None:
        """
        The running download of C{digest}, or L{None}; never starts one.
        """

    def __len__() -> int:
        """
        How many downloads are running.
        """

    def __iter__() -> Iterator[Download]:
        """
        The downloads running now.
        """


@implementer(IInFlightTable)
class InFlightTable:
    """
    An L{IInFlightTable} in memory. A download leaves the table when it ends,
    committed or failed, so the next request for its digest finds the store or
    starts afresh.
    """

    def __init__(self, create: DownloadFactory) -> None:
        """
        @param create: makes a download (not yet started) of a digest from a
            repository of an upstream.
        """
        self._create = create
        self._downloads: dict[Digest, Download] = {}

    def join(
        self,
        name: str,
        digest: Digest,
        upstream: IUpstream,
        registry: str | None = None,
    ) -> Download:
        download = self._downloads.get(digest)
        if download is not None:
            return download
        download = self._create(upstream, name, digest, registry=registry)
        # In the table before it starts: a download that ends at once still
        # leaves the table.
        self._downloads[digest] = download
        download.when_done().addCallback(lambda _: self._forget(download))
        download.start()
        return download

    def get(self, digest: Digest) -> Download | None:
        return self._downloads.get(digest)

    def stop_all(self) -> Deferred[None]:
        stopped = [download.stop_and_keep() for download in self]
        return gatherResults(stopped).addCallback(lambda _: None)

    def __len__(self) -> int:
        return len(self._downloads)

    def __iter__(self) -> Iterator[Download]:
        return iter(list(self._downloads.values()))

    def _forget(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]
