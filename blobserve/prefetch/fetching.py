"""
Fetching images through a running blobserve: their manifests, then every
config and layer blob, a few at once, read and discarded as they arrive.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    FirstError,
    gatherResults,
)
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import Interface

from blobserve.digest import Digest
from blobserve.failures import why
from blobserve.prefetch.manifests import (
    ACCEPT,
    BadManifest,
    Parsed,
    Platform,
    distributable,
    parse_manifest,
    select,
)
from blobserve.prefetch.references import ImageReference

#: The largest manifest read; blobserve itself refuses larger ones.
MAX_MANIFEST = 4 * 1024 * 1024

#: How much of an error's body is read for its message.
MAX_ERROR_BODY = 64 * 1024

#: How deep indexes may nest (an index of indexes is allowed, once).
MAX_DEPTH = 2


class Unreachable(Exception):
    """
    blobserve did not answer at all.
    """


class ImageFailed(Exception):
    """
    An image's manifests could not be had; the message says why.
    """


@frozen
class Blob:
    """
    One blob to fetch, in the repository of the image that needs it.
    """

    image: ImageReference
    digest: Digest
    size: int

    @property
    def key(self) -> tuple[str | None, str, Digest]:
        # blobserve answers per repository (see "Repository scope"), so one
        # digest in two repositories is two fetches.
        return (self.image.registry, self.image.repository, self.digest)


@frozen
class BlobResult:
    """
    How fetching a blob ended: C{hit}, C{miss} or C{join} as blobserve's
    C{X-Blobserve-Cache} said (or L{None} if it did not), the bytes received,
    and why it failed if it did.
    """

    blob: Blob
    cache: str | None
    received: int
    failure: str | None = None


@define
class Summary:
    """
    What a prefetch did.
    """

    images: int = 0
    images_failed: int = 0
    cached: int = 0
    fetched: int = 0
    complete: int = 0
    failed: int = 0
    received: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every image resolved and every blob arrived complete."""
        return self.images_failed == 0 and self.failed == 0

    def add(self, result: BlobResult) -> None:
        self.received += result.received
        if result.failure is not None:
            self.failed += 1
            return
        self.complete += 1
        if result.cache == "hit":
            self.cached += 1
        elif result.cache in ("miss", "join"):
            self.fetched += 1


class IPrefetchEvents(Interface):
    """
    What a display is told as a prefetch goes.
    """

    def image_failed(image: ImageReference, reason: str) -> None:
        """C{image}'s manifests could not be had."""

    def blobs_found(blobs: Sequence[Blob]) -> None:
        """These blobs will be fetched."""

    def blob_started(blob: Blob) -> None:
        """C{blob}'s request goes out."""

    def blob_progress(blob: Blob, received: int) -> None:
        """C{received} more bytes of C{blob} arrived."""

    def blob_ended(result: BlobResult) -> None:
        """A blob arrived complete, or failed."""

    def finished(summary: Summary) -> None:
        """All is done."""


@define
class _Counter(Protocol):
    """
    A response body read and counted, of which at most C{keep} bytes are
    kept; C{done} fires with them at its end, or fails when it is cut short or
    idle for C{idle} seconds.
    """

    clock: IReactorTime
    idle: float
    keep: int
    on_bytes: Callable[[int], object]
    done: Deferred[bytes] = field(factory=Deferred)
    received: int = 0
    _kept: list[bytes] = field(factory=list)
    _kept_length: int = 0
    _timer: IDelayedCall | None = None
    _stalled: bool = False

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle, self._stall)

    def _stall(self) -> None:
        self._stalled = True
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self.idle)
        if self._kept_length < self.keep:
            kept = data[: self.keep - self._kept_length]
            self._kept.append(kept)
            self._kept_length += len(kept)
        self.received += len(data)
        self.on_bytes(len(data))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._stalled:
            self.done.errback(Exception(f"no data for {self.idle:g} s"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._kept))
        else:
            self.done.errback(reason)


