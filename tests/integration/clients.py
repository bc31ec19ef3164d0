"""
Registry clients for the integration tests: they fetch a blob over a real
loopback connection and record what arrived, and when.
"""

from __future__ import annotations

import hashlib
import socket
import time

import treq
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from blobserve.oneshot import OneShotEvent


@define
class Fetch:
    """
    What one client saw of one response.

    @ivar error: why the body ended early, or L{None} if it ended cleanly.
    """

    status: int = 0
    headers: dict[str, str] = field(factory=dict)
    declared_length: int | None = None
    length: int = 0
    sha256: str = ""
    #: The first few KiB of the body, for error bodies.
    opening: bytes = b""
    error: Failure | None = None
    started_at: float = 0.0
    first_byte_at: float | None = None
    done_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.done_at is not None


class _BodyRecorder(Protocol):
    def __init__(self, fetch: Fetch, stop_after: int | None) -> None:
        self.fetch = fetch
        self.stop_after = stop_after
        self.hasher = hashlib.sha256()
        self.received: list[tuple[int, Deferred[None]]] = []
        self.done: OneShotEvent[Fetch] = OneShotEvent()

    def when_received(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.received.append((count, d))
        self._notify()
        return d

    def dataReceived(self, data: bytes) -> None:
        if self.fetch.first_byte_at is None:
            self.fetch.first_byte_at = time.monotonic()
        self.hasher.update(data)
        if self.fetch.length < 4096:
            self.fetch.opening += data[: 4096 - self.fetch.length]
        self.fetch.length += len(data)
        self._notify()
        if self.stop_after is not None and self.fetch.length >= self.stop_after:
            # A client that goes away: drop the connection mid-body.
            self.transport.stopProducing()  # type: ignore[union-attr]

    def _notify(self) -> None:
        ready = [d for count, d in self.received if self.fetch.length >= count]
        self.received = [(c, d) for c, d in self.received if d not in ready]
        for d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.fetch.done_at = time.monotonic()
        self.fetch.sha256 = self.hasher.hexdigest()
        if not reason.check(ResponseDone):
            self.fetch.error = reason
        self.done.succeed_with(self.fetch)


@define
class Client:
    """
    Starts fetches that the test can follow while they run.
    """

    pool: HTTPConnectionPool

    def get(
        self,
        url: str,
        stop_after: int | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> _Download:
        fetch = Fetch(started_at=time.monotonic())
        recorder = _BodyRecorder(fetch, stop_after)

        def got(response: treq.response._Response) -> None:
            fetch.status = response.code
            if response.length is not UNKNOWN_LENGTH:
                fetch.declared_length = response.length
            fetch.headers = {
                k.decode().lower(): v[0].decode()
                for k, v in response.headers.getAllRawHeaders()
            }
            response.deliverBody(recorder)

        def failed(reason: Failure) -> None:
            fetch.error = reason
            recorder.done.succeed_with(fetch)

        request_headers = Headers()
        for key, value in (headers or {}).items():
            request_headers.addRawHeader(key, value)
        d = treq.request(
            method, url, headers=request_headers, pool=self.pool, unbuffered=True
        )
        d.addCallbacks(got, failed)
        return _Download(recorder)


@define
class _Download:
    _recorder: _BodyRecorder

    @property
    def fetch(self) -> Fetch:
        return self._recorder.fetch

    def when_received(self, count: int) -> Deferred[None]:
        """
        Fire once at least C{count} body bytes have arrived.
        """
        return self._recorder.when_received(count)

    def finished(self) -> Deferred[Fetch]:
        return self._recorder.done.observe()


def stalled_client(port: int, path: str) -> socket.socket:
    """
    A client that asks for C{path} and then never reads: its socket's receive
    buffer is small and fills at once.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s
