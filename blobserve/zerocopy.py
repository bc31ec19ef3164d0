"""
L{SocketSink}: sends a range of a file straight from the page cache to a
response's socket with C{sendfile(2)}, when it is safe to go around Twisted's
transport; L{ZeroCopy}: allows it only once a self-test has shown it safe
with the running Twisted.

Twisted's transports copy every byte twice in this process (read from the
file into a string, then the string into the socket) and have no
C{sendfile}. A sink is used only between two writes through the transport, at
a moment when the transport has nothing buffered, so the bytes it sends follow
everything written before them, and whatever is written after them follows
them. It never waits: when the socket is full it sends what fits and says so,
and the caller writes its next chunk through the transport, which waits for
the socket and resumes the caller's producer once it has drained.

Going around the transport relies on private parts of Twisted: how a TCP
transport takes bytes and where it keeps those it has not sent yet. What the
sink relies on is checked before each use, and anything unfamiliar means no
sink: a wrapper or connection with a C{write} of its own (on its class or,
as Twisted's TLS transport does, on the instance), a buffer kept elsewhere.
At start-up L{ZeroCopy} sends a file between two writes through a transport
over a real loopback connection; until the bytes have arrived in order, and
for good if they did not, every response is read and written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard, cast

from attrs import define
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
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import Interface, implementer

from blobserve.oneshot import OneShotEvent
from blobserve.storage import BlobReader

log = Logger()

#: Seconds the start-up self-test may take before sendfile stays off.
SELF_TEST_TIMEOUT = 5.0


class IZeroCopySink(Interface):
    """
    Somewhere a response's bytes can be sent from a file without passing
    through this process.
    """

    def send(reader: BlobReader, offset: int, count: int) -> int:
        """
        Send up to C{count} bytes of C{reader}'s file from C{offset}, if the
        transport has nothing buffered that would have to go first.

        @return: how many bytes went: C{count}, fewer when the socket is full,
            none when the transport holds data, the socket takes nothing now,
            or it failed (the transport's own next write then finds the
            failure and ends the connection as usual).
        """


@implementer(IZeroCopySink)
@define
class ConnectionSink:
    """
    The socket of one TCP connection (or UNIX socket), for bytes sent between
    two writes through its transport.

    After a failure other than a full socket it sends nothing more: the
    transport's own writes carry the rest, or report the failure.
    """

    _connection: Connection
    _broken: bool = False

    @classmethod
    def under(cls, transport: object) -> ConnectionSink | None:
        """
        The sink for the connection under C{transport}, if it is plain TCP
        (or a UNIX socket), never TLS, under nothing but wrappers that pass
        writes through unchanged, and takes and keeps its bytes as the
        Twisted this was written for does. L{None} otherwise.
        """
        while _passes_writes_through(transport):
            transport = transport.transport
        if (
            not isinstance(transport, Connection)
            or transport.TLS
            or not _keeps_methods_of(transport, Connection, _CONNECTION_METHODS)
            or not _can_tell_buffered(transport)
        ):
            return None
        return cls(transport)

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        connection = self._connection
        if (
            self._broken
            or connection.disconnecting
            or connection.disconnected
            or getattr(connection, "_aborting", False)
            or _buffered(connection)
        ):
            return 0
        try:
            return os.sendfile(connection.fileno(), reader.fileno(), offset, count)
        except BlockingIOError:
            return 0
        except OSError:
            self._broken = True
            return 0


@implementer(IZeroCopySink)
@define
class SocketSink:
    """
    The socket under one HTTP response, for bytes that need no framing. What
    it sends counts as sent by the response.
    """

    _request: Request
    _socket: ConnectionSink

    @classmethod
    def under(cls, request: Request) -> SocketSink | None:
        """
        The sink for C{request}'s body, once its headers are written, if its
        bytes may go to the socket as they are: the response has a body, it
        is not chunked, and its connection has a L{ConnectionSink}. L{None}
        otherwise.
        """
        if (
            not request.startedWriting
            or request.chunked
            or request.method == b"HEAD"
            or request.code in NO_BODY_CODES
            or request.isSecure()
            or request.channel is None
        ):
            return None
        socket = ConnectionSink.under(request.channel.transport)
        if socket is None:
            return None
        return cls(request, socket)

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        sent = self._socket.send(reader, offset, count)
        self._request.sentLength += sent
        return sent


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
_FILE_SIZE = 64 * 1024
_PREFIX = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % _FILE_SIZE
_SUFFIX = b"HTTP/1.1 304 Not Modified\r\n\r\n"

#: Seconds between the self-test's tries while the transport holds bytes.
_RETRY_DELAY = 0.005

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
    transport (as a response's headers), then a file sent with the sink of
    C{sink_under} once the transport holds nothing, then bytes written
    through the transport again, arrive in that order and nothing else does.

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
    content = os.urandom(_FILE_SIZE)
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        reader = BlobReader(os.dup(file.fileno()))
    server = _FirstConnection()
    client = _Peer()
    port: IListeningPort | None = None
    try:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(server)
        address = cast(IPv4Address, port.getHost())
        await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(
            _Quiet(client)
        )
        await server.peer.made
        transport = server.peer.transport
        assert transport is not None
        sink = sink_under(transport)
        if sink is None:
            raise SelfTestFailed(
                f"no sink for a loopback connection, {_layers(transport)}"
            )
        transport.write(_PREFIX)
        sent = 0
        while sent < len(content):
            taken = sink.send(reader, sent, len(content) - sent)
            sent += taken
            if not taken:
                await deferLater(clock, _RETRY_DELAY)
        transport.write(_SUFFIX)
        transport.loseConnection()
        received = await client.lost
        expected = _PREFIX + content + _SUFFIX
        if received != expected:
            raise SelfTestFailed(_difference(expected, received))
    finally:
        reader.close()
        await _close(clock, port, (server.peer, client))


class _Peer(Protocol):
    """
    One end of the self-test's connection: keeps what arrives, and tells
    when it is connected and, with everything that arrived, when it is gone.
    """

    def __init__(self) -> None:
        self._received: list[bytes] = []
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(b"".join(self._received))


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


def _difference(expected: bytes, received: bytes) -> str:
    """
    Say how C{received} differs from C{expected}.
    """
    same = next(
        (i for i, (a, b) in enumerate(zip(expected, received, strict=False)) if a != b),
        min(len(expected), len(received)),
    )
    return (
        f"{len(received)} bytes arrived for {len(expected)},"
        f" only the first {same} as they were sent"
    )


def _why(reason: Failure) -> str:
    """
    Why the self-test failed, in a few words.
    """
    if reason.check(SelfTestFailed):
        return reason.getErrorMessage()
    if reason.check(TimeoutError):
        return "it took too long"
    return f"{type(reason.value).__name__}: {reason.getErrorMessage()}"


#: The methods through which a wrapper passes writes on, and through which
#: a connection takes bytes and sends them.
_WRAPPER_METHODS = ("write", "writeSequence")
_CONNECTION_METHODS = ("write", "writeSequence", "doWrite")


def _keeps_methods_of(thing: object, kind: type, names: tuple[str, ...]) -> bool:
    """
    Whether C{thing}'s methods called C{names} are those of C{kind}: neither
    its class nor the object itself has its own.
    """
    own = getattr(thing, "__dict__", {})
    return all(
        getattr(type(thing), name, None) is getattr(kind, name) and name not in own
        for name in names
    )


def _passes_writes_through(transport: object) -> TypeGuard[ProtocolWrapper]:
    """
    Whether C{transport} is a protocol wrapper that hands every write to the
    transport under it as it is, holding nothing back and watching nothing.
    """
    return isinstance(transport, ProtocolWrapper) and _keeps_methods_of(
        transport, ProtocolWrapper, _WRAPPER_METHODS
    )


def _buffered(connection: Connection) -> int:
    """
    How many bytes C{connection} holds that it has not yet written to its
    socket.
    """
    return len(connection.dataBuffer) - connection.offset + connection._tempDataLen


def _can_tell_buffered(connection: Connection) -> bool:
    """
    Whether C{connection} keeps its buffer where L{_buffered} looks for it:
    a Twisted that keeps it elsewhere gets no sink, rather than a wrong one.
    """
    return all(
        isinstance(getattr(connection, name, None), kind)
        for name, kind in (
            ("dataBuffer", bytes),
            ("offset", int),
            ("_tempDataLen", int),
        )
    )
