"""
The registry's HTTP face: routing, OCI error bodies and headers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from blobserve.digest import Digest, InvalidDigest
from blobserve.failures import why
from blobserve.fetch.download import Landing
from blobserve.fetch.inflight import IInFlightTable
from blobserve.fetch.layers import LayerPrefetcher
from blobserve.fetch.slots import QueueFull
from blobserve.fetch.writer import BlobTooLarge, IBlobProgress
from blobserve.ops.access import Exchange, shown_uri
from blobserve.serve.forwarded import ForwardedRange
from blobserve.serve.multipart import byteranges
from blobserve.serve.producer import CompleteBlob, FollowingProducer
from blobserve.serve.turns import TurnScheduler
from blobserve.serve.zerocopy import IZeroCopySink, SocketSink
from blobserve.store.eviction import StoreFull
from blobserve.store.files import BlobReader, IBlobStore
from blobserve.upstream.client import (
    BlobInfo,
    BlobUnknown,
    IUpstream,
    Listing,
    Manifest,
    ManifestInfo,
    ManifestUnknown,
    RepositoryUnknown,
    UnknownRegistry,
    UpstreamError,
    UpstreamRefused,
    Upstreams,
)
from blobserve.web.conditional import not_modified, range_allowed
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache
from blobserve.web.names import InvalidName, InvalidTag, parse_name, parse_tag
from blobserve.web.ranges import ByteRange, UnsatisfiableRange, parse_ranges
from blobserve.web.referrers import INDEX_MEDIA_TYPE, Referrers
from blobserve.web.scope import RepositoryScope
from blobserve.web.tags import InvalidPage, TagsLists, next_link, parse_page

log = Logger()

_T = TypeVar("_T")

_BLOB_PATH = re.compile(rb"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_MANIFEST_PATH = re.compile(rb"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
_TAGS_PATH = re.compile(rb"/v2/(?P<name>.+)/tags/list")
_REFERRERS_PATH = re.compile(rb"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")
_BASE_PATHS = {b"/v2", b"/v2/"}

#: How far beyond the bytes of a download on disk a range may start and still
#: wait for them to land; one that starts farther is asked of the upstream.
#: At 10 MiB/s a range this close lands within a tenth of a second, about
#: what asking the upstream costs.
WAIT_WITHIN = 1024 * 1024

#: How many ranges may be asked of upstreams at once, outside the download
#: slots; beyond that a range waits for its bytes on disk. Clients choose
#: how many ranges they ask for, and each forwarded one is an upstream
#: connection of its own.
MAX_FORWARDED = 32


class OCIError(Exception):
    """
    An error the client is told about with the distribution spec's error body.

    @ivar headers: more response headers that go with it.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


#: How the upstream's refusals are told: the same status, the spec's code.
_REFUSAL_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}


