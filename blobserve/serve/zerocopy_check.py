"""
L{ZeroCopy}: lets responses go out with C{sendfile} only once a start-up
self-test has shown, with the running reactor and Twisted, that what
L{blobserve.serve.zerocopy} relies on holds: a file sent through a connection's
sink between two writes through its transport arrives between them. Until
the test has passed, and for good if it failed, every response is read and
written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from socket import SO_SNDBUF, SOL_SOCKET, socket
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from blobserve.oneshot import OneShotEvent
from blobserve.serve.zerocopy import ConnectionSink, IZeroCopySink, SocketSink
from blobserve.store.files import BlobReader

log = Logger()

#: Seconds the start-up self-test may take before sendfile stays off.
SELF_TEST_TIMEOUT = 5.0


class ZeroCopy(Service):
    """
    Whether this process sends response bodies with C{sendfile}: only once
    a self-test has passed with the running Twisted, never before, and
    never if it failed.

    The self-test runs when the service starts, without holding the start
    up: responses that begin before it has passed are read and written.
    """

    def __init__(self, check: Callable[[], Deferred[None]]) -> None:
        """
        @param check: the self-test, such as L{self_test}: its Deferred fires
            if C{sendfile} is safe here, and fails with the reason if not.
            Cancelling it closes whatever it opened.
        """
        self._check = check
        self._testing: Deferred[None] | None = None
        self._on = False
        self._checked: OneShotEvent[bool] = OneShotEvent()

    def sink_for(self, request: Request) -> IZeroCopySink | None:
        """
        Where C{request}'s body may go with C{sendfile} (see
        L{SocketSink.under}) once the self-test has passed; L{None} until
        then, and for good if it failed.
        """
        if not self._on:
            return None
        return SocketSink.under(request)

    def checked(self) -> Deferred[bool]:
        """
        Fire once the self-test has ended, with whether C{sendfile} is on
        (L{False} if the service stopped first).
        """
        return self._checked.observe()

    def startService(self) -> None:
        super().startService()
        if self._testing is None and not self._checked.happened:
            testing = maybeDeferred(self._check)
            self._testing = testing
            testing.addBoth(self._tested)

    def stopService(self) -> Deferred[None]:
        """
        Stop a self-test still running, and fire once it has closed whatever
        it opened.
        """
        super().stopService()
        if self._testing is None:
            return succeed(None)
        stopped = self._checked.observe().addCallback(lambda _: None)
        self._testing.cancel()
        return stopped

    def _tested(self, result: object) -> None:
        self._testing = None
        if isinstance(result, Failure):
            if self.running:
                log.warn(
                    "sendfile is off, every response is read and written:"
                    " its self-test failed ({why})",
                    why=_why(result),
                )
            self._checked.succeed_with(False)
            return
        self._on = True
        log.info("sendfile is on: its self-test passed")
        self._checked.succeed_with(True)


class SelfTestFailed(Exception):
    """
    Bytes sent with a sink between two writes through a transport did not
    arrive between them, or the transport had no sink.
    """


#: What the self-test writes through the transport before and after the
#: file: a response's headers, and the next response on the connection.
#: The file is larger than what a socket with L{_SEND_BUFFER} and a peer
#: that has read nothing take, so that the socket fills.
_FILE_SIZE = 1024 * 1024
_PIECE = 64 * 1024
_PREFIX = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _FILE_SIZE
_SUFFIX = b"HTTP/1.1 304 Not Modified\r\n\r\n"

#: The self-test's socket's send buffer (the kernel doubles it), small so
#: that it fills soon.
_SEND_BUFFER = 16 * 1024

#: Seconds the self-test waits for its connection and port to close.
_CLOSE_TIMEOUT = 1.0


def self_test(
    reactor: IReactorTCP,
    clock: IReactorTime,
    sink_under: Callable[[object], IZeroCopySink | None] = ConnectionSink.under,
    timeout: float = SELF_TEST_TIMEOUT,
) -> Deferred[None]:
    """
    Check, over a real loopback connection with the running reactor and
    Twisted, what the socket sink relies on: bytes written through the
    transport (as a response's headers) and flushed, then a file sent with
    the sink of C{sink_under} once the transport holds nothing, then bytes
    written through the transport again, arrive in that order and nothing
    else does; and a producer the sink pauses to wait for room in the socket
    is resumed by the reactor.

    @return: fires once they did, and the connection and listening port are
        closed. Fails with L{SelfTestFailed} if the bytes came otherwise or
        the transport had no sink, L{TimeoutError} after C{timeout} seconds,
        or whatever else went wrong. Cancelling it closes what it opened.
    """
    started: Deferred[None] = Deferred()
    testing = started.addCallback(
        lambda _: Deferred.fromCoroutine(_self_test(reactor, clock, sink_under))
    )
    # The deadline first: a clock that cannot keep it fails before anything
    # is opened.
    testing.addTimeout(timeout, clock)
    started.callback(None)
    return testing


async def _self_test(
    reactor: IReactorTCP,
    clock: IReactorTime,
    sink_under: Callable[[object], IZeroCopySink | None],
) -> None:
    with tempfile.TemporaryFile() as file:
        # A piece at a time: the self-test holds no more than a piece of the
        # file, sent or received, so the process's peak memory stays its own.
        for _ in range(_FILE_SIZE // _PIECE):
            file.write(os.urandom(_PIECE))
        file.flush()
        reader = BlobReader(os.dup(file.fileno()))
    server = _FirstConnection()
    client = _Peer(_Expected(reader))
    port: IListeningPort | None = None
    try:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(server)
        address = cast(IPv4Address, port.getHost())
        await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(
            _Quiet(client)
        )
        # The client reads nothing until the socket is full.
        cast(IPushProducer, client.transport).pauseProducing()
        await server.peer.made
        transport = server.peer.transport
        assert transport is not None
        sink = sink_under(transport)
        if sink is None:
            raise SelfTestFailed(
                f"no sink for a loopback connection, {_layers(transport)}"
            )
        handle = cast(socket, cast(ISystemHandle, transport).getHandle())
        handle.setsockopt(SOL_SOCKET, SO_SNDBUF, _SEND_BUFFER)
        waiting = _Waiting()
        consumer = cast(IConsumer, transport)
        consumer.registerProducer(waiting, True)
        transport.write(_PREFIX)
        sink.flush()
        sent = waits = 0
        while sent < _FILE_SIZE:
            taken = sink.send(reader, sent, _FILE_SIZE - sent)
            sent += taken
            if taken:
                continue
            # The socket is full: the producer waits, paused, until the
            # reactor finds room once the client reads.
            resumed = waiting.resumed()
            if not sink.wait_for_room():
                raise SelfTestFailed("the sink cannot have a producer wait for room")
            waits += 1
            cast(IPushProducer, client.transport).resumeProducing()
            await resumed
        if not waits:
            raise SelfTestFailed("the socket never filled")
        consumer.unregisterProducer()
        transport.write(_SUFFIX)
        transport.loseConnection()
        received = await client.lost
        length = len(_PREFIX) + _FILE_SIZE + len(_SUFFIX)
        if received != length or client.first_difference is not None:
            same = min(received, length)
            if client.first_difference is not None:
                same = client.first_difference
            raise SelfTestFailed(
                f"{received} bytes arrived for {length},"
                f" only the first {same} as they were sent"
            )
    finally:
        reader.close()
        await _close(clock, port, (server.peer, client))


class _Expected:
    """
    What the self-test's client should receive: L{_PREFIX}, the file, then
    L{_SUFFIX}, read a piece at a time.
    """

    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader

    def at(self, offset: int, size: int) -> bytes:
        """
        The C{size} bytes expected from C{offset} (fewer at the end).
        """
        pieces = []
        end = offset + size
        file_start = len(_PREFIX)
        file_end = file_start + _FILE_SIZE
        if offset < file_start:
            pieces.append(_PREFIX[offset:end])
        if offset < file_end and end > file_start:
            start = max(offset, file_start)
            pieces.append(
                self._reader.read(start - file_start, min(end, file_end) - start)
            )
        if end > file_end:
            pieces.append(_SUFFIX[max(offset, file_end) - file_end : end - file_end])
        return b"".join(pieces)


class _Peer(Protocol):
    """
    One end of the self-test's connection: compares what arrives with what
    is expected, and tells when it is connected and, with how many bytes
    arrived, when it is gone.

    @ivar first_difference: where the bytes that arrived first differed
        from those expected, if they did.
    """

    def __init__(self, expected: _Expected | None = None) -> None:
        self._expected = expected
        self._received = 0
        self.first_difference: int | None = None
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._expected is not None and self.first_difference is None:
            wanted = self._expected.at(self._received, len(data))
            if wanted != data:
                self.first_difference = self._received + next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(wanted, data, strict=False))
                        if a != b
                    ),
                    min(len(wanted), len(data)),
                )
        self._received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(self._received)


@implementer(IPushProducer)
class _Waiting:
    """
    A producer with nothing to send, that tells when it is resumed.
    """

    def __init__(self) -> None:
        self._resumed: Deferred[None] | None = None

    def resumed(self) -> Deferred[None]:
        """
        Fire when this producer is next resumed.
        """
        self._resumed = Deferred()
        return self._resumed

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        pass


class _Refused(Protocol):
    """
    Closes at once a connection that is not the self-test's own.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _Quiet(Factory):
    """
    Builds the one protocol it is given, and logs nothing: the self-test
    should not fill the start-up log.
    """

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


class _FirstConnection(WrappingFactory):
    """
    Serves the first connection with one L{_Peer}, through a wrapper as the
    registry's site does, and closes any other.
    """

    noisy = False

    def __init__(self) -> None:
        self.peer = _Peer()
        super().__init__(_Quiet(self.peer))
        self._taken = False

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper:
        if self._taken:
            return self.protocol(self, _Refused())
        self._taken = True
        return self.protocol(self, self.peer)


async def _close(
    clock: IReactorTime, port: IListeningPort | None, peers: Iterable[_Peer]
) -> None:
    """
    Close the self-test's connection and port, and wait until they are
    closed, for at most L{_CLOSE_TIMEOUT} seconds.
    """
    closing: list[Deferred[Any]] = []
    for peer in peers:
        if peer.made.called and not peer.lost.called:
            cast(ITCPTransport, peer.transport).abortConnection()
            closing.append(peer.lost)
    if port is not None:
        closing.append(maybeDeferred(port.stopListening))
    await DeferredList(closing, consumeErrors=True).addTimeout(_CLOSE_TIMEOUT, clock)


def _layers(transport: object) -> str:
    """
    Name the transports from C{transport} down, to say which one was not
    recognised.
    """
    names: list[str] = []
    while transport is not None and len(names) < 8:
        names.append(type(transport).__qualname__)
        transport = getattr(transport, "transport", None)
    return " over ".join(names)


def _why(reason: Failure) -> str:
    """
    Why the self-test failed, in a few words.
    """
    if reason.check(SelfTestFailed):
        return reason.getErrorMessage()
    if reason.check(TimeoutError):
        return "it took too long"
    return f"{type(reason.value).__name__}: {reason.getErrorMessage()}"
