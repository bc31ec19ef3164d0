"""
In-memory doubles for the unit tests: an upstream and an HTTP agent whose
answers the test controls, an HTTP connection to a resource over a
StringTransport, and the log events a test causes.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from blobserve.digest import Digest
from blobserve.store.database import ImmediateDatabase
from blobserve.store.files import DirectoryBlobStore
from blobserve.store.index import StoreIndex
from blobserve.store.layout import index_path
from blobserve.upstream.client import (
    BlobInfo,
    IUpstream,
    Listing,
    Manifest,
    ManifestInfo,
)

_T = TypeVar("_T")


def result_of(d: Deferred[_T]) -> _T:
    """
    The result a Deferred has already fired with.
    """
    results: list[_T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def failure_of(d: Deferred[Any]) -> Failure:
    """
    The failure a Deferred has already failed with.
    """
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    return failures[0]


def has_fired(d: Deferred[Any]) -> bool:
    """
    Whether C{d} has a result yet (which this leaves in place).
    """
    return bool(d.called)


def commit_blob(
    store: DirectoryBlobStore, data: bytes, media_type: str | None = None
) -> Path:
    """
    Put C{data} in C{store} (whose C{run_blocking} is L{run_now}) as a
    committed blob, and return where it lies.
    """
    digest = Digest.of(data)
    temporary = store.create_temporary(digest)
    temporary.write(data)
    result_of(store.commit(temporary, media_type))
    temporary.close()
    return Path(store.path_for(digest))


def open_descriptors(under: Path | str) -> list[str]:
    """
    The files under C{under}, other than a store's index, that this process
    has open: a leaked reader or temporary shows here.
    """
    targets = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(under)) and "index.sqlite" not in target:
            targets.append(target)
    return sorted(targets)


def store_at(
    root: Path | str,
    run_blocking: Callable[..., Deferred[Any]] | None = None,
    clock: Clock | None = None,
) -> DirectoryBlobStore:
    """
    A store in C{root} whose blocking work, and its index's, runs at once in
    this thread, with its index loaded.
    """
    index = StoreIndex(
        str(root), ImmediateDatabase(index_path(str(root))), clock or Clock()
    )
    store = DirectoryBlobStore(str(root), index, run_blocking or run_now)
    result_of(index.load())
    return store


class HeldDatabase(ImmediateDatabase):
    """
    A database whose work waits until the test lets it run.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.held: list[tuple[Any, Deferred[Any]]] = []

    def run(self, work: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((work, d))
        return d

    def release(self) -> None:
        while self.held:
            work, d = self.held.pop(0)
            super().run(work).chainDeferred(d)


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    A C{run_blocking} for the store that runs the call at once, in this thread.
    """
    return maybeDeferred(f, *args)


@implementer(IResponse)
@define
class FakeResponse:
    """
    A 200 response whose body the test delivers through L{protocol}.
    """

    length: Any = UNKNOWN_LENGTH
    code: int = 200
    phrase: bytes = b"OK"
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    headers: Headers = field(factory=Headers)
    previousResponse: IResponse | None = None
    request: Any = None
    protocol: IProtocol | None = None
    transport: StringTransport = field(factory=StringTransport)

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@implementer(IUpstream)
@define
class FakeUpstream:
    """
    An upstream that records what it is asked and answers with Deferreds the
    test fires.
    """

    fetches: list[tuple[str, Digest, Deferred[IResponse]]] = field(factory=list)
    stats: list[tuple[str, Digest]] = field(factory=list)
    offsets: list[int] = field(factory=list)
    #: The end offsets of ranges asked for (None: up to the blob's end).
    ends: list[int | None] = field(factory=list)
    cancelled: list[Digest] = field(factory=list)
    size: int | None = None
    refusal: Exception | None = None
    stat_answer: Deferred[BlobInfo] | None = None
    manifest_fetches: list[tuple[str, str, list[str], Deferred[Manifest]]] = field(
        factory=list
    )
    manifest_stats: list[tuple[str, str, list[str], Deferred[ManifestInfo]]] = field(
        factory=list
    )
    tags_fetches: list[tuple[str, int | None, str | None, Deferred[Listing]]] = field(
        factory=list
    )
    referrers_fetches: list[tuple[str, Digest, str | None, Deferred[Listing]]] = field(
        factory=list
    )
    base_url: str = "https://upstream.test"

    def fetch_tags(
        self, name: str, n: int | None, last: str | None
    ) -> Deferred[Listing]:
        d: Deferred[Listing] = Deferred()
        self.tags_fetches.append((name, n, last, d))
        return d

    def fetch_referrers(
        self, name: str, digest: Digest, artifact_type: str | None
    ) -> Deferred[Listing]:
        d: Deferred[Listing] = Deferred()
        self.referrers_fetches.append((name, digest, artifact_type, d))
        return d

    def fetch_blob(
        self, name: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred(lambda _: self.cancelled.append(digest))
        self.fetches.append((name, digest, d))
        self.offsets.append(offset)
        self.ends.append(end)
        if self.refusal is not None:
            d.errback(self.refusal)
        return d

    def fetch_manifest(
        self, name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[Manifest]:
        d: Deferred[Manifest] = Deferred()
        self.manifest_fetches.append((name, reference, list(accept), d))
        return d

    def stat_manifest(
        self, name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[ManifestInfo]:
        d: Deferred[ManifestInfo] = Deferred()
        self.manifest_stats.append((name, reference, list(accept), d))
        return d

    def stat_blob(self, name: str, digest: Digest) -> Deferred[BlobInfo]:
        self.stats.append((name, digest))
        if self.stat_answer is not None:
            return self.stat_answer
        return succeed(BlobInfo(self.size))


class ClientTransport(StringTransport):
    """
    A server's transport to one client, in memory: it tells an abort from an
    orderly close and, like a real socket, pauses its producer once more than
    C{buffer_limit} bytes wait to be sent.
    """

    aborted = False
    buffer_limit: int | None = None
    _sent = 0
    #: How many times the client has read everything (L{drain}).
    drains = 0

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def write(self, data: bytes) -> None:
        super().write(data)
        waiting = len(self.io.getvalue()) - self._sent
        if (
            self.buffer_limit is not None
            and waiting > self.buffer_limit
            and self.producer is not None
            and self.producerState == "producing"
        ):
            self.producerState = "paused"
            self.producer.pauseProducing()

    def drain(self) -> None:
        """
        Act as if the client read everything: resume the producer.
        """
        self.drains += 1
        self._sent = len(self.io.getvalue())
        if self.producer is not None and self.producerState == "paused":
            self.producerState = "producing"
            self.producer.resumeProducing()


@define
class Connection:
    """
    One client connection to a site, in memory.
    """

    channel: Any
    transport: ClientTransport

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: blobserve"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """
        The status, headers and raw body written so far.
        """
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers, body

    def disconnect(self) -> None:
        self.channel.connectionLost(Failure(ConnectionLost()))


def connect(resource: IResource) -> Connection:
    """
    Connect a new client to a site serving C{resource}.
    """
    site = Site(resource, timeout=None)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = ClientTransport()
    channel.makeConnection(transport)
    return Connection(channel, transport)


@implementer(IAgent)
@define
class ControlledAgent:
    """
    An HTTP agent whose requests stay unanswered until the test answers them.
    Cancelling one fails it with what C{cancelled_as} makes: by default what
    Twisted's agent fails with while it waits for the response,
    C{ResponseNeverReceived}, not C{CancelledError}.
    """

    requests: list[tuple[bytes, bytes, Headers, Deferred[IResponse]]] = field(
        factory=list
    )
    #: The URIs of the requests cancelled.
    cancelled: list[bytes] = field(factory=list)
    cancelled_as: Callable[[], Exception] = lambda: ResponseNeverReceived(
        [Failure(CancelledError())]
    )

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        def cancel(d: Deferred[IResponse]) -> None:
            self.cancelled.append(uri)
            d.errback(self.cancelled_as())

        d: Deferred[IResponse] = Deferred(cancel)
        self.requests.append((method, uri, headers or Headers(), d))
        return d


@implementer(ILogObserver)
@define(eq=False)
class LoggedEvents:
    """
    The Twisted log events emitted while it is in use (C{with}).
    """

    events: list[dict[str, Any]] = field(factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def __enter__(self) -> LoggedEvents:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        globalLogPublisher.removeObserver(self)

    def failures(self) -> list[Failure]:
        """
        The failures logged so far, counting unhandled errors in Deferreds
        that are garbage now.
        """
        gc.collect()
        return [event["log_failure"] for event in self.events if "log_failure" in event]

    def messages(self) -> list[str]:
        return [formatEvent(event) for event in self.events]