@define
class Prefetcher:
    """
    Prefetches images through the blobserve at C{server}, C{parallel}
    requests at a time, telling C{events} how it goes.
    """

    server: str
    http: HTTPClient
    clock: IReactorTime
    events: IPrefetchEvents
    platforms: Sequence[Platform] = ()
    parallel: int = 4
    timeout: float = 60.0
    _slots: DeferredSemaphore = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = DeferredSemaphore(self.parallel)

    async def run(self, images: Sequence[ImageReference]) -> Summary:
        """
        Prefetch C{images}: resolve them all, then fetch each blob they need
        once. Failures are counted in the summary, never raised, except
        that of reaching blobserve at all.

        @raise Unreachable: if blobserve does not answer C{/v2/}.
        """
        started = self.clock.seconds()
        await self._check_server()
        summary = Summary(images=len(images))
        found = await gatherResults([self._resolve(image) for image in images])
        blobs: dict[tuple[str | None, str, Digest], Blob] = {}
        for image, image_blobs in zip(images, found, strict=True):
            if isinstance(image_blobs, str):
                summary.images_failed += 1
                self.events.image_failed(image, image_blobs)
                continue
            for blob in image_blobs:
                blobs.setdefault(blob.key, blob)
        self.events.blobs_found(list(blobs.values()))
        results = await gatherResults(
            [self._slots.run(self._fetch, blob) for blob in blobs.values()]
        )
        for result in results:
            summary.add(result)
        summary.seconds = self.clock.seconds() - started
        self.events.finished(summary)
        return summary

    async def _check_server(self) -> None:
        try:
            response = await self._get("/v2/", {})
            await self._read(response, MAX_ERROR_BODY)
        except Exception as error:
            raise Unreachable(
                f"cannot reach blobserve at {self.server}: {why(error)}"
            ) from None
        if response.code != 200:
            raise Unreachable(
                f"{self.server}/v2/ answered {response.code}: not a registry"
                " blobserve-prefetch can use"
            )

    def _resolve(self, image: ImageReference) -> Deferred[list[Blob] | str]:
        """
        The blobs C{image} needs, or why they cannot be known.
        """

        async def resolve() -> list[Blob] | str:
            try:
                return await self._blobs_of(image, image.reference, 0)
            except ImageFailed as error:
                return str(error)

        return Deferred.fromCoroutine(resolve())

    async def _blobs_of(
        self, image: ImageReference, reference: str, depth: int
    ) -> list[Blob]:
        manifest = await self._slots.run(self._manifest, image, reference)
        if not manifest.is_index:
            return [
                Blob(image, d.digest, d.size)
                for d in manifest.descriptors
                if distributable(d)
            ]
        if depth >= MAX_DEPTH:
            raise ImageFailed(f"{image}: indexes nest deeper than {MAX_DEPTH}")
        chosen = select(manifest, self.platforms)
        # Each platform asked for must be there: a rollout that needs it
        # would find it missing on its nodes.
        missing = [
            p
            for p in self.platforms
            if not any(p.matches(d.platform) for d in manifest.descriptors)
        ]
        if missing:
            asked = ", ".join(map(str, missing))
            raise ImageFailed(f"{image}: no manifest for {asked}")
        children = [
            Deferred.fromCoroutine(self._blobs_of(image, str(d.digest), depth + 1))
            for d in chosen
        ]
        try:
            found = await gatherResults(children, consumeErrors=True)
        except FirstError as error:
            # The first manifest that failed says why the image failed.
            error.subFailure.raiseException()
        return [blob for blobs in found for blob in blobs]

    def _manifest(self, image: ImageReference, reference: str) -> Deferred[Parsed]:
        async def fetch() -> Parsed:
            # A tag or digest needs no quoting: both are of safe characters.
            path = f"/v2/{image.repository}/manifests/{reference}"
            try:
                response = await self._get(path, _params(image), accept=ACCEPT)
                content = await self._read(response, MAX_MANIFEST + 1)
            except Exception as error:
                raise ImageFailed(f"{image}: {why(error)}") from None
            if response.code != 200:
                raise ImageFailed(f"{image}: {_error_text(response.code, content)}")
            if len(content) > MAX_MANIFEST:
                raise ImageFailed(f"{image}: manifest larger than {MAX_MANIFEST} bytes")
            content_type = response.headers.getRawHeaders("content-type", [None])[0]
            try:
                return parse_manifest(content, content_type)
            except BadManifest as error:
                raise ImageFailed(f"{image}: {error}") from None

        return Deferred.fromCoroutine(fetch())

    def _fetch(self, blob: Blob) -> Deferred[BlobResult]:
        """
        GET C{blob}, reading and discarding its body: a result that says
        whether it arrived whole, never a failure.
        """

        async def fetch() -> BlobResult:
            self.events.blob_started(blob)
            path = f"/v2/{blob.image.repository}/blobs/{blob.digest}"
            cache, received = None, 0

            def progress(count: int) -> None:
                self.events.blob_progress(blob, count)

            try:
                response = await self._get(path, _params(blob.image))
                cache = response.headers.getRawHeaders("x-blobserve-cache", [None])[0]
                keep = 0 if response.code == 200 else MAX_ERROR_BODY
                counter = self._counter(keep, progress)
                response.deliverBody(counter)
                try:
                    content = await counter.done
                finally:
                    received = counter.received
            except Exception as error:
                failure: str | None = why(error)
            else:
                failure = None
                if response.code != 200:
                    failure = _error_text(response.code, content)
                elif received != blob.size:
                    failure = f"got {received} of {blob.size} bytes"
            result = BlobResult(blob, cache, received, failure)
            self.events.blob_ended(result)
            return result

        return Deferred.fromCoroutine(fetch())

    async def _get(
        self, path: str, params: dict[str, str], accept: str | None = None
    ) -> IResponse:
        headers: dict[bytes | str, bytes | str] = {"Accept": accept} if accept else {}
        return await self.http.get(
            self.server + path,
            params=params,
            headers=headers,
            unbuffered=True,
            timeout=self.timeout,
            reactor=self.clock,  # type: ignore[arg-type]
        )

    def _counter(self, keep: int, on_bytes: Callable[[int], object]) -> _Counter:
        return _Counter(self.clock, self.timeout, keep, on_bytes)

    def _read(self, response: IResponse, keep: int) -> Deferred[bytes]:
        counter = self._counter(keep, lambda _: None)
        response.deliverBody(counter)
        return counter.done


def _params(image: ImageReference) -> dict[str, str]:
    # A registry named in the reference is named to blobserve; one not named
    # is blobserve's default registry, whatever that is.
    return {} if image.registry is None else {"ns": image.registry}


def _error_text(code: int, body: bytes) -> str:
    """
    An error answer in a few words: its status and, from an OCI error body,
    the first error's code and message.
    """
    try:
        error = json.loads(body)["errors"][0]
        detail = f"{error['code']}: {error.get('message', '')}".rstrip(": ")
    except (ValueError, KeyError, IndexError, TypeError):
        detail = ""
    return f"{code} {detail}".strip()[:300]