def error_for(reason: Failure, asked: str = "a request") -> OCIError:
    """
    The OCI error that tells a client why its blob or manifest cannot be
    served.

    The upstream's answers keep their meaning: 404 C{NAME_UNKNOWN},
    C{BLOB_UNKNOWN} or C{MANIFEST_UNKNOWN} when it has no such thing, 401
    C{UNAUTHORIZED}, 403 C{DENIED}, 429 C{TOOMANYREQUESTS} (with its
    C{Retry-After}, when sane) when it refuses; 502 only when it is
    unreachable or fails. A blob the store has no room for, even after
    evicting every blob nobody reads, is 507 C{UNAVAILABLE}: the cache,
    not the registry, lacks something, and the client should pull it from
    elsewhere.

    An upstream's 401 carries no C{WWW-Authenticate}: the upstream's
    challenge names its realm, which is none of a mirror client's business,
    and a client that passed blobserve's own check (C{--htpasswd}, see
    L{blobserve.web.clientauth}) has no other credentials to answer with.
    The distribution spec has 401 only I{often} come with a challenge;
    containerd and Docker take a 401 without one as final and move on to
    their next host.

    A storage error is logged as one line naming C{asked} (what the client
    asked for) and the error; an unexpected error, a bug, with its
    traceback.
    """
    if reason.check(OCIError):
        return reason.value  # type: ignore[return-value]
    if reason.check(RepositoryUnknown):
        return OCIError(404, "NAME_UNKNOWN", "repository name not known to registry")
    if reason.check(BlobUnknown):
        return OCIError(404, "BLOB_UNKNOWN", "blob unknown to registry")
    if reason.check(ManifestUnknown):
        return OCIError(404, "MANIFEST_UNKNOWN", "manifest unknown to registry")
    if reason.check(QueueFull):
        full: QueueFull = reason.value  # type: ignore[assignment]
        return OCIError(
            503,
            "TOOMANYREQUESTS",
            str(full),
            {b"Retry-After": b"%d" % full.retry_after},
        )
    if reason.check(BlobTooLarge):
        return OCIError(403, "DENIED", reason.getErrorMessage())
    if reason.check(StoreFull):
        return OCIError(507, "UNAVAILABLE", reason.getErrorMessage())
    if reason.check(UpstreamRefused):
        refused: UpstreamRefused = reason.value  # type: ignore[assignment]
        headers = {}
        if refused.status == 429 and refused.retry_after is not None:
            headers[b"Retry-After"] = refused.retry_after.encode("ascii")
        code = _REFUSAL_CODES.get(refused.status)
        if code is not None:
            return OCIError(refused.status, code, str(refused), headers)
    if reason.check(UpstreamError):
        return OCIError(502, "UNKNOWN", reason.getErrorMessage())
    if reason.check(OSError):
        log.error(
            "storage error answering {asked}: {why}", asked=asked, why=why(reason)
        )
        return OCIError(503, "UNAVAILABLE", "the cache cannot store blobs right now")
    log.failure("unexpected error answering {asked}", reason, asked=asked)
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
    for name, value in error.headers.items():
        request.setHeader(name, value)
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
        sink_for: Callable[[Request], IZeroCopySink | None] = SocketSink.under,
        listings: ListingCache | None = None,
        layers: LayerPrefetcher | None = None,
    ) -> None:
        """
        @param client_timeout: seconds a client may take no bytes of a blob
            before it is dropped (needs C{clock}).
        @param sink_for: finds where a blob response's body may go with
            C{sendfile} (see L{FollowingProducer}).
        @param listings: keeps tags lists and referrers; without it, they
            are not served (404).
        @param layers: told of each image manifest served with a C{GET}, to
            prefetch its blobs (C{--prefetch-layers}); without it, none are.
        """
        super().__init__()
        # The blob responses in progress, and the digest of the download in
        # flight each follows (None: a stored blob, or a range forwarded
        # from the upstream).
        self._responses: dict[FollowingProducer | ForwardedRange, Digest | None] = {}
        # Requests answered with a range asked of the upstream, until they end.
        self._forwarding = 0
        self._clock = clock
        # One for every response, so that they share each turn of the
        # reactor rather than each taking one of its own.
        self._turns = None if clock is None else TurnScheduler(clock)
        self._client_timeout = client_timeout
        self._sink_for = sink_for
        self._store = store
        self._scope = RepositoryScope(store)
        self._downloads = downloads
        self._manifests = manifests
        self._upstreams = upstreams
        self._tags = None if listings is None else TagsLists(listings)
        self._referrers = None if listings is None else Referrers(listings, manifests)
        self._layers = layers

    def responses_in_progress(self) -> int:
        """
        How many blob responses are being sent now.
        """
        return len(self._responses)

    def following(self) -> Counter[Digest]:
        """
        How many blob responses follow each download in flight, by digest.
        """
        return Counter(d for d in self._responses.values() if d is not None)

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"Docker-Distribution-API-Version", b"registry/2.0")
        try:
            return self._route(request)
        except Exception:
            # An OCIError says what to answer; anything else is a bug, logged
            # and answered with a 500 in the protocol's own terms.
            _finish_with_error(request, Failure())
            return NOT_DONE_YET

    def _route(self, request: Request) -> bytes | int:
        path = request.path
        if request.method not in (b"GET", b"HEAD"):
            raise OCIError(405, "UNSUPPORTED", "this registry mirror is read-only")
        if path in _BASE_PATHS:
            _note(request, "base")
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"2")
            return b"{}"
        match = _MANIFEST_PATH.fullmatch(path)
        if match is not None:
            _note(request, "manifest")
            name, reference = _parse_manifest_path(match)
            if request.method == b"HEAD":
                return self._head_manifest(request, name, reference)
            return self._get_manifest(request, name, reference)
        match = _TAGS_PATH.fullmatch(path)
        if match is not None and self._tags is not None:
            _note(request, "tags")
            return self._get_tags(request, self._tags, _parse_name(match["name"]))
        match = _REFERRERS_PATH.fullmatch(path)
        if match is not None and self._referrers is not None:
            _note(request, "referrers")
            name, digest = _parse_blob_path(match)
            return self._get_referrers(request, self._referrers, name, digest)
        match = _BLOB_PATH.fullmatch(path)
        if match is None:
            # 404 says that nothing is here; the spec has no code for an
            # unknown endpoint, and UNSUPPORTED claims less than NAME_UNKNOWN,
            # which would say that a repository does not exist.
            raise OCIError(404, "UNSUPPORTED", "no such endpoint")
        _note(request, "blob")
        name, digest = _parse_blob_path(match)
        _note(request, digest=digest)
        if request.method == b"HEAD" or _client_holds(request, digest):
            # What the client holds needs no body from anywhere: only
            # whether the blob is there, as for a HEAD.
            return self._head_blob(request, name, digest)
        return self._get_blob(request, name, digest)

    def _get_blob(self, request: Request, name: str, digest: Digest) -> int:
        registry, upstream = self._upstream_for(request)
        reader = self._store.open(digest)
        if reader is not None:
            if not self._scope.holds(registry, name, digest):
                reader.close()
                return self._confirm_then(request, upstream, registry, name, digest)
            _blob_outcome(request, "hit")
            self._stream(request, digest, reader)
            return NOT_DONE_YET

        download = self._downloads.get(digest)
        # The upstream's answer to a download for another repository says
        # nothing of this one.
        foreign = download is not None and (download.registry, download.name) != (
            registry,
            name,
        )
        if foreign and not self._scope.holds(registry, name, digest):
            return self._confirm_then(request, upstream, registry, name, digest)
        joining = download is not None
        _blob_outcome(request, "join" if joining else "miss")
        ready = self._downloads.join(name, digest, upstream, registry).when_ready()

        def follow(landing: Landing) -> None:
            self._saw(request, name, digest)
            ahead = _range_ahead(request, digest, landing)
            if ahead is None or self._forwarding >= MAX_FORWARDED:
                self._stream(request, digest, landing.open_reader(), landing)
            else:
                self._forward(request, name, digest, upstream, ahead, landing)

        # A client that leaves before the upstream answers stops waiting (and
        # when no client is left waiting, the download is abandoned).
        _answer_with(request, ready, follow)
        return NOT_DONE_YET

    def _forward(
        self,
        request: Request,
        name: str,
        digest: Digest,
        upstream: IUpstream,
        byte_range: ByteRange,
        landing: Landing,
    ) -> None:
        """
        Answer a request for C{byte_range}, which lies beyond the bytes on
        disk of a blob landing as C{landing}, with the upstream's answer to
        the same range, streamed through; or, if the upstream does not answer
        it, from disk as the bytes land.
        """
        _note(request, outcome="forward")
        asked = upstream.fetch_blob(name, digest, byte_range.start, byte_range.end)
        self._forwarding += 1

        def ended(_: object) -> None:
            self._forwarding -= 1
            asked.cancel()

        request.notifyFinish().addBoth(ended)

        def answer(response: IResponse) -> None:
            _blob_headers(request, digest, byte_range.length)
            _range_headers(request, byte_range)
            forwarded = ForwardedRange(
                request,
                response,
                byte_range.end - byte_range.start,
                self._clock,
                client_timeout=self._client_timeout,
                on_first_byte=self._first_byte_note(request),
            )
            self._track(forwarded, None)
            forwarded.start()

        def from_disk(reason: Failure) -> None:
            if _over(request):
                return
            log.info(
                "serving a range of {digest} from disk: {reason}",
                digest=str(digest),
                reason=why(reason),
            )
            reader = self._store.open(digest)
            if reader is not None:
                self._stream(request, digest, reader)
            else:
                self._stream(request, digest, landing.open_reader(), landing)

        asked.addCallbacks(answer, from_disk).addErrback(
            lambda reason: _finish_with_error(request, reason)
        )

    def _get_manifest(self, request: Request, name: str, reference: str) -> int:
        d = Deferred.fromCoroutine(self._current_manifest(request, name, reference))

        def send(manifest: Manifest | Digest) -> None:
            if _over(request):
                return
            digest = manifest if isinstance(manifest, Digest) else manifest.digest
            _note(request, digest=digest)
            # Compared again: a tag whose upstream HEAD gave no digest is known
            # only now.
            if isinstance(manifest, Digest) or _client_holds(request, digest):
                _finish_not_modified(request, digest)
                return
            _manifest_headers(
                request, manifest.digest, manifest.media_type, len(manifest.content)
            )
            request.write(manifest.content)
            request.finish()
            if self._layers is not None:
                registry, upstream = self._upstream_for(request)
                self._layers.served(registry, upstream, name, manifest)

        _answer_with(request, d, send)
        return NOT_DONE_YET

    async def _current_manifest(
        self, request: Request, name: str, reference: str
    ) -> Manifest | Digest:
        """
        The manifest a GET of C{reference} is answered with; or, when the
        request's C{If-None-Match} names what C{reference} resolves to, its
        digest, and no manifest is fetched.
        """
        registry, upstream = self._upstream_for(request)
        note = partial(_note_outcome, request)
        accept = _accept(request)
        # A tag must be resolved to be compared; a digest need not be, unless
        # the client holds it (a 304 says that it still exists).
        known = Digest.parse(reference) if ":" in reference else None
        conditional = _header_values(request, b"if-none-match") and (
            known is None or _client_holds(request, known)
        )
        if conditional:
            info = await self._manifests.head(
                registry, upstream, name, reference, accept, note
            )
            if info.digest is not None:
                if _client_holds(request, info.digest):
                    return info.digest
                # Fetched by the digest the tag was just resolved to: no
                # second HEAD for the tag.
                reference = str(info.digest)
        return await self._manifests.get(
            registry, upstream, name, reference, accept, note
        )

    def _head_manifest(self, request: Request, name: str, reference: str) -> int:
        registry, upstream = self._upstream_for(request)
        note = partial(_note_outcome, request)
        d = self._manifests.head(
            registry, upstream, name, reference, _accept(request), note
        )

        def send(info: ManifestInfo) -> None:
            if _over(request):
                return
            if info.digest is not None and _client_holds(request, info.digest):
                _finish_not_modified(request, info.digest)
                return
            _manifest_headers(request, info.digest, info.media_type, info.length)
            request.finish()

        _answer_with(request, d, send)
        return NOT_DONE_YET

    def _get_tags(self, request: Request, tags: TagsLists, name: str) -> int:
        try:
            n, last = parse_page(_argument(request, b"n"), _argument(request, b"last"))
        except InvalidPage as e:
            raise OCIError(400, "UNSUPPORTED", str(e)) from None
        registry, upstream = self._upstream_for(request)
        note = partial(_note_outcome, request)
        d = tags.get(registry, upstream, name, n, last, note)
        ns = _argument(request, b"ns")

        def send(listing: Listing) -> None:
            link = next_link(listing.link, name, ns)
            if link is not None:
                request.setHeader(b"Link", link.encode("latin-1"))
            _send_listing(request, listing, "application/json")

        _answer_with(request, d, send)
        return NOT_DONE_YET

    def _get_referrers(
        self, request: Request, referrers: Referrers, name: str, digest: Digest
    ) -> int:
        registry, upstream = self._upstream_for(request)
        note = partial(_note_outcome, request)
        artifact_type = _argument(request, b"artifactType")
        d = referrers.get(registry, upstream, name, digest, artifact_type, note)

        def send(listing: Listing) -> None:
            if listing.filtered:
                request.setHeader(b"OCI-Filters-Applied", b"artifactType")
            _send_listing(request, listing, INDEX_MEDIA_TYPE)

        _answer_with(request, d, send)
        return NOT_DONE_YET

    def _confirm_then(
        self,
        request: Request,
        upstream: IUpstream,
        registry: str,
        name: str,
        digest: Digest,
    ) -> int:
        """
        Answer a request for a blob that the store holds, or is fetching, for
        another repository once the upstream confirms that repository
        C{name} holds it too (then it is answered as if that had been known
        from the start), or with the upstream's answer if it does not.
        """
        confirmed = self._scope.confirm(
            registry, name, digest, lambda: upstream.stat_blob(name, digest)
        )
        _answer_with(request, confirmed, lambda _: _render_again(request, self))
        return NOT_DONE_YET

    def _saw(self, request: Request, name: str, digest: Digest) -> None:
        """
        Remember that repository C{name} of the registry C{request} is for
        holds C{digest}.
        """
        try:
            registry, _ = self._upstream_for(request)
        except OCIError:
            return
        self._store.saw(registry, name, digest)

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
        landing: Landing | None = None,
    ) -> None:
        """
        Answer a blob GET with the whole blob or the single range it asks for,
        read by C{reader}: a committed blob, or one landing as C{landing} says.

        C{reader} is this call's to close: the producer takes it over once it
        is made, and before that nothing that fails keeps it open.
        """
        try:
            producer = self._producer_for(request, digest, reader, landing)
        except BaseException:
            reader.close()
            raise
        if producer is None:
            reader.close()
            return
        self._track(producer, None if landing is None else digest)
        producer.start()

    def _track(
        self, producer: FollowingProducer | ForwardedRange, digest: Digest | None
    ) -> None:
        """
        Count C{producer} among the responses in progress until it ends.
        """
        self._responses[producer] = digest
        producer.when_released().addCallback(
            lambda _: self._responses.pop(producer, None)
        )

    def _first_byte_note(self, request: Request) -> Callable[[], object] | None:
        """
        What tells C{request}'s exchange, if it keeps one, when its first body
        byte went.
        """
        exchange = _note(request)
        if exchange is None or self._clock is None:
            return None
        return partial(exchange.first_byte_sent, self._clock.seconds)

    def _producer_for(
        self,
        request: Request,
        digest: Digest,
        reader: BlobReader,
        landing: Landing | None,
    ) -> FollowingProducer | None:
        """
        Set the response's status and headers, and make the producer that will
        send its body; or answer a range that cannot be served, and return
        L{None}.
        """
        progress: IBlobProgress
        length: int | None
        if landing is None:
            length = reader.size()
            progress = CompleteBlob(length)
        else:
            length, progress = landing.length, landing.progress
        start, end = 0, length
        ranges = None
        if length is not None:
            asked = _header(request, b"range")
            if not range_allowed(_header_values(request, b"if-range"), str(digest)):
                asked = None
            try:
                ranges = parse_ranges(asked, length)
            except UnsatisfiableRange:
                # The spec has no error code for it: no body, only the length.
                request.setResponseCode(416)
                request.setHeader(b"Content-Range", b"bytes */%d" % length)
                request.setHeader(b"Content-Length", b"0")
                request.finish()
                return None
        _blob_headers(request, digest, length)
        spans, tail = [], b""
        if ranges is not None and len(ranges) == 1:
            start, end = ranges[0].start, ranges[0].end
            _range_headers(request, ranges[0])
        elif ranges is not None and length is not None:
            body = byteranges([(r.start, r.end) for r in ranges], length)
            start, end, spans, tail = 0, 0, body.spans, body.tail
            request.setResponseCode(206)
            request.setHeader(b"Content-Type", body.content_type)
            request.setHeader(b"Content-Length", b"%d" % body.length)
        return FollowingProducer(
            request,
            reader,
            progress,
            start,
            end,
            clock=self._clock,
            turns=self._turns,
            client_timeout=self._client_timeout,
            sink_for=self._sink_for,
            on_first_byte=self._first_byte_note(request),
            spans=spans,
            tail=tail,
            # A client of a range cannot verify what it gets, so holding a
            # byte back would only delay it.
            hold_back=ranges is None,
        )

    def _head_blob(self, request: Request, name: str, digest: Digest) -> int:
        """
        Answer a HEAD of a blob, or a GET of one the client holds (a 304),
        from the store when it holds the blob, else from the upstream's
        C{HEAD}: a 304 says that the blob is still there, so a blob not
        stored is confirmed upstream (as the repository asked for), and its
        errors are passed on. Nothing is downloaded.
        """
        registry, upstream = self._upstream_for(request)
        reader = self._store.open(digest)
        if reader is not None:
            if not self._scope.holds(registry, name, digest):
                reader.close()
                return self._confirm_then(request, upstream, registry, name, digest)
            _blob_outcome(request, "hit")
            try:
                length = reader.size()
            finally:
                reader.close()
            _finish_blob_head(request, digest, length)
            return NOT_DONE_YET

        d = upstream.stat_blob(name, digest)
        _blob_outcome(request, "miss")

        def answer(info: BlobInfo) -> None:
            if _over(request):
                return
            _finish_blob_head(request, digest, info.length)

        _answer_with(request, d, answer)
        return NOT_DONE_YET


