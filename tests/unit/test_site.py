"""
The site refuses TLS probes at once and serves HTTP as usual.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from blobserve.site import registry_site


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


def connect() -> tuple[object, StringTransport]:
    factory = registry_site(Hello())
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_tls_client_hello_is_refused_at_once() -> None:
    protocol, transport = connect()
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # type: ignore[attr-defined]
    assert transport.disconnecting
    assert transport.value() == b""


def test_plain_http_is_served() -> None:
    protocol, transport = connect()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert not transport.disconnecting
    assert transport.value().endswith(b"hello")
