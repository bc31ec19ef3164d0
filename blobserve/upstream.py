"""
The upstream registry client, on treq.
"""

from __future__ import annotations

from attrs import frozen
from treq import collect
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import Interface, implementer

from blobserve.digest import Digest

log = Logger()


class UpstreamError(Exception):
    """
    The upstream could not be reached, or answered with something blobserve
    cannot pass on as a blob.
    """


class BlobUnknown(UpstreamError):
    """
    The upstream answered 404: it does not have the blob.
    """


@frozen
class BlobInfo:
    """
    What an upstream says about a blob before sending it.

    @ivar length: its size in bytes, or L{None} if the upstream did not say.
    """

    length: int | None


class IUpstream(Interface):
    """
    A registry that blobs are fetched from.
    """

    def fetch_blob(name: str, digest: Digest) -> Deferred[IResponse]:
        """
        Ask for the blob C{digest} of repository C{name}.

        @return: fires with a successful response whose body has not been read
            yet (deliver it to a protocol); fails with L{BlobUnknown} if the
            upstream does not have the blob, or L{UpstreamError} for anything
            else that is not a blob body.
        """

    def stat_blob(name: str, digest: Digest) -> Deferred[BlobInfo]:
        """
        Ask, without fetching it, whether the upstream has the blob and how
        large it is.

        @return: fires with L{BlobInfo}; fails as L{fetch_blob} does.
        """


def response_length(response: IResponse) -> int | None:
    """
    The response's C{Content-Length}, or L{None} if it has none.
    """
    length = response.length
    return None if length is UNKNOWN_LENGTH else int(length)


def _declared_length(response: IResponse) -> int | None:
    # A response to HEAD has no body, so its length is 0 whatever it declares.
    values = response.headers.getRawHeaders(b"content-length") or []
    try:
        length = int(values[0])
    except (IndexError, ValueError):
        return None
    return length if length >= 0 else None


@implementer(IUpstream)
@frozen
class RegistryUpstream:
    """
    A registry reached over HTTP(S) at C{base_url} through a treq client.

    @ivar timeout: seconds to wait for response headers.
    """

    base_url: str
    client: HTTPClient
    timeout: float = 30.0

    def fetch_blob(self, name: str, digest: Digest) -> Deferred[IResponse]:
        return self._blob_request("GET", name, digest)

    def stat_blob(self, name: str, digest: Digest) -> Deferred[BlobInfo]:
        d = self._blob_request("HEAD", name, digest)
        return d.addCallback(lambda response: BlobInfo(_declared_length(response)))

    def _blob_request(
        self, method: str, name: str, digest: Digest
    ) -> Deferred[IResponse]:
        url = f"{self.base_url.rstrip('/')}/v2/{name}/blobs/{digest}"
        d = self.client.request(
            method,
            url,
            headers=Headers({b"Accept-Encoding": [b"identity"]}),
            allow_redirects=False,
            unbuffered=True,
            timeout=self.timeout,
        )

        def unreachable(reason: Failure) -> Failure:
            if reason.check(CancelledError):
                message = f"no answer within {self.timeout:g} s"
            else:
                message = reason.getErrorMessage()
            raise UpstreamError(f"upstream {self.base_url} unreachable: {message}")

        return d.addCallbacks(self._check_status, unreachable)

    def _check_status(self, response: IResponse) -> IResponse:
        if response.code == 200:
            return response
        # Nobody wants the body of an error: drop it, freeing the connection.
        collect(response, lambda data: None).addErrback(lambda reason: None)
        if response.code == 404:
            raise BlobUnknown("blob unknown to upstream registry")
        raise UpstreamError(
            f"upstream {self.base_url} answered {response.code}"
            f" {response.phrase.decode('latin-1', 'replace')}"
        )


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

    def for_registry(self, registry: str | None) -> IUpstream:
        """
        The upstream for C{registry} (a containerd mirror request's C{ns}), or
        the default one if L{None}.

        @raise UnknownRegistry: if blobserve does not mirror C{registry}.
        """
        if registry is None:
            return self.by_registry[self.default]
        try:
            return self.by_registry[registry]
        except KeyError:
            raise UnknownRegistry(registry) from None
