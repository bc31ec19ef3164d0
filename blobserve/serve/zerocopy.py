"""
L{SocketSink}: sends a range of a file straight from the page cache to a
response's socket with C{sendfile(2)}, when it is safe to go around Twisted's
transport.

Twisted's transports copy every byte twice in this process (read from the
file into a string, then the string into the socket) and have no
C{sendfile}. A sink is used only between two writes through the transport, at
a moment when the transport has nothing buffered, so the bytes it sends follow
everything written before them, and whatever is written after them follows
them. It never waits: when the socket is full it sends what fits and says so,
and the caller has the sink pause its producer until the socket has room
again, as the transport would after a chunk that filled its buffer (or, where
the sink cannot, writes its next chunk through the transport, which waits).

Going around the transport relies on private parts of Twisted: how a TCP
transport takes bytes and where it keeps those it has not sent yet. What the
sink relies on is checked before each use, and anything unfamiliar means no
sink: a wrapper or connection with a C{write} of its own (on its class or,
as Twisted's TLS transport does, on the instance), a buffer kept elsewhere.
L{blobserve.serve.zerocopy_check} tests, at start-up, that what it relies on holds.
"""

from __future__ import annotations

import os
from typing import TypeGuard, cast

from attrs import define
from twisted.internet.interfaces import IPushProducer
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import Interface, implementer

from blobserve.store.files import BlobReader

log = Logger()


class IZeroCopySink(Interface):
    """
    Somewhere a response's bytes can be sent from a file without passing
    through this process.
    """

    def send(reader: BlobReader, offset: int, count: int) -> int:
        """
        Send up to C{count} bytes of C{reader}'s file from C{offset}, if the
        transport has nothing buffered that would have to go first.

        @return: how many bytes went: C{count}, fewer when the socket took
            no more or the file ended, none when the transport holds data,
            the socket takes nothing now, the file has no bytes at
            C{offset}, or it failed (the transport's own next write then
            finds the failure and ends the connection as usual).
        """

    def wait_for_room() -> bool:
        """
        When the last L{send} found the socket full and the transport holds
        nothing, have the response's producer paused now and resumed once
        the socket has room again, as the transport does once its buffer
        fills, without a chunk written through the transport to wait on.

        @return: whether the producer is paused and will be resumed; if not,
            the caller writes through the transport, which waits instead.
        """

    def flush() -> None:
        """
        Have the transport write what it holds now, as far as the socket
        takes it, rather than once the reactor next finds the socket
        writable: so that the bytes sent next may go with the sink at once.
        It does nothing where writing the transport's bytes could do more
        than write them (resume a producer, end the connection).
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
    # Whether the last send found the socket taking nothing: only then is
    # there room to wait for (sendfile taking nothing may also mean that the
    # file ended early, which only a read tells).
    _full: bool = False

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

    def _writable(self) -> bool:
        """
        Whether the connection still takes bytes: not closing, not closed,
        not broken.
        """
        connection = self._connection
        return not (
            self._broken
            or connection.disconnecting
            or connection.disconnected
            or getattr(connection, "_aborting", False)
        )

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        connection = self._connection
        self._full = False
        if not self._writable() or _buffered(connection):
            return 0
        try:
            return os.sendfile(connection.fileno(), reader.fileno(), offset, count)
        except BlockingIOError:
            self._full = True
            return 0
        except OSError:
            self._broken = True
            return 0

    def wait_for_room(self) -> bool:
        connection = self._connection
        producer = connection.producer
        if (
            not self._full
            or not self._writable()
            or _buffered(connection)
            or producer is None
            or not connection.streamingProducer
            or connection.producerPaused
        ):
            return False
        # What the transport does when its buffer fills: pause its producer
        # (the HTTP channel, which pauses the response's) and watch for the
        # socket to take bytes. Once it does, the reactor's doWrite finds
        # the buffer empty and resumes the producer it paused.
        connection.producerPaused = True
        cast(IPushProducer, producer).pauseProducing()
        connection.startWriting()
        return True

    def flush(self) -> None:
        connection = self._connection
        if (
            not self._writable()
            or getattr(connection, "_writeDisconnecting", True)
            or connection.producerPaused
            or (connection.producer is not None and not connection.streamingProducer)
            or not _buffered(connection)
        ):
            return
        # What the reactor does when the socket is writable. Once the buffer
        # is empty it only stops watching for that: the checks above leave
        # no producer to resume and no close to carry out. A failure stays
        # for the reactor's own next call, which ends the connection.
        connection.doWrite()


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

    def wait_for_room(self) -> bool:
        return self._socket.wait_for_room()

    def flush(self) -> None:
        self._socket.flush()


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
