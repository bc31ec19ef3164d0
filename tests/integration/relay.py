"""
A TCP relay between blobserve and the real upstream registry, on loopback.

It makes the upstream the slow link (a per-connection rate limit), counts the
requests that pass through it, and can corrupt a response body in flight, so
the tests can watch what blobserve asks of its upstream and how it copes.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")


class Relay(Factory):
    """
    Listens on loopback and relays every connection to the upstream.

    @ivar rate: bytes per second each connection may carry from the upstream,
        or L{None} for no limit.
    @ivar corrupt_at: if set, the byte at this offset of every blob body the
        upstream sends is flipped on its way through.
    @ivar requests: C{(method, path)} of every request relayed, in order.
    """

    def __init__(
        self, reactor: Any, upstream_port: int, rate: float | None = None
    ) -> None:
        self.reactor = reactor
        self.upstream_port = upstream_port
        self.rate = rate
        self.corrupt_at: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self.open: set[_Inbound] = set()
        self.port = 0
        self._listening: IListeningPort | None = None

    def listen(self) -> int:
        """
        Start listening on a free loopback port, and return it.
        """
        self._listening = self.reactor.listenTCP(0, self, interface="127.0.0.1")
        address = self._listening.getHost()
        assert isinstance(address, IPv4Address)
        self.port = address.port
        return self.port

    def stop(self) -> None:
        """
        Stop listening and cut every open connection: the upstream is gone.
        """
        if self._listening is not None:
            self._listening.stopListening()
            self._listening = None
        for inbound in list(self.open):
            inbound.transport.abortConnection()  # type: ignore[union-attr]

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        return _Inbound(self)

    def count(self, method: str, path_suffix: str) -> int:
        """
        How many C{method} requests for a path ending in C{path_suffix} passed.
        """
        return sum(
            1 for m, path in self.requests if m == method and path.endswith(path_suffix)
        )


class _Inbound(Protocol):
    """
    blobserve's side of one relayed connection.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.outbound: _Outbound | None = None
        self._pending: list[bytes] = []
        self._head = b""
        self.latest_request: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        self.relay.open.add(self)
        factory = ClientFactory.forProtocol(lambda: _Outbound(self))
        self.relay.reactor.connectTCP("127.0.0.1", self.relay.upstream_port, factory)

    def upstream_connected(self, outbound: _Outbound) -> None:
        self.outbound = outbound
        for data in self._pending:
            outbound.transport.write(data)  # type: ignore[union-attr]
        self._pending = []

    def dataReceived(self, data: bytes) -> None:
        self._note_requests(data)
        if self.outbound is None:
            self._pending.append(data)
        else:
            self.outbound.transport.write(data)  # type: ignore[union-attr]

    def _note_requests(self, data: bytes) -> None:
        # blobserve sends requests without bodies: each head ends a request.
        self._head += data
        while b"\r\n\r\n" in self._head:
            head, self._head = self._head.split(b"\r\n\r\n", 1)
            match = _REQUEST_LINE.match(head)
            if match is not None:
                method, path = match.group(1).decode(), match.group(2).decode()
                self.relay.requests.append((method, path))
                self.latest_request = (method, path)
                if self.outbound is not None:
                    self.outbound.new_response(method, path)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.open.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()  # type: ignore[union-attr]


class _Outbound(Protocol):
    """
    The upstream's side of one relayed connection: throttled, maybe corrupting.
    """

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound
        self.relay = inbound.relay
        self._body_offset: int | None = None
        self._head = b""
        self._corrupting = False

    def connectionMade(self) -> None:
        if self.inbound.latest_request is not None:
            self.new_response(*self.inbound.latest_request)
        self.inbound.upstream_connected(self)

    def new_response(self, method: str, path: str) -> None:
        self._corrupting = method == "GET" and "/blobs/" in path
        self._body_offset = None
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        data = self._maybe_corrupt(data)
        self.inbound.transport.write(data)  # type: ignore[union-attr]
        if self.relay.rate is not None:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.relay.reactor.callLater(len(data) / self.relay.rate, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and self.connected:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _maybe_corrupt(self, data: bytes) -> bytes:
        if not self._corrupting or self.relay.corrupt_at is None:
            return data
        start = 0
        if self._body_offset is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return data
            # Where the body starts within this piece of data.
            start = len(data) - (len(self._head) - end - 4)
            self._body_offset = 0
        index = self.relay.corrupt_at - self._body_offset + start
        self._body_offset += len(data) - start
        if start <= index < len(data):
            corrupted = bytearray(data)
            corrupted[index] ^= 0xFF
            return bytes(corrupted)
        return data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.inbound.transport.loseConnection()  # type: ignore[union-attr]
