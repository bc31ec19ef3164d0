"""
RegistryUpstream against an in-memory registry double served by treq's testing
agent: URLs, headers, statuses.
"""

from collections.abc import Sequence
from typing import TypeVar

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.upstream import (
    BlobInfo,
    BlobUnknown,
    IUpstream,
    RegistryUpstream,
    UpstreamError,
)

from fakes import failure_of, result_of

_T = TypeVar("_T")
DATA = b"blob bytes" * 100
DIGEST = Digest.of(DATA)


class RegistryDouble(Resource):
    """
    Answers blob requests with a fixed status and records what it was asked.
    """

    isLeaf = True

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.requests: list[tuple[bytes, bytes, Sequence[bytes]]] = []

    def render(self, request: Request) -> bytes:
        encodings = request.requestHeaders.getRawHeaders(b"accept-encoding") or []
        self.requests.append((request.method, request.uri, encodings))
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Length", b"%d" % len(DATA))
        return DATA


def upstream_for(
    registry: RegistryDouble,
) -> tuple[RegistryUpstream, RequestTraversalAgent]:
    agent = RequestTraversalAgent(registry)
    return RegistryUpstream("http://registry.test/", HTTPClient(agent)), agent


def settled(d: "Deferred[_T]", agent: RequestTraversalAgent) -> "Deferred[_T]":
    agent.flush()
    return d


def test_provides_interface() -> None:
    assert verifyObject(IUpstream, upstream_for(RegistryDouble())[0])


def test_fetch_asks_for_the_blob_without_compression() -> None:
    registry = RegistryDouble()
    upstream, agent = upstream_for(registry)
    response = result_of(settled(upstream.fetch_blob("library/busybox", DIGEST), agent))
    assert response.code == 200
    assert response.length == len(DATA)
    method, uri, encodings = registry.requests[0]
    assert (method, uri) == (b"GET", f"/v2/library/busybox/blobs/{DIGEST}".encode())
    assert b"identity" in encodings


def test_stat_reads_the_declared_length() -> None:
    registry = RegistryDouble()
    upstream, agent = upstream_for(registry)
    info = result_of(settled(upstream.stat_blob("busybox", DIGEST), agent))
    assert info == BlobInfo(len(DATA))
    assert registry.requests[0][0] == b"HEAD"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, BlobUnknown),
        (500, UpstreamError),
        (401, UpstreamError),
        (307, UpstreamError),
    ],
)
def test_statuses_other_than_200_are_errors(status: int, error: type) -> None:
    upstream, agent = upstream_for(RegistryDouble(status))
    failure_of(settled(upstream.fetch_blob("busybox", DIGEST), agent)).trap(error)


def test_unreachable_upstream_is_an_upstream_error() -> None:
    @implementer(IAgent)
    class Refusing:
        def request(
            self,
            method: bytes,
            uri: bytes,
            headers: Headers | None = None,
            bodyProducer: IBodyProducer | None = None,
        ) -> "Deferred[IResponse]":
            return fail(ConnectionRefusedError())

    upstream = RegistryUpstream("http://registry.test", HTTPClient(Refusing()))
    reason = failure_of(upstream.fetch_blob("busybox", DIGEST))
    reason.trap(UpstreamError)
    assert "unreachable" in reason.getErrorMessage()