def _range_headers(request: Request, byte_range: ByteRange) -> None:
    request.setResponseCode(206)
    request.setHeader(b"Content-Range", byte_range.content_range.encode())
    request.setHeader(b"Content-Length", b"%d" % (byte_range.end - byte_range.start))


def _range_ahead(
    request: Request, digest: Digest, landing: Landing
) -> ByteRange | None:
    """
    The single range C{request} asks for, if it starts more than
    L{WAIT_WITHIN} bytes beyond those of C{landing} on disk (and its
    C{If-Range}, if any, lets a range be served); else L{None}.
    """
    if landing.length is None:
        return None
    if not range_allowed(_header_values(request, b"if-range"), str(digest)):
        return None
    try:
        ranges = parse_ranges(_header(request, b"range"), landing.length)
    except UnsatisfiableRange:
        return None
    if ranges is None or len(ranges) != 1:
        return None
    if ranges[0].start <= landing.progress.written + WAIT_WITHIN:
        return None
    return ranges[0]


def _note(
    request: Request,
    route: str | None = None,
    outcome: str | None = None,
    digest: Digest | None = None,
) -> Exchange | None:
    """
    Note in C{request}'s exchange, if it keeps one (see
    L{blobserve.web.site.RegistrySite}), what it is for, what the cache did
    for it and what it served; and return that exchange.
    """
    exchange: Exchange | None = getattr(request, "exchange", None)
    if exchange is not None:
        if route is not None:
            exchange.route = route
        if outcome is not None:
            exchange.outcome = outcome
        if digest is not None:
            exchange.digest = digest
    return exchange


