"""
RegistryUpstream against an in-memory registry double served by treq's testing
agent: URLs, headers, statuses, authentication challenges and redirects.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from blobserve.digest import Digest
from blobserve.upstream.auth import Credentials
from blobserve.upstream.client import (
    MAX_REDIRECTS,
    BlobInfo,
    BlobUnknown,
    IUpstream,
    Manifest,
    ManifestUnknown,
    QuietConnectionPool,
    RangeIgnored,
    RangeNotSatisfiable,
    RegistryUpstream,
    RepositoryUnknown,
    UpstreamError,
    UpstreamRefused,
)

from fakes import ControlledAgent, FakeResponse, LoggedEvents, failure_of, result_of

_T = TypeVar("_T")
DATA = b"blob bytes" * 100
DIGEST = Digest.of(DATA)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "x"}).encode()
MANIFEST_DIGEST = Digest.of(MANIFEST)
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CREDENTIALS = Credentials("alice", "s3cret")
TOKEN = "token-for-alice"


class RegistryDouble(Resource):
    """
    A registry (host registry.test) with an optional token server (at
    C{realm}, C{/token} of any host) and object storage (storage.test) it
    redirects blob downloads to.

    @ivar auth: C{None}, C{"basic"} or C{"bearer"}.
    @ivar headers: headers of its answers other than a challenge.
    @ivar body: the body of its answers with a C{status} other than 200.
    """

    isLeaf = True

    def __init__(
        self,
        status: int = 200,
        auth: str | None = None,
        redirect: bool = False,
        realm: str = "https://auth.test/token",
        location: bytes = b"http://storage.test/data?signature=x",
        headers: dict[bytes, bytes] | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__()
        self.status = status
        self.auth = auth
        self.redirect = redirect
        self.realm = realm
        self.location = location
        self.headers = headers or {}
        self.body = body
        self.requests: list[tuple[str, bytes, bytes, Sequence[bytes]]] = []
        self.token_requests: list[bytes] = []
        #: Who asked for tokens: (scheme, host, Authorization headers).
        self.token_askers: list[tuple[str, str, Sequence[bytes]]] = []

    def render(self, request: Request) -> bytes:
        host = (request.getHeader(b"host") or b"").decode()
        authorization = request.getHeader(b"authorization") or b""
        authorizations = request.requestHeaders.getRawHeaders(b"authorization") or []
        self.requests.append((host, request.method, request.uri, authorizations))
        if request.path == b"/token":
            scheme = "https" if request.isSecure() else "http"
            self.token_requests.append(request.uri)
            self.token_askers.append((scheme, host, authorizations))
            if authorization != CREDENTIALS.basic():
                request.setResponseCode(401)
                return b""
            return json.dumps({"token": TOKEN, "expires_in": 300}).encode()
        if host == "storage.test":
            return self._content(request, DATA)
        if not self._authorized(request, authorization):
            return b'{"errors": [{"code": "UNAUTHORIZED"}]}'
        if self.redirect:
            request.setResponseCode(307)
            request.setHeader(b"Location", self.location)
            return b""
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.status != 200 and self.body is not None:
            return self._content(request, self.body)
        if b"/manifests/" in request.uri:
            request.setHeader(b"Content-Type", MANIFEST_TYPE.encode())
            request.setHeader(b"Docker-Content-Digest", str(MANIFEST_DIGEST).encode())
            return self._content(request, MANIFEST)
        return self._content(request, DATA)

    def _content(self, request: Request, content: bytes) -> bytes:
        request.setHeader(b"Content-Length", b"%d" % len(content))
        return content

    def _authorized(self, request: Request, authorization: bytes) -> bool:
        if self.auth == "basic" and authorization != CREDENTIALS.basic():
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="registry"')
            return False
        if self.auth == "bearer" and authorization != f"Bearer {TOKEN}".encode():
            name = re.sub(rb"^/v2/(.*)/(blobs|manifests)/.*", rb"\1", request.uri)
            request.setResponseCode(401)
            request.setHeader(
                b"WWW-Authenticate",
                f'Bearer realm="{self.realm}",service="registry.test",'
                f'scope="repository:{name.decode()}:pull"'.encode(),
            )
            return False
        return True


def upstream_for(
    registry: RegistryDouble,
    credentials: Credentials | None = None,
    clock: Clock | None = None,
    base_url: str = "http://registry.test/",
) -> tuple[RegistryUpstream, RequestTraversalAgent]:
    agent = RequestTraversalAgent(registry)
    upstream = RegistryUpstream(
        base_url,
        HTTPClient(agent),
        clock or Clock(),
        credentials=credentials,
    )
    return upstream, agent


def refusal_of(d: Deferred[Any]) -> UpstreamRefused:
    """
    The refusal a Deferred has already failed with.
    """
    reason = failure_of(d)
    reason.trap(UpstreamRefused)
    assert isinstance(reason.value, UpstreamRefused)
    return reason.value


def settled(d: Deferred[_T], agent: RequestTraversalAgent) -> Deferred[_T]:
    # Each round trip through the in-memory agent needs a flush.
    for _ in range(10):
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
    host, method, uri, _ = registry.requests[0]
    assert (host, method) == ("registry.test", b"GET")
    assert uri == f"/v2/library/busybox/blobs/{DIGEST}".encode()


def test_stat_reads_the_declared_length() -> None:
    registry = RegistryDouble()
    upstream, agent = upstream_for(registry)
    info = result_of(settled(upstream.stat_blob("busybox", DIGEST), agent))
    assert info == BlobInfo(len(DATA))
    assert registry.requests[0][1] == b"HEAD"


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, BlobUnknown), (500, UpstreamError), (403, UpstreamError)],
)
def test_statuses_other_than_200_are_errors(status: int, error: type) -> None:
    upstream, agent = upstream_for(RegistryDouble(status))
    failure_of(settled(upstream.fetch_blob("busybox", DIGEST), agent)).trap(error)


def test_unreachable_upstream_is_an_upstream_error() -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST)
    agent.requests[0][3].errback(ConnectionRefusedError())
    reason = failure_of(d)
    reason.trap(UpstreamError)
    assert "unreachable" in reason.getErrorMessage()


def test_an_upstream_that_drops_the_connection_is_said_in_words() -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST)
    agent.requests[0][3].errback(ResponseNeverReceived([Failure(ConnectionDone())]))
    assert failure_of(d).getErrorMessage() == (
        "upstream registry.test unreachable: no response: connection closed"
    )


@implementer(IStreamClientEndpoint)
class _StartingEndpoint:
    """
    Starts the factory of the connection it is asked for, as a reactor
    does, and never connects.
    """

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        factory.doStart()
        return Deferred()


def test_the_connection_pool_logs_nothing_per_connection() -> None:
    pool = QuietConnectionPool(Clock())
    with LoggedEvents() as logged:
        pool.getConnection(("http", b"registry.test", 80), _StartingEndpoint())
    assert logged.messages() == []


def test_bearer_challenge_is_answered_with_a_token_then_cached() -> None:
    registry = RegistryDouble(auth="bearer")
    clock = Clock()
    upstream, agent = upstream_for(registry, CREDENTIALS, clock)
    response = result_of(settled(upstream.fetch_blob("library/busybox", DIGEST), agent))
    assert response.code == 200
    token_uri = registry.token_requests[0]
    assert b"service=registry.test" in token_uri
    assert b"scope=repository%3Alibrary%2Fbusybox%3Apull" in token_uri

    # The token is reused for that repository until it expires.
    result_of(settled(upstream.stat_blob("library/busybox", DIGEST), agent))
    assert len(registry.token_requests) == 1
    assert registry.requests[-1][3] == [f"Bearer {TOKEN}".encode()]
    clock.advance(300)
    result_of(settled(upstream.stat_blob("library/busybox", DIGEST), agent))
    assert len(registry.token_requests) == 2


def test_tokens_are_per_repository() -> None:
    registry = RegistryDouble(auth="bearer")
    upstream, agent = upstream_for(registry, CREDENTIALS)
    result_of(settled(upstream.stat_blob("a", DIGEST), agent))
    result_of(settled(upstream.stat_blob("b", DIGEST), agent))
    assert len(registry.token_requests) == 2


def test_refused_token_is_a_401_refusal_without_secrets() -> None:
    registry = RegistryDouble(auth="bearer")
    upstream, agent = upstream_for(registry, Credentials("alice", "wrong"))
    refused = refusal_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert refused.status == 401
    assert "token server" in str(refused)
    assert "wrong" not in str(refused)
    assert "wrong" not in repr(Credentials("alice", "wrong"))


def test_basic_challenge_is_answered_with_credentials() -> None:
    registry = RegistryDouble(auth="basic")
    upstream, agent = upstream_for(registry, CREDENTIALS)
    result_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    result_of(settled(upstream.stat_blob("busybox", DIGEST), agent))
    # The first request learned the scheme; the next sends credentials at once.
    assert [r[3] for r in registry.requests] == [
        [],
        [CREDENTIALS.basic()],
        [CREDENTIALS.basic()],
    ]


def test_challenge_without_credentials_is_a_401_refusal() -> None:
    upstream, agent = upstream_for(RegistryDouble(auth="basic"))
    refused = refusal_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert refused.status == 401
    assert "credentials" in str(refused)


def test_redirect_is_followed_without_the_registrys_authorization() -> None:
    registry = RegistryDouble(auth="basic", redirect=True)
    upstream, agent = upstream_for(registry, CREDENTIALS)
    response = result_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert response.code == 200
    assert response.length == len(DATA)
    storage = [r for r in registry.requests if r[0] == "storage.test"]
    assert len(storage) == 1
    assert storage[0][2] == b"/data?signature=x"
    assert storage[0][3] == []


def test_manifest_is_fetched_byte_for_byte_with_accept() -> None:
    registry = RegistryDouble()
    upstream, agent = upstream_for(registry)
    accept = [MANIFEST_TYPE, "application/vnd.oci.image.index.v1+json"]
    manifest = result_of(
        settled(upstream.fetch_manifest("busybox", "latest", accept), agent)
    )
    assert manifest.content == MANIFEST
    assert manifest.media_type == MANIFEST_TYPE
    assert manifest.digest == MANIFEST_DIGEST


def test_manifest_by_wrong_digest_is_refused() -> None:
    upstream, agent = upstream_for(RegistryDouble())
    wrong = Digest.of(b"something else")
    reason = failure_of(settled(upstream.fetch_manifest("b", str(wrong), []), agent))
    reason.trap(UpstreamError)
    assert str(wrong) in reason.getErrorMessage()


def test_manifest_head_reads_digest_and_type() -> None:
    upstream, agent = upstream_for(RegistryDouble())
    info = result_of(settled(upstream.stat_manifest("b", "latest", []), agent))
    assert info.digest == MANIFEST_DIGEST
    assert info.media_type == MANIFEST_TYPE
    assert info.length == len(MANIFEST)


def test_unknown_manifest() -> None:
    upstream, agent = upstream_for(RegistryDouble(404))
    reason = failure_of(settled(upstream.fetch_manifest("b", "latest", []), agent))
    reason.trap(ManifestUnknown)


def test_authorization_header_value() -> None:
    assert CREDENTIALS.basic() == b"Basic " + base64.b64encode(b"alice:s3cret")


#: Each request an upstream is asked for, for repository busybox.
ASKS: dict[str, Callable[[RegistryUpstream], Deferred[Any]]] = {
    "fetch_blob": lambda upstream: upstream.fetch_blob("busybox", DIGEST),
    "stat_blob": lambda upstream: upstream.stat_blob("busybox", DIGEST),
    "fetch_manifest": lambda upstream: upstream.fetch_manifest("busybox", "x", []),
    "stat_manifest": lambda upstream: upstream.stat_manifest("busybox", "x", []),
}


def each_request(upstream: RegistryUpstream) -> list[Deferred[Any]]:
    return [ask(upstream) for ask in ASKS.values()]


@pytest.mark.parametrize("status", [401, 403, 429])
def test_refusals_keep_their_status(status: int) -> None:
    upstream, agent = upstream_for(RegistryDouble(status))
    for d in each_request(upstream):
        refused = refusal_of(settled(d, agent))
        assert refused.status == status


def test_401_after_answering_the_challenge_is_a_401_refusal() -> None:
    registry = RegistryDouble(auth="basic")
    upstream, agent = upstream_for(registry, Credentials("alice", "wrong"))
    refused = refusal_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert refused.status == 401
    # Asked once without credentials, once with: no more.
    assert [r[3] for r in registry.requests] == [
        [],
        [Credentials("alice", "wrong").basic()],
    ]


@pytest.mark.parametrize("status", [500, 502, 503, 400, 405])
def test_failures_and_other_statuses_are_plain_upstream_errors(status: int) -> None:
    upstream, agent = upstream_for(RegistryDouble(status))
    for d in each_request(upstream):
        reason = failure_of(settled(d, agent))
        reason.trap(UpstreamError)
        assert not isinstance(reason.value, UpstreamRefused | BlobUnknown)
        assert str(status) in reason.getErrorMessage()


@pytest.mark.parametrize(
    ("header", "passed_on"),
    [
        (b"120", "120"),
        (b" 0030 ", "30"),
        (b"0", "0"),
        (b"Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:00 GMT"),
        (b"9" * 9, "9" * 9),
        (b"9" * 10, None),
        (b"9" * 5000, None),
        (b"-1", None),
        (b"1.5", None),
        (b"soon", None),
        (b"\xb2", None),
        (b"Wed, 31 Feb 2015 07:28:00 GMT", None),
        (b"Wed, 21 Oct 2015 07:28:00 UTC", None),
        (b"Wed, 21 Oct 2015 07:28:00 GMT; x", None),
        (b"Wednesday, 21-Oct-15 07:28:00 GMT", None),
    ],
)
def test_retry_after_is_passed_on_only_when_sane(
    header: bytes, passed_on: str | None
) -> None:
    registry = RegistryDouble(429, headers={b"Retry-After": header})
    upstream, agent = upstream_for(registry)
    for d in each_request(upstream):
        refused = refusal_of(settled(d, agent))
        assert refused.retry_after == passed_on


def test_429_without_retry_after_has_none() -> None:
    upstream, agent = upstream_for(RegistryDouble(429))
    refused = refusal_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert refused.retry_after is None


NAME_UNKNOWN = json.dumps(
    {"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known"}]}
).encode()


@pytest.mark.parametrize("kind", [BlobUnknown, ManifestUnknown])
def test_404_naming_an_unknown_repository_is_repository_unknown(kind: type) -> None:
    upstream, agent = upstream_for(RegistryDouble(404, body=NAME_UNKNOWN))
    fetch = (
        upstream.fetch_blob("busybox", DIGEST)
        if kind is BlobUnknown
        else upstream.fetch_manifest("busybox", "latest", [])
    )
    reason = failure_of(settled(fetch, agent))
    reason.trap(RepositoryUnknown)
    # Whoever handles an unknown blob or manifest handles it too.
    assert isinstance(reason.value, kind)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}).encode(),
        b"not json",
        b'{"errors": "NAME_UNKNOWN"}',
        b"",
        # Past the bound of what is read to tell.
        NAME_UNKNOWN[:-1] + b" " * (64 * 1024) + b"}",
    ],
)
def test_other_404s_are_unknown_blobs_or_manifests(body: bytes) -> None:
    upstream, agent = upstream_for(RegistryDouble(404, body=body))
    for d in each_request(upstream):
        reason = failure_of(settled(d, agent))
        reason.trap(BlobUnknown, ManifestUnknown)
        assert not isinstance(reason.value, RepositoryUnknown)


@pytest.mark.parametrize(
    ("base_url", "realm", "sent"),
    [
        ("http://registry.test", "https://auth.test/token", True),
        ("https://registry.test", "https://auth.test/token", True),
        ("http://registry.test", "http://registry.test/token", True),
        ("http://registry.test:5000", "http://registry.test:5000/token", True),
        ("http://registry.test", "http://REGISTRY.test:80/token", True),
        ("http://registry.test", "http://auth.test/token", False),
        ("http://registry.test:5000", "http://registry.test:5001/token", False),
        ("http://registry.test", "http://registry.test:8080/token", False),
        ("https://registry.test", "http://registry.test/token", False),
        ("https://registry.test", "http://registry.test:443/token", False),
    ],
)
def test_credentials_go_to_a_token_realm_only_over_https_or_to_the_upstream(
    base_url: str, realm: str, sent: bool
) -> None:
    registry = RegistryDouble(auth="bearer", realm=realm)
    upstream, agent = upstream_for(registry, CREDENTIALS, base_url=base_url)
    d = settled(upstream.stat_blob("busybox", DIGEST), agent)
    (_, _, authorizations), *_ = registry.token_askers
    if sent:
        assert authorizations == [CREDENTIALS.basic()]
        assert result_of(d) == BlobInfo(len(DATA))
    else:
        # Asked anonymously; this token server wants credentials.
        assert authorizations == []
        refused = refusal_of(d)
        assert refused.status == 401


def test_withheld_credentials_are_warned_about_once_without_secrets() -> None:
    registry = RegistryDouble(auth="bearer", realm="http://auth.test/token")
    upstream, agent = upstream_for(registry, CREDENTIALS)
    with LoggedEvents() as logged:
        for name in ("a", "b"):
            failure_of(settled(upstream.stat_blob(name, DIGEST), agent))
    assert len(registry.token_askers) == 2
    warnings = [m for m in logged.messages() if "not sending" in m]
    assert len(warnings) == 1
    assert "http://auth.test" in warnings[0]
    assert CREDENTIALS.password not in " ".join(logged.messages())


@pytest.mark.parametrize("realm", ["ftp://auth.test/token", "/token", "auth.test"])
def test_token_realm_that_is_not_http_is_refused(realm: str) -> None:
    registry = RegistryDouble(auth="bearer", realm=realm)
    upstream, agent = upstream_for(registry, CREDENTIALS)
    reason = failure_of(settled(upstream.stat_blob("busybox", DIGEST), agent))
    reason.trap(UpstreamError)
    assert "realm" in reason.getErrorMessage()
    assert registry.token_askers == []


@pytest.mark.parametrize("ask", ASKS)
def test_redirect_from_https_to_http_is_refused(ask: str) -> None:
    # Whatever a downgraded answer says, digests included, is never read.
    registry = RegistryDouble(
        auth="basic", redirect=True, location=b"http://storage.test/data"
    )
    upstream, agent = upstream_for(
        registry, CREDENTIALS, base_url="https://registry.test"
    )
    reason = failure_of(settled(ASKS[ask](upstream), agent))
    reason.trap(UpstreamError)
    assert "https to plain http" in reason.getErrorMessage()
    assert [r for r in registry.requests if r[0] == "storage.test"] == []


@pytest.mark.parametrize(
    ("base_url", "location"),
    [
        ("https://registry.test", b"https://storage.test/data"),
        ("https://registry.test", b"//storage.test/data"),
        ("http://registry.test", b"http://storage.test/data"),
        ("http://registry.test", b"https://storage.test/data"),
    ],
)
def test_redirects_that_keep_or_raise_security_are_followed(
    base_url: str, location: bytes
) -> None:
    registry = RegistryDouble(redirect=True, location=location)
    upstream, agent = upstream_for(registry, base_url=base_url)
    response = result_of(settled(upstream.fetch_blob("busybox", DIGEST), agent))
    assert response.code == 200
    assert [r[0] for r in registry.requests] == ["registry.test", "storage.test"]


#: What cancelling a request may fail with, depending on Twisted's agent's
#: stage (resolving, connecting, waiting for the response).
CANCELLED_AS: list[Callable[[], Exception]] = [
    lambda: ResponseNeverReceived([Failure(CancelledError())]),
    lambda: DNSLookupError("Couldn't find the hostname 'registry.test'."),
    CancelledError,
]


def controlled_upstream(
    clock: Clock | None = None,
    cancelled_as: Callable[[], Exception] = CANCELLED_AS[0],
) -> tuple[RegistryUpstream, ControlledAgent]:
    agent = ControlledAgent(cancelled_as=cancelled_as)
    upstream = RegistryUpstream(
        "http://registry.test", HTTPClient(agent), clock or Clock(), timeout=30
    )
    return upstream, agent


@pytest.mark.parametrize("cancelled_as", CANCELLED_AS)
@pytest.mark.parametrize("ask", ASKS)
def test_cancelling_a_request_is_not_an_upstream_failure(
    ask: str, cancelled_as: Callable[[], Exception]
) -> None:
    upstream, agent = controlled_upstream(cancelled_as=cancelled_as)
    d = ASKS[ask](upstream)
    d.cancel()
    failure_of(d).trap(CancelledError)
    # The upstream request is abandoned.
    assert agent.cancelled == [agent.requests[0][1]]


@pytest.mark.parametrize("cancelled_as", CANCELLED_AS)
@pytest.mark.parametrize("ask", ASKS)
def test_no_answer_within_the_timeout_is_an_upstream_failure(
    ask: str, cancelled_as: Callable[[], Exception]
) -> None:
    clock = Clock()
    upstream, agent = controlled_upstream(clock, cancelled_as)
    d = ASKS[ask](upstream)
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    reason = failure_of(d)
    reason.trap(UpstreamError)
    assert "no answer within 30 s" in reason.getErrorMessage()
    assert agent.cancelled == [agent.requests[0][1]]


def test_an_answer_in_time_leaves_no_timer_behind() -> None:
    clock = Clock()
    upstream, agent = controlled_upstream(clock)
    d = upstream.stat_blob("busybox", DIGEST)
    agent.requests[0][3].callback(FakeResponse(code=200))
    assert result_of(d) == BlobInfo(None)
    assert clock.getDelayedCalls() == []


def manifest_body_begun(
    upstream: RegistryUpstream, agent: ControlledAgent
) -> tuple[Deferred[Manifest], FakeResponse]:
    """
    Ask for a manifest, and have the upstream send the first bytes of it.
    """
    d = upstream.fetch_manifest("busybox", "latest", [])
    response = FakeResponse(code=200)
    response.headers.setRawHeaders(b"content-type", [MANIFEST_TYPE.encode()])
    agent.requests[0][3].callback(response)
    assert response.protocol is not None
    response.protocol.dataReceived(MANIFEST[:5])
    return d, response


def test_cancelling_while_a_manifest_body_arrives_stops_it() -> None:
    upstream, agent = controlled_upstream()
    d, response = manifest_body_begun(upstream, agent)
    with LoggedEvents() as logged:
        d.cancel()
        failure_of(d).trap(CancelledError)
        assert response.transport.producerState == "stopped"
        # The end of the connection that follows changes nothing.
        assert response.protocol is not None
        response.protocol.connectionLost(Failure(ResponseDone()))
        assert logged.failures() == []


def test_a_manifest_body_that_stalls_fails_within_the_timeout() -> None:
    clock = Clock()
    upstream, agent = controlled_upstream(clock)
    d, response = manifest_body_begun(upstream, agent)
    clock.advance(29)
    assert not d.called
    clock.advance(1)
    reason = failure_of(d)
    reason.trap(UpstreamError)
    assert "not complete within 30 s" in reason.getErrorMessage()
    assert response.transport.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def redirect_to(n: int) -> FakeResponse:
    location = b"http://storage.test/%d" % n
    return FakeResponse(code=307, length=0, headers=Headers({b"location": [location]}))


def test_at_most_max_redirects_are_followed() -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST)
    for n in range(MAX_REDIRECTS):
        agent.requests[-1][3].callback(redirect_to(n))
    assert len(agent.requests) == MAX_REDIRECTS + 1
    agent.requests[-1][3].callback(redirect_to(MAX_REDIRECTS))
    reason = failure_of(d)
    reason.trap(UpstreamError)
    assert f"more than {MAX_REDIRECTS} redirects" in reason.getErrorMessage()
    assert len(agent.requests) == MAX_REDIRECTS + 1


def test_a_refusal_body_that_never_ends_is_cut_off() -> None:
    clock = Clock()
    upstream, agent = controlled_upstream(clock)
    d = upstream.fetch_blob("busybox", DIGEST)
    slow, endless = FakeResponse(code=403), FakeResponse(code=403)
    agent.requests[0][3].callback(slow)
    assert refusal_of(d).status == 403
    assert slow.protocol is not None
    slow.protocol.dataReceived(b"x")
    clock.advance(30)
    assert slow.transport.producerState == "stopped"

    d = upstream.fetch_blob("busybox", DIGEST)
    agent.requests[1][3].callback(endless)
    assert endless.protocol is not None
    for _ in range(65):
        endless.protocol.dataReceived(b"x" * 1024)
    assert endless.transport.producerState == "stopped"
    assert refusal_of(d).status == 403


def test_416_to_a_resume_says_the_upstream_has_nothing_past_it() -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST, 100)
    agent.requests[0][3].callback(FakeResponse(code=416, length=0))
    failure_of(d).trap(RangeNotSatisfiable)


def ranged(code: int, content_range: bytes | None) -> FakeResponse:
    headers = Headers()
    if content_range is not None:
        headers.setRawHeaders(b"content-range", [content_range])
    return FakeResponse(code=code, headers=headers)


def test_a_range_with_an_end_is_asked_for_and_its_206_is_the_answer() -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST, 0, 100)
    assert agent.requests[0][2].getRawHeaders(b"range") == [b"bytes=0-99"]
    agent.requests[0][3].callback(ranged(206, b"bytes 0-99/1000"))
    response = result_of(d)
    assert response.code == 206
    assert response.headers.getRawHeaders(b"content-range") == [b"bytes 0-99/1000"]


@pytest.mark.parametrize(
    "answer",
    [
        ranged(200, None),
        ranged(206, b"bytes 0-999/1000"),
        ranged(206, b"bytes 0-99/1000"),
        ranged(206, None),
    ],
)
def test_a_range_answered_with_other_bytes_fails(answer: FakeResponse) -> None:
    upstream, agent = controlled_upstream()
    d = upstream.fetch_blob("busybox", DIGEST, 500, 600)
    assert agent.requests[0][2].getRawHeaders(b"range") == [b"bytes=500-599"]
    agent.requests[0][3].callback(answer)
    # Its own kind, for a segmented download to fall back on one stream.
    failure_of(d).trap(RangeIgnored)
