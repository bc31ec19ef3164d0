"""
The HTTP server factory: twisted.web's Site for the registry resource, on a
plain-HTTP listener that fails TLS probes at once, with bounds on what any
client can make it hold: connections, request bodies, and the time a request
may take to arrive; and its connections closed in order when blobserve stops.
"""

from __future__ import annotations

from functools import partial
from io import BytesIO
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import Interface, implementer

from blobserve.oneshot import OneShotEvent
from blobserve.ops.access import Exchange, IExchangeObserver
from blobserve.web.resource import OCIError, error_body, write_error

log = Logger()

#: The first byte of a TLS record carrying a handshake (a ClientHello).
_TLS_HANDSHAKE = 0x16

#: The largest body a GET or HEAD may carry: read into memory and ignored.
#: Anything larger, or of unknown length (chunked), is refused unread.
MAX_IGNORED_BODY = 1024

#: A Content-Length of more digits than this declares a body of 10 EB or
#: more: refused without converting it (Twisted's int() of more than 4300
#: digits raises, and the connection would drop with a traceback logged).
_MAX_LENGTH_DIGITS = 19

_READ_METHODS = (b"GET", b"HEAD")


class _RefuseTLSProbe(ProtocolWrapper):
    """
    Drops a connection that opens with a TLS handshake.

    Registry clients (containerd, skopeo, docker) try HTTPS first and fall
    back to HTTP only when HTTPS fails. An HTTP server would wait for a
    request line that never comes, and the client for its handshake timeout:
    ten seconds per pull. Closing at once makes the fallback immediate.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[0] == _TLS_HANDSHAKE:
                cast(ITCPTransport, self.transport).abortConnection()
                return
        super().dataReceived(data)


def _refusal(method: bytes, length: int | None) -> OCIError | None:
    """
    Why a request whose headers say C{method} and a body of C{length} bytes
    (L{None}: unknown) is refused before its body is read, if it is.
    """
    if method not in _READ_METHODS:
        return OCIError(405, "UNSUPPORTED", "this registry mirror is read-only")
    if length is None or length > MAX_IGNORED_BODY:
        return OCIError(
            413,
            "UNSUPPORTED",
            f"a {method.decode()} request may carry at most {MAX_IGNORED_BODY}"
            " bytes of body, with a Content-Length",
        )
    return None


#: The status an exchange shows when its client left before any header of
#: its response was sent (nginx's "client closed request").
CLIENT_CLOSED = 499

#: Paths of the operator's pages (not the registry API), for the metrics.
_OPERATOR_PATHS = (b"/_blobserve/", b"/metrics")


class _RegistryRequest(Request):
    """
    A request that its channel may have refused once its headers were in:
    then it is answered with that refusal, whatever it asks for.

    When its site has observers (see L{RegistrySite}), it keeps an
    L{Exchange} that the resources answering it fill in, and tells them of
    it once its response has ended, whole or cut off.
    """

    refusal: OCIError | None = None
    exchange: Exchange | None = None

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, RegistrySite):
            if site.node_header is not None:
                self.setHeader(b"X-Blobserve-Node", site.node_header)
            if site.observers:
                self._observe(site)
        if self.refusal is None:
            super().process()
            return
        self.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        self.setHeader(b"Connection", b"close")
        if self.refusal.status == 405:
            self.setHeader(b"Allow", b"GET, HEAD")
        # For a HEAD, write() sends the headers alone.
        self.write(write_error(self, self.refusal))
        self.finish()

    def _observe(self, site: RegistrySite) -> None:
        exchange = self.exchange = Exchange(
            client=getattr(self.getClientAddress(), "host", "-"),
            method=self.method.decode("latin-1"),
            uri=self.uri,
            started=site.reactor.seconds(),
        )
        if self.path.startswith(_OPERATOR_PATHS):
            exchange.route = "operator"

        def ended(result: object) -> None:
            exchange.aborted = isinstance(result, Failure)
            exchange.status = (
                CLIENT_CLOSED
                if exchange.aborted and not self.startedWriting
                else self.code
            )
            exchange.sent = self.sentLength
            exchange.duration = site.reactor.seconds() - exchange.started
            for observer in site.observers:
                try:
                    observer.exchange_ended(exchange)
                except Exception:
                    log.failure("could not observe the end of a request")

        self.notifyFinish().addBoth(ended)


class _BoundedChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that no client can make read a request body, or wait
    for a request, without bound.

    A request for any method but GET and HEAD, or with a body over
    L{MAX_IGNORED_BODY} bytes or of unknown length, is answered with an OCI
    error as soon as its headers are in, and the connection closes: not a
    byte of its body is read, none is spooled (twisted.web's L{Request}
    writes a body of over 100 KB to a temporary file before any resource
    sees it), and no C{100 Continue} asks for it.

    A request must be complete within C{deadline} seconds of its first byte,
    however steadily its bytes come (the idle timeout restarts with each),
    or the connection is aborted. A request that arrived while the one
    before it was being answered starts its deadline when it is read.
    """

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self._deadline_seconds = deadline
        self._deadline: IDelayedCall | None = None
        # Between a complete request and the end of its answer: bytes that
        # arrive then wait, unread, for the answer to end.
        self._answering = False
        # A request was refused: nothing more is read.
        self._refused = False
        # A Content-Length too long to convert: too large, whatever it says.
        self._oversized_length = False
        # Asked to close once the request in progress is answered.
        self._closing = False

    def close_after_response(self) -> None:
        """
        Close the connection once the request in progress, if there is one,
        is answered (it says C{Connection: close}); at once if it waits for a
        request. A request that has not arrived whole yet is answered too.
        """
        self._closing = True
        if not self.requests:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.setHeader(b"Connection", b"close")

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if self._closing:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        persistent: bool = super().checkPersistence(request, version)
        return persistent

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if data:
            self._start_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # A request that came in the same read as the one before it, which
        # was answered at once, is read from the buffer: no dataReceived
        # starts its deadline.
        self._start_deadline()
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if (
            name.lower() == b"content-length"
            and len(value.strip(b" \t")) > _MAX_LENGTH_DIGITS
        ):
            self._oversized_length = True
            return True
        valid: bool = super().headerReceived(line)
        return valid

    def allHeadersReceived(self) -> None:
        length = None if self._oversized_length else self.length
        # Until the request is complete, only the channel knows its method.
        refusal = _refusal(self._command, length)
        if refusal is None:
            super().allHeadersReceived()
            return
        # Go on as if the request had no body: no gotLength (which makes the
        # body's file), no 100 Continue; answer it, then close.
        request = self.requests[-1]
        assert isinstance(request, _RegistryRequest)
        request.refusal = refusal
        request.content = BytesIO()
        self.length = 0
        self.persistent = False
        self._refused = True

    def allContentReceived(self) -> None:
        self._stop_deadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._answering = False
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        if self._deadline is None and not self._answering and not self._refused:
            self._deadline = self.callLater(
                self._deadline_seconds, self._deadline_passed
            )

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        site = getattr(self, "site", None)
        if isinstance(site, RegistrySite):
            site.dropped_requests += 1
        transport = cast(ITCPTransport, self.transport)
        log.info(
            "dropped {peer}: no complete request {seconds}s after its first byte",
            peer=str(transport.getPeer()),
            seconds=self._deadline_seconds,
        )
        transport.abortConnection()


