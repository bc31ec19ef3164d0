"""
A TCP relay between blobserve and the real upstream registry, on loopback.

It makes the upstream the slow link (a per-connection rate limit), counts the
requests and blob bytes that pass through it, and injects faults into blob
downloads: a corrupted byte, a connection cut or stalled at some offset, a
C{Range} header the upstream never sees. The tests watch what blobserve asks
of its upstream and how it copes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from attrs import frozen
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
_RANGE_HEADER = re.compile(rb"\r\nrange:[^\r]*", re.IGNORECASE)


@frozen
class Fault:
    """
    What to do to one blob download: C{"cut"} the connection or C{"stall"} it
    (send nothing more, keep it open) once C{offset} body bytes went through.
    """

    kind: str
    offset: int


class Relay(Factory):
    """
    Listens on loopback and relays every connection to the upstream.

    @ivar rate: bytes per second each connection may carry from the upstream,
        or L{None} for no limit.
    @ivar corrupt_at: if set, the byte at this offset of every blob body the
        upstream sends is flipped on its way through.
    @ivar faults: faults for the next blob downloads, one each, in order.
    @ivar ignore_range: strip C{Range} headers, as an upstream that ignores
        them would (it answers 200 with the whole blob).
    @ivar requests: C{(method, path)} of every request relayed, in order.
    @ivar ranges: the C{Range} header of each of those requests, if any.
    @ivar body_bytes: blob body bytes relayed, by path.
    @ivar most_open: the most connections that were open at once.
    """

    def __init__(
        self, reactor: Any, upstream_port: int, rate: float | None = None
    ) -> None:
        self.reactor = reactor
        self.upstream_port = upstream_port
        self.rate = rate
        self.corrupt_at: int | None = None
        self.faults: list[Fault] = []
        self.ignore_range = False
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[bytes | None] = []
        self.body_bytes: dict[str, int] = defaultdict(int)
        self.connections = 0
        self.open: set[_Inbound] = set()
        self.most_open = 0
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
        self._buffer = b""
        self._waiting: list[tuple[bytes, str, str]] = []

    def connectionMade(self) -> None:
        self.relay.open.add(self)
        self.relay.most_open = max(self.relay.most_open, len(self.relay.open))
        factory = ClientFactory.forProtocol(lambda: _Outbound(self))
        self.relay.reactor.connectTCP("127.0.0.1", self.relay.upstream_port, factory)

    def upstream_connected(self, outbound: _Outbound) -> None:
        self.outbound = outbound
        for head, method, path in self._waiting:
            outbound.send(head, method, path)
        self._waiting = []

    def dataReceived(self, data: bytes) -> None:
        # blobserve sends requests without bodies: each head is a request.
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            match = _REQUEST_LINE.match(head)
            method, path = (
                ("", "")
                if match is None
                else (
                    match.group(1).decode(),
                    match.group(2).decode(),
                )
            )
            self.relay.requests.append((method, path))
            asked = _RANGE_HEADER.search(head)
            self.relay.ranges.append(
                None if asked is None else asked.group().split(b":", 1)[1].strip()
            )
            if self.relay.ignore_range:
                head = _RANGE_HEADER.sub(b"", head)
            head += b"\r\n\r\n"
            if self.outbound is None:
                self._waiting.append((head, method, path))
            else:
                self.outbound.send(head, method, path)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.open.discard(self)
        if self.outbound is not None:
            self.outbound.transport.loseConnection()  # type: ignore[union-attr]


class _Outbound(Protocol):
    """
    The upstream's side of one relayed connection: throttled, and faulty as
    the relay says.
    """

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound
        self.relay = inbound.relay
        self._blob_path: str | None = None
        self._fault: Fault | None = None
        self._head = b""
        self._body_offset: int | None = None
        self._stalled = False

    def connectionMade(self) -> None:
        self.inbound.upstream_connected(self)

    def send(self, head: bytes, method: str, path: str) -> None:
        """
        Send a request upstream; what comes back is its response.
        """
        blob = method == "GET" and "/blobs/" in path
        self._blob_path = path if blob else None
        self._fault = self.relay.faults.pop(0) if blob and self.relay.faults else None
        self._head = b""
        self._body_offset = None
        self.transport.write(head)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._stalled:
            return
        head, body = self._split(data)
        cut = False
        if body and self._blob_path is not None:
            body, cut = self._apply_faults(body)
            self.relay.body_bytes[self._blob_path] += len(body)
        self.inbound.transport.write(head + body)  # type: ignore[union-attr]
        if cut:
            # What was written still goes out (an abort would drop it), then
            # the connection ends mid-body.
            self.inbound.transport.loseConnection()  # type: ignore[union-attr]
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self.relay.rate is not None and not self._stalled:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.relay.reactor.callLater(len(data) / self.relay.rate, self._resume)

    def _split(self, data: bytes) -> tuple[bytes, bytes]:
        """
        Which part of C{data} is response head, which is body.
        """
        if self._body_offset is not None:
            return b"", data
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return data, b""
        body_length = len(self._head) - end - 4
        self._body_offset = 0
        split = len(data) - body_length
        return data[:split], data[split:]

    def _apply_faults(self, body: bytes) -> tuple[bytes, bool]:
        assert self._body_offset is not None
        start = self._body_offset
        self._body_offset += len(body)
        corrupt_at = self.relay.corrupt_at
        if corrupt_at is not None and start <= corrupt_at < self._body_offset:
            changed = bytearray(body)
            changed[corrupt_at - start] ^= 0xFF
            body = bytes(changed)
        fault = self._fault
        if fault is not None and fault.offset < self._body_offset:
            body = body[: max(fault.offset - start, 0)]
            self._fault = None
            if fault.kind == "stall":
                self._stalled = True
                return body, False
            return body, True
        return body, False

    def _resume(self) -> None:
        if self.transport is not None and self.connected and not self._stalled:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.inbound.transport.loseConnection()  # type: ignore[union-attr]
