"""
The HTTP server factory: twisted.web's Site for the registry resource, on a
plain-HTTP listener that fails TLS probes at once.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import ITCPTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import IResource
from twisted.web.server import Site

#: The first byte of a TLS record carrying a handshake (a ClientHello).
_TLS_HANDSHAKE = 0x16


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


def registry_site(resource: IResource, timeout: float = 60.0) -> WrappingFactory:
    """
    The factory serving C{resource}: a L{Site} without tracebacks in error
    pages, behind a TLS-probe refusal (harmless on a TLS listener, where the
    first decrypted byte starts an HTTP request).

    @param timeout: seconds an idle connection, or one whose request headers
        have not all arrived, is kept open. (While a response is being sent,
        the resource's producers watch the client instead.)
    """
    site = Site(resource, timeout=timeout)
    site.displayTracebacks = False
    wrapper = WrappingFactory(site)
    wrapper.protocol = _RefuseTLSProbe
    return wrapper
