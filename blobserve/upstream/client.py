"""
The upstream registry client, on treq: blobs and manifests, authentication
challenges, and redirects to object storage.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar
from urllib.parse import SplitResult, urlencode, urljoin, urlsplit

from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import Attribute, Interface, implementer

from blobserve.digest import Digest, InvalidDigest
from blobserve.failures import why
from blobserve.upstream.auth import (
    AuthenticationFailed,
    Credentials,
    Token,
    TokenCache,
    parse_challenge,
    parse_token_response,
)

log = Logger()

#: The most redirects followed for one request.
MAX_REDIRECTS = 3
#: The largest manifest accepted, as the reference registry's limit.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: The largest tags list or referrers answer accepted.
MAX_LISTING_SIZE = 4 * 1024 * 1024
_MAX_SMALL_BODY = 64 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
_RETRY_SECONDS = re.compile(r"[0-9]{1,9}")
#: An HTTP date as RFC 9110 says to send one (IMF-fixdate), for strptime,
#: whose names of days and months are English in the C locale twistd runs in.
_IMF_FIXDATE = "%a, %d %b %Y %H:%M:%S GMT"

_T = TypeVar("_T")


class UpstreamError(Exception):
    """
    The upstream could not be reached, failed (5xx, no answer in time), or
    answered with something blobserve cannot pass on: a client is told 502.
    """


class UpstreamRefused(UpstreamError):
    """
    The upstream, or its token server, refused the request in a way a client
    should be told as it is: 401 (blobserve's credentials, or none, do not let
    it in, even after answering its challenge), 403 (they do, but not to
    this) or 429 (not now).

    @ivar status: 401, 403 or 429.
    @ivar retry_after: the upstream's C{Retry-After}, if it sent a sane one:
        seconds (at most nine digits) or an HTTP date (IMF-fixdate); else
        L{None}.
    """

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BlobUnknown(UpstreamError):
    """
    The upstream answered 404: it does not have the blob.
    """


class ManifestUnknown(UpstreamError):
    """
    The upstream answered 404: it does not have the manifest or tag.
    """


class ReferrersUnsupported(UpstreamError):
    """
    The upstream answered a referrers query with a 404 that names neither
    the repository nor the manifest: it has no referrers API.
    """


class RangeNotSatisfiable(UpstreamError):
    """
    The upstream answered 416 to a request for a blob from an offset: it has
    nothing past it.
    """


class RangeIgnored(UpstreamError):
    """
    The upstream answered a request for a closed range of a blob with the
    whole blob (200) or with another range than the one asked for.
    """


class RepositoryUnknown(BlobUnknown, ManifestUnknown):
    """
    The upstream answered 404 with C{NAME_UNKNOWN}: it has no such
    repository, so neither the blob nor the manifest asked for. It is both a
    L{BlobUnknown} and a L{ManifestUnknown}: what handles those handles it.
    """


@frozen
class BlobInfo:
    """
    What an upstream says about a blob before sending it.

    @ivar length: its size in bytes, or L{None} if the upstream did not say.
    """

    length: int | None


@frozen
class Manifest:
    """
    A manifest as the upstream sent it, byte for byte, with its verified
    digest and the media type the upstream declared.
    """

    content: bytes
    media_type: str
    digest: Digest


@frozen
class ManifestInfo:
    """
    What an upstream's C{HEAD} says of a manifest; any part may be missing.
    """

    digest: Digest | None
    media_type: str | None
    length: int | None


@frozen
class Listing:
    """
    A JSON answer of an upstream's tags list or referrers endpoint, byte for
    byte, with the headers that go with it.

    @ivar link: the upstream's C{Link} header, if it sent one.
    @ivar filtered: whether the upstream said (C{OCI-Filters-Applied}) that
        it filtered the answer by C{artifactType}.
    """

    content: bytes
    link: str | None = None
    filtered: bool = False


class IUpstream(Interface):
    """
    A registry that blobs and manifests are fetched from.
    """

    base_url = Attribute("Where the registry is reached, for what is logged.")

    def fetch_blob(
        name: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> Deferred[IResponse]:
        """
        Ask for the blob C{digest} of repository C{name}, from byte C{offset}
        on if it is not 0 (a C{Range} request, to resume a transfer), up to,
        not including, byte C{end} if it is given (a range a client asked
        for, or a segment: then only a 206 with exactly that C{Content-Range}
        is a success; a 200 or another range fails with L{RangeIgnored}).

        @return: fires with a successful response (200, or 206 for a range)
            whose body has not been read yet (deliver it to a protocol); fails
            with L{BlobUnknown} if the upstream does not have the blob, or
            L{UpstreamError} for anything else that is not a blob body.
        """

    def stat_blob(name: str, digest: Digest) -> Deferred[BlobInfo]:
        """
        Ask, without fetching it, whether the upstream has the blob and how
        large it is.

        @return: fires with L{BlobInfo}; fails as L{fetch_blob} does.
        """

    def fetch_manifest(
        name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[Manifest]:
        """
        Fetch the manifest C{reference} (a tag or a digest) of repository
        C{name}, asking for the media types in C{accept}.

        @return: fires with the L{Manifest}, whose digest is verified against
            C{reference} when that is a digest; fails with L{ManifestUnknown}
            if the upstream does not have it, or L{UpstreamError}.
        """

    def stat_manifest(
        name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[ManifestInfo]:
        """
        Ask with C{HEAD} what the manifest C{reference} is now.

        @return: fires with L{ManifestInfo}; fails as L{fetch_manifest} does.
        """

    def fetch_tags(name: str, n: int | None, last: str | None) -> Deferred[Listing]:
        """
        Fetch the tags list of repository C{name}, passing on C{n} and
        C{last} if given.

        @return: fires with the L{Listing}, a JSON object of at most
            L{MAX_LISTING_SIZE} bytes; fails with L{RepositoryUnknown} if the
            upstream has no such repository, or L{UpstreamError}.
        """

    def fetch_referrers(
        name: str, digest: Digest, artifact_type: str | None
    ) -> Deferred[Listing]:
        """
        Ask the upstream's referrers API for the manifests that refer to
        C{digest}, filtered by C{artifact_type} if given.

        @return: fires with the L{Listing}, a JSON object of at most
            L{MAX_LISTING_SIZE} bytes; fails with L{ReferrersUnsupported} if
            the upstream has no referrers API, L{RepositoryUnknown} or
            L{ManifestUnknown} if it says so, or L{UpstreamError}.
        """


class IUpstreamEvents(Interface):
    """
    Told of an upstream's answers, for the metrics.
    """

    def answered(status: int | None) -> None:
        """
        A request to the upstream was answered with C{status}, or with
        nothing (L{None}: unreachable, or no answer in time).
        """


@implementer(IUpstreamEvents)
class IgnoredAnswers:
    """
    Upstream answers nobody is told of.
    """

    def answered(self, status: int | None) -> None:
        pass


#: Where an upstream's answers are told when nobody listens.
NO_ANSWERS = IgnoredAnswers()


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    A connection pool whose connections log nothing as they open and close:
    Twisted's pool makes a factory for each, and each would log a "Starting
    factory" and a "Stopping factory" line, two lines per upstream
    connection that say nothing an operator needs.
    """

    _factory = _QuietClientFactory


