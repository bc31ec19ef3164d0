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
and the caller writes its next chunk through the transport, which waits for
the socket and resumes the caller's producer once it has drained.
"""

from __future__ import annotations

import os

from attrs import define
from twisted.internet.tcp import Connection
from twisted.web.server import Request
from zope.interface import Interface, implementer

from blobserve.storage import BlobReader


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
class SocketSink:
    """
    The socket under one HTTP response, for bytes that need no framing.
    """

    _request: Request
    _connection: Connection

    @classmethod
    def under(cls, request: Request) -> SocketSink | None:
        """
        The sink for C{request}'s body, if its bytes may go to the socket as
        they are: the connection is plain TCP (or a UNIX socket), not TLS, and
        the response is not chunked. L{None} otherwise.
        """
        if request.chunked or request.method == b"HEAD":
            return None
        transport = request.channel.transport if request.channel else None
        # Past wrappers such as policies.ProtocolWrapper, to the socket.
        while transport is not None and not isinstance(transport, Connection):
            transport = getattr(transport, "transport", None)
        if transport is None or transport.TLS or not _can_tell_buffered(transport):
            return None
        return cls(request, transport)

    def send(self, reader: BlobReader, offset: int, count: int) -> int:
        connection = self._connection
        if connection.disconnecting or connection.disconnected or _buffered(connection):
            return 0
        try:
            sent = os.sendfile(connection.fileno(), reader.fileno(), offset, count)
        except OSError:
            return 0
        self._request.sentLength += sent
        return sent


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