def _raw_response(error: OCIError) -> bytes:
    """
    C{error} as a whole HTTP/1.1 response that closes the connection.
    """
    body = error_body(error)
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Docker-Distribution-API-Version: registry/2.0\r\n"
        b"Connection: close\r\n"
        b"\r\n" % (error.status, RESPONSES[error.status], len(body))
    ) + body


_OVERLOADED = _raw_response(
    OCIError(503, "UNAVAILABLE", "too many connections: try again later")
)


class _Overloaded(Protocol):
    """
    A connection beyond the limit: answered 503 the moment it opens, and
    closed. Its request is never read (a client that has sent it already may
    see its connection reset rather than the answer).
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(_OVERLOADED)
        self.transport.loseConnection()


class IConnections(Interface):
    """
    The client connections of a server, to be ended when it stops.
    """

    def drain() -> Deferred[None]:
        """
        Close every connection once the request in progress on it, if any,
        is answered, and fire when none is open. New connections are not
        refused: stop listening first.
        """

    def cut() -> int:
        """
        Abort every connection still open, and say how many there were.
        """


class IConnectionCounts(Interface):
    """
    What became of a server's client connections, for the metrics.
    """

    def figures() -> dict[str, int]:
        """
        How many connections are C{open} now, and how many were C{refused}
        and C{dropped} before they made a request.
        """


@implementer(IConnections, IConnectionCounts)
class _ConnectionLimit(WrappingFactory):
    """
    Wraps the site's connections, and counts them: a connection beyond
    C{limit} is answered 503 and closed at once, and those already open go
    on as before.
    """

    protocol = _RefuseTLSProbe
    noisy = False

    def __init__(self, site: Site, limit: int) -> None:
        super().__init__(site)
        self.limit = limit
        self._refused = 0
        #: Connections refused since start.
        self.refused_total = 0
        self._drained: OneShotEvent[None] | None = None

    def drain(self) -> Deferred[None]:
        for wrapper in list(self.protocols):
            channel = wrapper.wrappedProtocol
            if isinstance(channel, _BoundedChannel):
                channel.close_after_response()
            elif wrapper.transport is not None:
                wrapper.transport.loseConnection()
        if not self.protocols:
            return succeed(None)
        if self._drained is None:
            self._drained = OneShotEvent()
        return self._drained.observe()

    def figures(self) -> dict[str, int]:
        """
        Connections open now, refused and dropped since start (for the
        metrics: what never became a request an observer is told of).
        """
        site = self.wrappedFactory
        dropped = site.dropped_requests if isinstance(site, RegistrySite) else 0
        return {
            "open": len(self.protocols),
            "refused": self.refused_total,
            "dropped": dropped,
        }

    def cut(self) -> int:
        wrappers = list(self.protocols)
        for wrapper in wrappers:
            cast(ITCPTransport, wrapper.transport).abortConnection()
        return len(wrappers)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:  # type: ignore[override]
        # Not a wrapper: a refused connection never reaches the site.
        if len(self.protocols) < self.limit:
            return super().buildProtocol(addr)
        if not self._refused:
            log.warn(
                "{limit} connections open: new ones are refused until some close",
                limit=self.limit,
            )
        self._refused += 1
        self.refused_total += 1
        return _Overloaded()

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if (
            self._drained is not None
            and not self.protocols
            and not self._drained.happened
        ):
            self._drained.succeed_with(None)
        if self._refused and len(self.protocols) < self.limit:
            log.info(
                "below {limit} connections again; {count} were refused",
                limit=self.limit,
                count=self._refused,
            )
            self._refused = 0


class RegistrySite(Site):
    """
    A L{Site} whose requests' ends are told to C{observers} (the access log,
    the metrics) instead of Twisted's access log, which logs only responses
    that finish, not those cut off.
    """

    observers: tuple[IExchangeObserver, ...] = ()
    #: The node's name, sent with every response as C{X-Blobserve-Node}.
    node_header: bytes | None = None
    #: Connections dropped since start because no complete request came
    #: within the deadline: they never reach the observers.
    dropped_requests = 0
    # No "Starting factory" line each time it listens.
    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def registry_site(
    resource: IResource,
    timeout: float = 60.0,
    max_connections: int = 1024,
    reactor: IReactorTime | None = None,
    observers: tuple[IExchangeObserver, ...] = (),
    node_name: str | None = None,
) -> WrappingFactory:
    """
    The factory serving C{resource}: a L{Site} without tracebacks in error
    pages, behind a TLS-probe refusal (harmless on a TLS listener, where the
    first decrypted byte starts an HTTP request) and a connection limit.

    @param timeout: seconds an idle connection is kept open, and the most a
        request may take from its first byte to its end. (While a response is
        being sent, the resource's producers watch the client instead.)
    @param max_connections: how many connections may be open at once; one
        more is answered 503 and closed.
    @param reactor: the clock for the timeouts; the global reactor by default.
    @param observers: told of every request once its response has ended.
    @param node_name: this node's name, sent with every response as
        C{X-Blobserve-Node} (in a cluster, where a blob lives).
    """
    site = RegistrySite(
        resource, requestFactory=_RegistryRequest, timeout=timeout, reactor=reactor
    )
    site.observers = observers
    if node_name is not None:
        site.node_header = node_name.encode("ascii")
    site.displayTracebacks = False
    # A plain HTTP/1.1 channel, not Twisted's default proxy, which would swap
    # in an HTTP/2 connection (outside these bounds) if TLS negotiated h2.
    site.protocol = partial(_BoundedChannel, timeout)  # type: ignore[assignment]
    return _ConnectionLimit(site, max_connections)