def response_length(response: IResponse) -> int | None:
    """
    The response's C{Content-Length}, or L{None} if it has none.
    """
    length = response.length
    return None if length is UNKNOWN_LENGTH else int(length)


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _declared_length(response: IResponse) -> int | None:
    # A response to HEAD has no body, so its length is 0 whatever it declares.
    try:
        length = int(_header(response, b"content-length") or "")
    except ValueError:
        return None
    return length if length >= 0 else None


def _declared_digest(response: IResponse) -> Digest | None:
    try:
        return Digest.parse(_header(response, b"docker-content-digest") or "")
    except InvalidDigest:
        return None


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _discard(response: IResponse, clock: IReactorTime, timeout: float) -> None:
    """
    Read and drop a body nobody wants, so the connection can be reused; one
    larger than a small body, or slower than C{timeout}, is cut off instead.
    """
    Deferred.fromCoroutine(
        _read_body(response, _MAX_SMALL_BODY, clock, timeout)
    ).addErrback(lambda _: None)


class _BodyReader(Protocol):
    """
    Reads a body of at most C{limit} bytes. L{done} fires with it, or fails
    with L{UpstreamError} when it is larger or cut short; cancelling L{done}
    stops the transfer and fails it with C{CancelledError}, nothing else.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._over = False
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        # Marked first: stopping may end the connection at once, and that end
        # must not fire done as well.
        self._over = True
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._over:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.done.errback(
                UpstreamError(f"upstream body larger than {self._limit} bytes")
            )
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._over:
            return
        self._over = True
        # PotentialDataLoss is the end of a body that ends by closing; the
        # caller's digest check decides whether it is whole.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            message = f"upstream body cut short: {why(reason)}"
            self.done.errback(UpstreamError(message))


async def _read_body(
    response: IResponse, limit: int, clock: IReactorTime, timeout: float
) -> bytes:
    """
    The whole body of C{response}, which must not exceed C{limit} bytes nor
    take more than C{timeout} seconds to arrive.

    @raise UpstreamError: if it does, or is cut short.
    @raise CancelledError: if the caller cancelled; the transfer is stopped.
    """
    if response.length == 0:
        return b""
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    try:
        return await reader.done.addTimeout(timeout, clock)
    except TimeoutError:
        raise UpstreamError(
            f"upstream body not complete within {timeout:g} s"
        ) from None


def _retry_after(response: IResponse) -> str | None:
    """
    The response's C{Retry-After}, if it is one a client can be given:
    delay seconds of at most nine digits, or an IMF-fixdate that is a real
    date. Anything else is dropped rather than passed on.
    """
    value = (_header(response, b"retry-after") or "").strip()
    if _RETRY_SECONDS.fullmatch(value):
        return str(int(value))
    try:
        datetime.datetime.strptime(value, _IMF_FIXDATE)
    except ValueError:
        return None
    return value


def _error_codes(body: bytes) -> set[str]:
    """
    The codes an OCI error body names; none if it is not one.
    """
    try:
        errors = json.loads(body).get("errors")
        return {str(error.get("code")) for error in errors}
    except (ValueError, AttributeError, TypeError):
        return set()


async def _refusal(
    response: IResponse,
    unknown: type[UpstreamError] | None,
    clock: IReactorTime,
    timeout: float,
    whom: str = "upstream registry",
) -> UpstreamError:
    """
    The error that a response other than the one hoped for means; its body is
    read (a small one, to tell an unknown repository) or dropped.

    @param unknown: what a 404 means, unless its body says C{NAME_UNKNOWN};
        L{None} if a 404 means nothing more than any other failure.
    @param whom: who answered, for the message.
    """
    code = response.code
    if code == 404 and unknown is not None:
        try:
            body = await _read_body(response, _MAX_SMALL_BODY, clock, timeout)
        except UpstreamError:
            body = b""
        if "NAME_UNKNOWN" in _error_codes(body):
            return RepositoryUnknown(f"repository unknown to the {whom} (404)")
        return unknown(f"unknown to the {whom} ({code})")
    _discard(response, clock, timeout)
    if code == 401:
        return UpstreamRefused(401, f"the {whom} refused access ({code})")
    if code == 403:
        return UpstreamRefused(403, f"the {whom} denied access ({code})")
    if code == 429:
        message = f"the {whom} is rate-limiting ({code})"
        return UpstreamRefused(429, message, _retry_after(response))
    phrase = response.phrase.decode("latin-1", "replace")
    return UpstreamError(f"the {whom} answered {code} {phrase}")


def _cancellable(sent: Deferred[_T]) -> Deferred[_T]:
    """
    A Deferred that fires as C{sent} does, except that cancelling it cancels
    C{sent} and fails with C{CancelledError}, whatever C{sent}'s canceller
    makes of it (Twisted's agent says C{ResponseNeverReceived} or
    C{DNSLookupError}, which would read as an unreachable upstream).
    """
    cancelled = False

    def cancel(_: Deferred[_T]) -> None:
        nonlocal cancelled
        cancelled = True
        sent.cancel()

    answer: Deferred[_T] = Deferred(cancel)

    def forward(result: _T | Failure) -> None:
        if cancelled:
            if not answer.called:
                answer.errback(CancelledError())
        elif isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)

    sent.addBoth(forward)
    return answer


@implementer(IUpstream)
class RegistryUpstream:
    """
    A registry reached over HTTP(S) at C{base_url} through a treq client.

    It answers C{Bearer} challenges with tokens from the registry's token
    server (anonymous, or with C{credentials}), cached per repository until
    they expire, and C{Basic} challenges with C{credentials}. It follows up to
    L{MAX_REDIRECTS} redirects, and never sends the registry's
    C{Authorization} to another host.

    Credentials go only where they belong: to a token server over https, or
    over plain http only when the upstream itself is plain http on the same
    host and port (else the token is asked for anonymously). A redirect from
    https to http is refused, so every answer, and every digest it declares,
    came over the scheme the upstream was configured with.

    Cancelling what a method returns stops its upstream request and fails
    with C{CancelledError}, never with L{UpstreamError}: a caller that gives
    up is not an upstream failure.
    """

    def __init__(
        self,
        base_url: str,
        client: HTTPClient,
        clock: IReactorTime,
        timeout: float = 30.0,
        credentials: Credentials | None = None,
        events: IUpstreamEvents = NO_ANSWERS,
    ) -> None:
        """
        @param timeout: seconds to wait for response headers.
        @param events: told of every answer of the upstream (token servers
            and redirect targets included).
        """
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._credentials = credentials
        self._events = events
        self._tokens = TokenCache(clock)
        # The scheme of the upstream's last challenge: "bearer", "basic" or
        # None before any.
        self._scheme: str | None = None
        # Token realms already warned about getting no credentials.
        self._withheld_from: set[str] = set()

    def _read_body(self, response: IResponse, limit: int) -> Deferred[bytes]:
        """
        A small body of C{response}, within the upstream timeout.
        """
        return Deferred.fromCoroutine(
            _read_body(response, limit, self._clock, self._timeout)
        )

    def _refusal(
        self,
        response: IResponse,
        unknown: type[UpstreamError] | None,
        whom: str = "upstream registry",
    ) -> Deferred[UpstreamError]:
        """
        What C{response}, not the one hoped for, means (see L{_refusal}).
        """
        return Deferred.fromCoroutine(
            _refusal(response, unknown, self._clock, self._timeout, whom)
        )

    def fetch_blob(
        self, name: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> Deferred[IResponse]:
        async def fetch() -> IResponse:
            extra = {b"Range": b"bytes=%d-" % offset} if offset else {}
            if end is not None:
                extra = {b"Range": b"bytes=%d-%d" % (offset, end - 1)}
            response = await self._send("GET", name, f"blobs/{digest}", extra=extra)
            if end is not None and response.code in (200, 206):
                answered = _header(response, b"content-range") or ""
                if response.code != 206 or not answered.startswith(
                    f"bytes {offset}-{end - 1}/"
                ):
                    _discard(response, self._clock, self._timeout)
                    raise RangeIgnored(
                        f"upstream answered {response.code} {answered[:60]!r}"
                        f" to a request for bytes {offset}-{end - 1}"
                    )
            ranged = bool(offset) or end is not None
            if ranged and response.code == 416:
                _discard(response, self._clock, self._timeout)
                raise RangeNotSatisfiable(f"upstream has no bytes past {offset}")
            if response.code not in ((200, 206) if ranged else (200,)):
                raise await self._refusal(response, BlobUnknown)
            return response

        return Deferred.fromCoroutine(fetch())

    def stat_blob(self, name: str, digest: Digest) -> Deferred[BlobInfo]:
        async def stat() -> BlobInfo:
            response = await self._send("HEAD", name, f"blobs/{digest}")
            if response.code != 200:
                raise await self._refusal(response, BlobUnknown)
            return BlobInfo(_declared_length(response))

        return Deferred.fromCoroutine(stat())

    def fetch_manifest(
        self, name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[Manifest]:
        async def fetch() -> Manifest:
            response = await self._send("GET", name, f"manifests/{reference}", accept)
            if response.code != 200:
                raise await self._refusal(response, ManifestUnknown)
            content = await self._read_body(response, MAX_MANIFEST_SIZE)
            expected = _expected_digest(reference) or _declared_digest(response)
            algorithm = expected.algorithm if expected else "sha256"
            digest = Digest.of(content, algorithm)
            if expected is not None and digest != expected:
                raise UpstreamError(f"upstream manifest is {digest}, not {expected}")
            media_type = _header(response, b"content-type")
            if not media_type:
                raise UpstreamError("upstream manifest has no Content-Type")
            return Manifest(content, media_type, digest)

        return Deferred.fromCoroutine(fetch())

    def stat_manifest(
        self, name: str, reference: str, accept: Sequence[str]
    ) -> Deferred[ManifestInfo]:
        async def stat() -> ManifestInfo:
            response = await self._send("HEAD", name, f"manifests/{reference}", accept)
            if response.code != 200:
                raise await self._refusal(response, ManifestUnknown)
            return ManifestInfo(
                _declared_digest(response),
                _header(response, b"content-type"),
                _declared_length(response),
            )

        return Deferred.fromCoroutine(stat())

    def fetch_tags(
        self, name: str, n: int | None, last: str | None
    ) -> Deferred[Listing]:
        async def fetch() -> Listing:
            query = {"n": n, "last": last}
            path = _with_query("tags/list", query)
            response = await self._send("GET", name, path)
            if response.code != 200:
                raise await self._refusal(response, RepositoryUnknown)
            return await self._listing(response)

        return Deferred.fromCoroutine(fetch())

    def fetch_referrers(
        self, name: str, digest: Digest, artifact_type: str | None
    ) -> Deferred[Listing]:
        async def fetch() -> Listing:
            query = {"artifactType": artifact_type}
            path = _with_query(f"referrers/{digest}", query)
            response = await self._send("GET", name, path)
            if response.code == 404:
                try:
                    body = await self._read_body(response, _MAX_SMALL_BODY)
                except UpstreamError:
                    body = b""
                codes = _error_codes(body)
                if "NAME_UNKNOWN" in codes:
                    raise RepositoryUnknown("repository unknown to the upstream (404)")
                if "MANIFEST_UNKNOWN" in codes:
                    raise ManifestUnknown("manifest unknown to the upstream (404)")
                raise ReferrersUnsupported("the upstream has no referrers API (404)")
            if response.code != 200:
                raise await self._refusal(response, None)
            return await self._listing(response)

        return Deferred.fromCoroutine(fetch())

    async def _listing(self, response: IResponse) -> Listing:
        """
        The L{Listing} a successful tags list or referrers response holds.

        @raise UpstreamError: if its body is larger than L{MAX_LISTING_SIZE}
            or not a JSON object.
        """
        content = await self._read_body(response, MAX_LISTING_SIZE)
        try:
            if not isinstance(json.loads(content), dict):
                raise ValueError("not an object")
        except ValueError:
            raise UpstreamError("upstream listing is not a JSON object") from None
        filters = _header(response, b"oci-filters-applied") or ""
        return Listing(
            content,
            _header(response, b"link"),
            "artifacttype" in filters.lower().replace(" ", "").split(","),
        )

    async def _send(
        self,
        method: str,
        name: str,
        path: str,
        accept: Sequence[str] = (),
        extra: dict[bytes, bytes] | None = None,
    ) -> IResponse:
        """
        Send C{method} for C{/v2/<name>/<path>}, answering one authentication
        challenge and following redirects, and return the final response,
        whatever its status.

        @raise UpstreamError: for a redirect from https to http, or to
            anything but http(s), and for too many redirects.
        """
        url = f"{self.base_url}/v2/{name}/{path}"
        origin = _origin(url)
        scope = f"repository:{name}:pull"
        challenged = False
        redirects = 0
        while True:
            headers = Headers({b"Accept-Encoding": [b"identity"]})
            for key, value in (extra or {}).items():
                headers.setRawHeaders(key, [value])
            if accept:
                headers.setRawHeaders(b"Accept", [", ".join(accept).encode()])
            at_registry = _origin(url) == origin
            authorization = self._authorization(scope) if at_registry else None
            if authorization is not None:
                headers.setRawHeaders(b"Authorization", [authorization])
            response = await self._request(method, url, headers)
            if response.code == 401 and at_registry and not challenged:
                challenged = True
                _discard(response, self._clock, self._timeout)
                await self._answer_challenge(response, scope)
                continue
            location = _header(response, b"location")
            if response.code in _REDIRECTS and location:
                _discard(response, self._clock, self._timeout)
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise UpstreamError(
                        f"more than {MAX_REDIRECTS} redirects from upstream"
                    )
                url = _redirect_target(url, location)
                continue
            return response

    async def _request(self, method: str, url: str, headers: Headers) -> IResponse:
        """
        Send one request and wait, at most the timeout, for its headers.

        @raise UpstreamError: if the upstream is unreachable or gives no
            answer in time.
        @raise CancelledError: if the caller cancelled; the request is
            abandoned.
        """
        sent = self._client.request(
            method, url, headers=headers, allow_redirects=False, unbuffered=True
        )
        # The timeout is kept here rather than left to treq: treq's cancels
        # the request too, and only a flag tells its expiry from a caller
        # that went away (and treq's would run on the global reactor, not on
        # this clock).
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            sent.cancel()

        answer = _cancellable(sent)
        timer = self._clock.callLater(self._timeout, expire)
        try:
            response: IResponse = await answer
        except Exception as e:
            if isinstance(e, CancelledError) and not expired:
                raise
            self._events.answered(None)
            if expired:
                raise UpstreamError(
                    f"upstream {_host(url)} gave no answer within {self._timeout:g} s"
                ) from None
            raise UpstreamError(
                f"upstream {_host(url)} unreachable: {why(e)}"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        self._events.answered(response.code)
        return response

    def _authorization(self, scope: str) -> bytes | None:
        if self._scheme == "bearer":
            token = self._tokens.get(scope)
            return None if token is None else f"Bearer {token.value}".encode()
        if self._scheme == "basic" and self._credentials is not None:
            return self._credentials.basic()
        return None

    async def _answer_challenge(self, response: IResponse, scope: str) -> None:
        """
        Get what the upstream's C{WWW-Authenticate} challenge asks for, so that
        the request can be sent again.

        @raise UpstreamRefused: (401) if blobserve has nothing to answer it
            with, or the token server refuses (401, 403, 429).
        @raise UpstreamError: if the token server fails otherwise.
        """
        challenges = [
            parse_challenge(value.decode("latin-1"))
            for value in response.headers.getRawHeaders(b"www-authenticate") or []
        ]
        by_scheme = {c.scheme: c for c in challenges if c is not None}
        bearer = by_scheme.get("bearer")
        if bearer is not None and bearer.parameters.get("realm"):
            self._scheme = "bearer"
            self._tokens.put(scope, await self._fetch_token(bearer.parameters, scope))
        elif "basic" in by_scheme and self._credentials is not None:
            self._scheme = "basic"
        else:
            raise UpstreamRefused(
                401, "the upstream registry asks for credentials (401)"
            )

    async def _fetch_token(self, challenge: dict[str, str], scope: str) -> Token:
        query = {"scope": challenge.get("scope", scope)}
        if "service" in challenge:
            query["service"] = challenge["service"]
        realm = challenge["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UpstreamError("the upstream's token realm is not an http(s) URL")
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
        headers = Headers()
        if self._credentials is not None:
            if self._may_send_credentials(parts):
                headers.setRawHeaders(b"Authorization", [self._credentials.basic()])
            else:
                self._warn_withheld(parts)
        response = await self._request("GET", url, headers)
        if response.code != 200:
            raise await self._refusal(response, None, f"token server {_host(url)}")
        body = await self._read_body(response, _MAX_SMALL_BODY)
        try:
            return parse_token_response(body, self._clock.seconds())
        except AuthenticationFailed as e:
            raise UpstreamError(f"token server {_host(url)}: {e}") from None

    def _may_send_credentials(self, realm: SplitResult) -> bool:
        """
        Whether the credentials may go to the token realm C{realm}: over https
        always; over plain http only if the upstream itself is plain http and
        the realm is on its host and port, where they could be read anyway.
        """
        if realm.scheme == "https":
            return True
        upstream = urlsplit(self.base_url)
        if realm.scheme != "http" or upstream.scheme != "http":
            return False
        where = _host_and_port(realm)
        return where is not None and where == _host_and_port(upstream)

    def _warn_withheld(self, realm: SplitResult) -> None:
        where = f"{realm.scheme}://{realm.netloc.rpartition('@')[2]}"
        if where in self._withheld_from:
            return
        self._withheld_from.add(where)
        log.warn(
            "not sending the upstream credentials over plain http to the token"
            " server {realm}: only https, or a plain http upstream's own host"
            " and port, get them; asking for an anonymous token",
            realm=where,
        )


def _host_and_port(parts: SplitResult) -> tuple[str, int] | None:
    """
    The host and port an http(s) URL's request goes to, or L{None} if it
    names none that can be told.
    """
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname, default if port is None else port


def _redirect_target(url: str, location: str) -> str:
    """
    Where a redirect from C{url} to C{location} goes.

    @raise UpstreamError: if that is not http(s), or plain http from https.
    """
    target = urljoin(url, location)
    scheme = urlsplit(target).scheme
    if scheme == "http" and urlsplit(url).scheme == "https":
        raise UpstreamError(
            f"upstream {_host(url)} redirected from https to plain http; refused"
        )
    if scheme not in ("http", "https"):
        raise UpstreamError(f"upstream {_host(url)} redirected to a non-http URL")
    return target


def _with_query(path: str, query: Mapping[str, str | int | None]) -> str:
    """
    C{path} with the parameters of C{query} that are not L{None}.
    """
    given = {key: value for key, value in query.items() if value is not None}
    return f"{path}?{urlencode(given)}" if given else path


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _expected_digest(reference: str) -> Digest | None:
    try:
        return Digest.parse(reference)
    except InvalidDigest:
        return None


class UnknownRegistry(LookupError):
    """
    A request names a registry that blobserve has no upstream for.
    """


@frozen
class Upstreams:
    """
    The registries blobserve mirrors, by name (C{docker.io}, C{ghcr.io}), and
    the one used when a request names none.
    """

    by_registry: dict[str, IUpstream]
    default: str

    def resolve(self, registry: str | None) -> tuple[str, IUpstream]:
        """
        The name and upstream of C{registry} (a containerd mirror request's
        C{ns}), or of the default registry if L{None}.

        @raise UnknownRegistry: if blobserve does not mirror C{registry}.
        """
        name = self.default if registry is None else registry
        try:
            return name, self.by_registry[name]
        except KeyError:
            raise UnknownRegistry(registry) from None