def _blob_outcome(request: Request, outcome: str) -> None:
    """
    Note what the cache did for a blob request, and tell the client in
    C{X-Blobserve-Cache}: C{hit} (the store held the blob), C{miss} (it did
    not, and nothing was fetching it) or C{join} (a download in flight).
    """
    _note(request, outcome=outcome)
    # Set before any answer goes out, so errors after it carry it too: a
    # miss that ends in a 404 was a miss.
    request.setHeader(b"X-Blobserve-Cache", outcome.encode())


def _note_outcome(request: Request, outcome: str) -> None:
    _note(request, outcome=outcome)


def _argument(request: Request, name: bytes) -> str | None:
    """
    The first value of the query parameter C{name}, if given.
    """
    values = request.args.get(name) if request.args else None
    return values[0].decode("latin-1") if values else None


def _send_listing(request: Request, listing: Listing, media_type: str) -> None:
    """
    Answer with a tags list or referrers body (nothing but headers to a
    C{HEAD}), unless the request is over.
    """
    if _over(request):
        return
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", media_type.encode("latin-1"))
    request.setHeader(b"Content-Length", b"%d" % len(listing.content))
    if request.method != b"HEAD":
        request.write(listing.content)
    request.finish()


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _header_values(request: Request, name: bytes) -> list[str]:
    """
    Every line of the request header C{name}, as the client sent it.
    """
    values = request.requestHeaders.getRawHeaders(name) or []
    return [value.decode("latin-1") for value in values]


