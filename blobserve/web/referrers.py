"""
Referrers (C{/v2/<name>/referrers/<digest>}): the upstream's referrers API
passed through, or, where it has none, the referrers tag schema, through a
L{ListingCache}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred

from blobserve.digest import Digest
from blobserve.upstream.client import (
    IUpstream,
    Listing,
    ManifestUnknown,
    ReferrersUnsupported,
    RepositoryUnknown,
    UpstreamError,
)
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import ManifestCache, Note

#: The media type of a referrers answer: an OCI image index.
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


def referrers_tag(digest: Digest) -> str:
    """
    The tag under which the referrers tag schema keeps the referrers of
    C{digest}: C{<alg>-<hex>}, the algorithm cut to 32 characters and the
    hex to 64.
    """
    return f"{digest.algorithm[:32]}-{digest.hex[:64]}"


def empty_index() -> bytes:
    """
    The answer for a manifest nothing refers to: an empty OCI image index.
    """
    return json.dumps(
        {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    ).encode()


class Referrers:
    """
    The manifests that refer to a manifest (by their C{subject}), as an OCI
    image index, each query asked at most once per the cache's TTL and
    served stale as the cache says (see L{ListingCache}).

    An upstream with a referrers API is asked through it. One without (it
    answers the query with a 404 that names neither the repository nor the
    manifest) is asked as the distribution spec tells clients to: the
    index tagged C{<alg>-<hex>} (see L{referrers_tag}), fetched and kept as
    any tagged manifest is, or an empty index if there is no such tag.
    Either way, with an C{artifactType} the answer holds only the
    descriptors of that artifact type, and says it is filtered.
    """

    def __init__(self, listings: ListingCache, manifests: ManifestCache) -> None:
        self._listings = listings
        self._manifests = manifests

    def get(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        artifact_type: str | None,
        note: Note,
    ) -> Deferred[Listing]:
        """
        The referrers of C{digest} in repository C{name} of C{registry}.

        @param note: told, once, what the cache did for this caller.

        @return: fires with the L{Listing} (no C{link}); fails with
            L{RepositoryUnknown} or L{ManifestUnknown} if the upstream says
            so, or L{UpstreamError}.
        """
        return self._listings.get(
            ("referrers", registry, name, str(digest), artifact_type),
            lambda: Deferred.fromCoroutine(
                self._ask(registry, upstream, name, digest, artifact_type)
            ),
            note,
        )

    async def _ask(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        artifact_type: str | None,
    ) -> Listing:
        try:
            listing = await upstream.fetch_referrers(name, digest, artifact_type)
        except ReferrersUnsupported:
            listing = await self._from_tag(registry, upstream, name, digest)
        else:
            _descriptors(listing.content)
            listing = Listing(listing.content, None, listing.filtered)
        if artifact_type is None or listing.filtered:
            return listing
        return _filtered(listing.content, artifact_type)

    async def _from_tag(
        self, registry: str, upstream: IUpstream, name: str, digest: Digest
    ) -> Listing:
        tag = referrers_tag(digest)
        try:
            manifest = await self._manifests.get(
                registry, upstream, name, tag, [INDEX_MEDIA_TYPE]
            )
        except RepositoryUnknown:
            raise
        except ManifestUnknown:
            return Listing(empty_index())
        if manifest.media_type.split(";")[0].strip() != INDEX_MEDIA_TYPE:
            raise UpstreamError(f"the referrers tag {tag} is not an OCI image index")
        _descriptors(manifest.content)
        return Listing(manifest.content)


def _descriptors(content: bytes) -> tuple[dict[str, Any], list[Any]]:
    """
    An OCI image index and its C{manifests}.

    @raise UpstreamError: if C{content} is not one.
    """
    try:
        index = json.loads(content)
    except ValueError:
        index = None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(index, dict) or not isinstance(manifests, list):
        raise UpstreamError("the upstream's referrers are not an OCI image index")
    return index, manifests


def _filtered(content: bytes, artifact_type: str) -> Listing:
    """
    The index C{content} with only the descriptors of C{artifact_type}.
    """
    index, manifests = _descriptors(content)
    index["manifests"] = [
        descriptor
        for descriptor in manifests
        if isinstance(descriptor, dict)
        and descriptor.get("artifactType") == artifact_type
    ]
    return Listing(json.dumps(index).encode(), None, True)
