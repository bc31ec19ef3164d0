"""
The registry's HTTP face: routing, OCI error bodies and headers.
"""

from __future__ import annotations

import json
import re

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from blobserve.digest import Digest, InvalidDigest
from blobserve.download import Landing
from blobserve.inflight import IInFlightTable
from blobserve.manifests import ManifestCache
from blobserve.names import InvalidName, InvalidTag, parse_name, parse_tag
from blobserve.producer import CompleteBlob, FollowingProducer
from blobserve.ranges import UnsatisfiableRange, parse_range
from blobserve.storage import BlobReader, IBlobStore
from blobserve.upstream import (
    BlobInfo,
    BlobUnknown,
    IUpstream,
    Manifest,
    ManifestInfo,
    ManifestUnknown,
    UnknownRegistry,
    UpstreamError,
    Upstreams,
)
from blobserve.writer import IBlobProgress

log = Logger()

_BLOB_PATH = re.compile(rb"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_MANIFEST_PATH = re.compile(rb"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
_BASE_PATHS = {b"/v2", b"/v2/"}

#: Where blobserve says what it is doing now, as JSON.
STATUS_PATH = b"/_blobserve/status"


class OCIError(Exception):
    """
    An error the client is told about with the distribution spec's error body.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_for(reason: Failure) -> OCIError:
    """
    The OCI error that tells a client why its blob or manifest cannot be
    served.
    """
    if reason.check(OCIError):
        return reason.value  # type: ignore[return-value]
    if reason.check(BlobUnknown):
        return OCIError(404, "BLOB_UNKNOWN", "blob unknown to registry")
    if reason.check(ManifestUnknown):
        return OCIError(404, "MANIFEST_UNKNOWN", "manifest unknown to registry")
    if reason.check(UpstreamError):
        return OCIError(502, "UNKNOWN", reason.getErrorMessage())
    if reason.check(OSError):
        log.failure("storage error", reason)
        return OCIError(503, "UNAVAILABLE", "the cache cannot store blobs right now")
    log.failure("unexpected error", reason)
    return OCIError(500, "UNKNOWN", "internal error")


def error_body(error: OCIError) -> bytes:
    """
    The distribution spec's JSON error body for C{error}.
    """
    return json.dumps(
        {"errors": [{"code": error.code, "message": error.message, "detail": None}]}
    ).encode()


def write_error(request: Request, error: OCIError) -> bytes:
    """
    Set the status and headers of C{error} on C{request} and return its body.
    """
    body = error_body(error)
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _blob_headers(request: Request, digest: Digest, length: int | None) -> None:
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"application/octet-stream")
    request.setHeader(b"Docker-Content-Digest", str(digest).encode())
    request.setHeader(b"ETag", f'"{digest}"'.encode())
    request.setHeader(b"Accept-Ranges", b"bytes")
    if length is not None:
        request.setHeader(b"Content-Length", b"%d" % length)


class RegistryResource(Resource):
    """
    The read-only part of the registry API that a pull-through blob cache
    serves: C{/v2/} and blobs by digest.
    """

    isLeaf = True

    def __init__(
        self,
        store: IBlobStore,
        downloads: IInFlightTable,
        manifests: ManifestCache,
        upstreams: Upstreams,
        clock: IReactorTime | None = None,
        client_timeout: float | None = None,
    ) -> None:
        """
        @param client_timeout: seconds a client may take no bytes of a blob
            before it is dropped (needs C{clock}).
        """
        super().__init__()
        self._responses: set[FollowingProducer] = set()
        self._clock = clock
        self._client_timeout = client_timeout
        self._store = store
        self._downloads = downloads
        self._manifests = manifests
        self._upstreams = upstreams

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        try:
            return self._route(request)
        except OCIError as error:
            body = write_error(request, error)
            return b"" if request.method == b"HEAD" else body

    def _route(self, request: Request) -> bytes | int:
        path = request.path
        if request.method not in (b"GET", b"HEAD"):
            raise OCIError(405, "UNSUPPORTED", "this registry mirror is read-only")
        if path == STATUS_PATH:
            return self._status(request)
        if path in _BASE_PATHS:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"2")
            return b"{}"
        match = _MANIFEST_PATH.fullmatch(path)
        if match is not None:
            name, reference = _parse_manifest_path(match)
            if request.method == b"HEAD":
                return self._head_manifest(request, name, reference)
            return self._get_manifest(request, name, reference)
        match = _BLOB_PATH.fullmatch(path)
        if match is None:
            raise OCIError(404, "NOT_FOUND", "no such endpoint")
        name, digest = _parse_blob_path(match)
        if request.method == b"HEAD":
            return self._head_blob(request, name, digest)
        return self._get_blob(request, name, digest)

    def _get_blob(self, request: Request, name: str, digest: Digest) -> int:
        reader = self._store.open(digest)
        if reader is not None:
            length = reader.size()
            self._stream(request, digest, reader, CompleteBlob(length), length)
            return NOT_DONE_YET

        _, upstream = self._upstream_for(request)
        ready = self._downloads.join(name, digest, upstream).when_ready()
        # A client that leaves before the upstream answers stops waiting; the
        # download goes on.
        request.notifyFinish().addErrback(lambda _: ready.cancel())

        def follow(landing: Landing) -> None:
            reader = landing.open_reader()
            self._stream(request, digest, reader, landing.progress, landing.length)

        ready.addCallbacks(follow, lambda reason: _finish_with_error(request, reason))
        return NOT_DONE_YET

    def _status(self, request: Request) -> bytes:
        """
        What is running now: downloads, their observers, blob responses.
        """
        downloads = list(self._downloads)
        status = {
            "downloads": len(downloads),
            "observers": sum(
                d.progress.observers for d in downloads if d.progress is not None
            ),
            "responses": len(self._responses),
        }
        body = json.dumps(status).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _get_manifest(self, request: Request, name: str, reference: str) -> int:
        registry, upstream = self._upstream_for(request)
        d = self._manifests.get(registry, upstream, name, reference, _accept(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def send(manifest: Manifest) -> None:
            _manifest_headers(
                request, manifest.digest, manifest.media_type, len(manifest.content)
            )
            request.write(manifest.content)
            request.finish()

        d.addCallbacks(send, lambda reason: _finish_with_error(request, reason))
        return NOT_DONE_YET

    def _head_manifest(self, request: Request, name: str, reference: str) -> int:
        registry, upstream = self._upstream_for(request)
        d = self._manifests.head(registry, upstream, name, reference, _accept(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def send(info: ManifestInfo) -> None:
            _manifest_headers(request, info.digest, info.media_type, info.length)
            request.finish()

        d.addCallbacks(send, lambda reason: _finish_with_error(request, reason))
        return NOT_DONE_YET

    def _upstream_for(self, request: Request) -> tuple[str, IUpstream]:
        """
        The upstream a request is for: the registry a containerd mirror
        request names with C{?ns=}, or the default.
        """
        names = request.args.get(b"ns") if request.args else None
        registry = names[0].decode("latin-1") if names else None
        try:
            return self._upstreams.resolve(registry)
        except UnknownRegistry:
            raise OCIError(
                404,
                "NAME_UNKNOWN",
                f"this mirror has no upstream for {str(registry)[:100]}",
            ) from None

    def _stream(
        self,
        request: Request,
        digest: Digest,
        reader: BlobReader,
        progress: IBlobProgress,
        length: int | None,
    ) -> None:
        """
        Answer a blob GET with the whole blob or the single range it asks for,
        read by C{reader} as C{progress} says it lands.
        """
        byte_range = None
        if length is not None:
            try:
                byte_range = parse_range(_header(request, b"range"), length)
            except UnsatisfiableRange as e:
                reader.close()
                request.setHeader(b"Content-Range", b"bytes */%d" % length)
                request.write(
                    write_error(request, OCIError(416, "RANGE_INVALID", str(e)))
                )
                request.finish()
                return
        _blob_headers(request, digest, length)
        start, end = 0, length
        if byte_range is not None:
            start, end = byte_range.start, byte_range.end
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", byte_range.content_range.encode())
            request.setHeader(b"Content-Length", b"%d" % (end - start))
        producer = FollowingProducer(
            request,
            reader,
            progress,
            start,
            end,
            clock=self._clock,
            client_timeout=self._client_timeout,
        )
        self._responses.add(producer)
        producer.when_released().addCallback(
            lambda _: self._responses.discard(producer)
        )
        producer.start()

    def _head_blob(self, request: Request, name: str, digest: Digest) -> int | bytes:
        reader = self._store.open(digest)
        if reader is not None:
            try:
                _blob_headers(request, digest, reader.size())
            finally:
                reader.close()
            return b""

        d = self._upstream_for(request)[1].stat_blob(name, digest)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def answer(info: BlobInfo) -> None:
            _blob_headers(request, digest, info.length)
            request.finish()

        d.addCallbacks(answer, lambda reason: _finish_with_error(request, reason))
        return NOT_DONE_YET


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _manifest_headers(
    request: Request,
    digest: Digest | None,
    media_type: str | None,
    length: int | None,
) -> None:
    request.setResponseCode(200)
    if media_type is not None:
        request.setHeader(b"Content-Type", media_type.encode("latin-1"))
    if digest is not None:
        request.setHeader(b"Docker-Content-Digest", str(digest).encode())
        request.setHeader(b"ETag", f'"{digest}"'.encode())
    if length is not None:
        request.setHeader(b"Content-Length", b"%d" % length)


def _accept(request: Request) -> list[str]:
    """
    The media types the client accepts, as it sent them, to pass upstream.
    """
    values = request.requestHeaders.getRawHeaders(b"accept") or []
    return [value.decode("latin-1") for value in values]


def _parse_manifest_path(match: re.Match[bytes]) -> tuple[str, str]:
    name = _parse_name(match["name"])
    reference = match["reference"].decode("latin-1")
    if ":" in reference:
        try:
            return name, str(Digest.parse(reference))
        except InvalidDigest as e:
            raise OCIError(400, "DIGEST_INVALID", str(e)) from None
    try:
        return name, parse_tag(reference)
    except InvalidTag as e:
        raise OCIError(400, "TAG_INVALID", str(e)) from None


def _parse_name(raw: bytes) -> str:
    try:
        return parse_name(raw.decode("ascii"))
    except (UnicodeDecodeError, InvalidName):
        message = f"invalid repository name: {raw[:100].decode('latin-1')!r}"
        raise OCIError(400, "NAME_INVALID", message) from None


def _parse_blob_path(match: re.Match[bytes]) -> tuple[str, Digest]:
    name = _parse_name(match["name"])
    try:
        digest = Digest.parse(match["digest"].decode("ascii"))
    except (UnicodeDecodeError, InvalidDigest) as e:
        raise OCIError(400, "DIGEST_INVALID", str(e)) from None
    return name, digest


def _finish_with_error(request: Request, reason: Failure) -> None:
    """
    Answer a request whose headers are not sent yet with an OCI error.
    """
    if reason.check(CancelledError) or request.channel is None:
        return  # the client has gone
    request.write(write_error(request, error_for(reason)))
    request.finish()