def _client_holds(request: Request, digest: Digest) -> bool:
    """
    Whether C{request}'s C{If-None-Match} says that its client holds the
    object C{digest} names: its answer is a 304.
    """
    return not_modified(_header_values(request, b"if-none-match"), str(digest))


def _finish_not_modified(request: Request, digest: Digest) -> None:
    """
    Answer C{request} 304 Not Modified: the object's digest and entity tag,
    no body (and no length, which would have to be the object's).
    """
    request.setResponseCode(304)
    request.setHeader(b"Docker-Content-Digest", str(digest).encode())
    request.setHeader(b"ETag", f'"{digest}"'.encode())
    request.finish()


def _finish_blob_head(request: Request, digest: Digest, length: int | None) -> None:
    """
    Answer C{request} with the headers of the blob C{digest}, or 304 if its
    client holds the blob already.
    """
    if _client_holds(request, digest):
        _finish_not_modified(request, digest)
        return
    _blob_headers(request, digest, length)
    request.finish()


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
    return _header_values(request, b"accept")


def _parse_manifest_path(match: re.Match[bytes]) -> tuple[str, str]:
    name = _parse_name(match["name"])
    reference = match["reference"].decode("latin-1")
    # Neither a tag nor a digest names no manifest: 404, as the spec's
    # conformance suite expects, without asking the upstream.
    try:
        if ":" in reference:
            return name, str(Digest.parse(reference))
        return name, parse_tag(reference)
    except (InvalidDigest, InvalidTag) as e:
        message = f"manifest unknown: neither a tag nor a digest ({e})"
        raise OCIError(404, "MANIFEST_UNKNOWN", message) from None


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


def _render_again(request: Request, resource: Resource) -> None:
    """
    Render C{request} with C{resource} once more, now that what made it wait
    is settled, and finish it if C{resource} answered at once.
    """
    if _over(request):
        return
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
        request.finish()


def _over(request: Request) -> bool:
    """
    Whether C{request} can take no answer any more: its client has gone, or
    it has been answered.
    """
    # A finished request has no channel attribute left at all.
    return bool(request.finished) or getattr(request, "channel", None) is None


def _answer_with(
    request: Request, result: Deferred[_T], answer: Callable[[_T], None]
) -> None:
    """
    Answer C{request} with C{answer} once C{result} fires; whatever fails,
    C{result} or C{answer}, is answered as an error. Once C{request} is over,
    however it ended, C{result} is cancelled: what it was waiting for has
    nobody to go to.
    """
    request.notifyFinish().addBoth(lambda _: result.cancel())
    result.addCallback(answer).addErrback(
        lambda reason: _finish_with_error(request, reason)
    )


def _finish_with_error(request: Request, reason: Failure) -> None:
    """
    Answer a request with an OCI error, or, if its headers are sent already,
    cut its connection: a body that has begun must not end cleanly.
    """
    if _over(request):
        return  # the client has gone, or has its answer
    asked = f"{request.method.decode('latin-1')} {shown_uri(request.uri)}"
    if request.startedWriting:
        log.warn(
            "cutting off the response to {asked}: {reason}",
            asked=asked,
            reason=why(reason),
        )
        cast(ITCPTransport, request.channel.transport).abortConnection()
        return
    request.write(write_error(request, error_for(reason, asked)))
    request.finish()
