"""
L{ManifestCache}: manifests by digest, kept in the store, and tags, resolved
through the upstream at most once per TTL and served stale when the upstream
fails.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from blobserve.digest import Digest, InvalidDigest
from blobserve.oneshot import OneShotEvent
from blobserve.store.files import IBlobStore
from blobserve.upstream.client import (
    MAX_MANIFEST_SIZE,
    IUpstream,
    Manifest,
    ManifestInfo,
    ManifestUnknown,
    UpstreamError,
    UpstreamRefused,
)
from blobserve.web.scope import RepositoryScope

log = Logger()

_T = TypeVar("_T")

#: How many tags a cache remembers at most, by default.
MAX_TAGS = 10_000

#: How many sets of accepted media types a tag keeps a record for (clients
#: send a handful of distinct ones; more are forgotten, the oldest first).
ACCEPT_SETS_PER_TAG = 8

#: What a registry serves a client that sends no C{Accept}: the image
#: manifests and indexes of Docker and OCI.
DEFAULT_ACCEPT = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)


@frozen
class TagRecord:
    """
    What a tag pointed to when the upstream last said so.
    """

    digest: Digest
    checked_at: float


#: Told what the cache did for a request: C{hit} (answered from the store),
#: C{miss} (asked the upstream), C{join} (waited for a request to the upstream
#: made for another client) or C{stale} (the last known manifest of a tag,
#: the upstream failing).
Note = Callable[[str], object]


def _unnoted(outcome: str) -> None:
    pass


def accept_key(accept: Sequence[str]) -> tuple[str, ...]:
    """
    The media types of C{Accept} values, without parameters, in a canonical
    order: a tag may resolve differently for clients that accept different
    types, so each set gets its own record. A record's key is bounded
    whatever a client sends: names of at most 127 characters (RFC 6838's
    bound), the first 32 in that order.
    """
    types = {
        part.split(";")[0].strip().lower()
        for value in accept
        for part in value.split(",")
    }
    return tuple(sorted(t for t in types if 0 < len(t) <= 127))[:32]


def accepts(accepted: tuple[str, ...], media_type: str) -> bool:
    """
    Whether a client whose C{Accept} has the media types C{accepted} (as
    L{accept_key} gives them; none: L{DEFAULT_ACCEPT}) takes C{media_type},
    by name or by a C{type/*} or C{*/*} range.
    """
    media_type = media_type.split(";")[0].strip().lower()
    if not accepted:
        return media_type in DEFAULT_ACCEPT
    major = media_type.split("/")[0]
    return any(t in (media_type, "*/*", f"{major}/*") for t in accepted)


class ManifestCache:
    """
    Serves manifests, asking the upstream as little as correctness allows.

    By digest, a manifest is immutable: it is fetched once (however many
    clients ask at once), verified, and kept in the store with its media type.
    By tag, the digest the tag resolves to is remembered per registry,
    repository and set of accepted media types; within C{ttl} seconds the
    upstream is not asked again, after that a C{HEAD} revalidates it. When the
    upstream is unreachable, answers 5xx or rate-limits (429), the last known
    manifest of the tag is served: the one last resolved for the same
    C{Accept}, else the most recently resolved one of a media type the
    client accepts, whatever C{Accept} it was resolved for. When the upstream
    says the tag (or its repository) is gone, so does blobserve, and it
    forgets the tag. At most C{max_tags} tags are remembered: the least
    recently used one is forgotten first. When it refuses access (401, 403),
    the refusal is passed on and nothing stale is served: unlike an outage,
    that is the upstream's answer about this tag now (revoked access, a
    repository made private, wrong credentials), and serving on would hide it
    from the operator. The tag's record is kept, so the tag is served stale
    again if the upstream goes on to fail in another way.

    A manifest stored because one repository asked for it is served by
    digest under another only once the upstream has confirmed, with a
    C{HEAD} for that repository, that it holds it too (see
    L{RepositoryScope}); a tag is resolved by the upstream for its own
    repository, which confirms the manifest it points to.

    A caller that cancels what L{get} or L{head} returned (its client left)
    only stops waiting: work shared with other callers goes on, a C{HEAD} of
    its own is stopped, and nothing is served stale or recorded for it.
    """

    def __init__(
        self,
        store: IBlobStore,
        clock: IReactorTime,
        ttl: float,
        max_tags: int = MAX_TAGS,
    ) -> None:
        self._store = store
        self._scope = RepositoryScope(store)
        self._clock = clock
        self._ttl = ttl
        self._max_tags = max_tags
        # By (registry, repository, tag): by accept_key, what it resolved to.
        self._tags: OrderedDict[tuple[str, ...], dict[tuple[str, ...], TagRecord]]
        self._tags = OrderedDict()
        self._running: dict[tuple[Any, ...], OneShotEvent[Any]] = {}

    def get(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        reference: str,
        accept: Sequence[str],
        note: Note = _unnoted,
    ) -> Deferred[Manifest]:
        """
        The manifest C{reference} (a tag or a digest) of repository C{name}.

        @param note: told, once, what the cache did for this caller.

        @return: fires with the manifest; fails with L{ManifestUnknown} or
            L{UpstreamError} when it cannot be had, even stale.
        """
        digest = _digest_or_none(reference)
        if digest is not None:
            return self._by_digest(registry, upstream, name, digest, accept, note)
        key = ("tag", registry, name, reference, accept_key(accept))
        return self._once(
            key,
            lambda: Deferred.fromCoroutine(
                self._by_tag(key, upstream, name, accept, note)
            ),
            note,
        )

    def head(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        reference: str,
        accept: Sequence[str],
        note: Note = _unnoted,
    ) -> Deferred[ManifestInfo]:
        """
        What C{GET} would serve for C{reference}, without fetching a manifest
        that is not stored: a stored one answers from the store, any other
        from the upstream's C{HEAD}.

        @param note: told, once, what the cache did for this caller.
        """
        digest = _digest_or_none(reference)
        if digest is not None:
            stored = self._load(digest)
            if stored is not None:
                if not self._scope.holds(registry, name, digest):
                    return self._confirm_then(
                        registry, upstream, name, digest, accept, self.head, note
                    )
                note("hit")
                return succeed(_info(stored))
            note("miss")
            return upstream.stat_manifest(name, reference, accept)
        key = ("tag", registry, name, reference, accept_key(accept))
        return Deferred.fromCoroutine(self._head_tag(key, upstream, name, accept, note))

    def _by_digest(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        accept: Sequence[str],
        note: Note,
    ) -> Deferred[Manifest]:
        stored = self._load(digest)
        if stored is not None:
            if not self._scope.holds(registry, name, digest):
                return self._confirm_then(
                    registry, upstream, name, digest, accept, self.get, note
                )
            note("hit")
            return succeed(stored)
        # Per repository: an upstream answer for one says nothing of another.
        return self._once(
            ("digest", registry, name, digest),
            lambda: Deferred.fromCoroutine(
                self._fetch(registry, upstream, name, str(digest), accept)
            ),
            note,
            "miss",
        )

    def _confirm_then(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        digest: Digest,
        accept: Sequence[str],
        again: Callable[..., Deferred[_T]],
        note: Note,
    ) -> Deferred[_T]:
        """
        Once the upstream confirms that repository C{name} holds C{digest},
        ask C{again} (L{get} or L{head}), which then knows it does; fail
        with the upstream's answer if it does not.
        """
        confirmed = self._scope.confirm(
            registry,
            name,
            digest,
            lambda: upstream.stat_manifest(name, str(digest), accept),
        )
        return confirmed.addCallback(
            lambda _: again(registry, upstream, name, str(digest), accept, note)
        )

    async def _by_tag(
        self,
        key: tuple[Any, ...],
        upstream: IUpstream,
        name: str,
        accept: Sequence[str],
        note: Note,
    ) -> Manifest:
        tag = key[3]
        record = self._record(key)
        now = self._clock.seconds()
        if record is not None and now - record.checked_at < self._ttl:
            stored = self._load(record.digest)
            if stored is not None:
                note("hit")
                return stored
        try:
            if record is None:
                manifest = await self._fetch(key[1], upstream, name, tag, accept)
                note("miss")
            else:
                manifest = await self._revalidate(
                    key[1], upstream, name, tag, accept, note
                )
        except ManifestUnknown:
            if record is None:
                note("miss")
            self._tags.pop(key[:4], None)
            raise
        except UpstreamError as e:
            stale = self._stale(key) if may_serve_stale(e) else None
            if stale is None:
                if record is None:
                    note("miss")
                raise
            note("stale")
            log.warn(
                "serving {name}:{tag} as {digest} from the cache: {reason}",
                name=name,
                tag=tag,
                digest=str(stale.digest),
                reason=str(e),
            )
            return stale
        self._remember(key, manifest.digest, now)
        return manifest

    async def _revalidate(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        tag: str,
        accept: Sequence[str],
        note: Note,
    ) -> Manifest:
        """
        Ask with C{HEAD} what the tag is now, and fetch the manifest only if
        it is not stored already: a hit if it is (the upstream was asked
        only whether the tag moved), else a miss.
        """
        info = await upstream.stat_manifest(name, tag, accept)
        if info.digest is not None:
            stored = self._load(info.digest)
            if stored is not None:
                # The upstream said the tag of this repository points to it.
                self._store.saw(registry, name, info.digest)
                note("hit")
                return stored
            return await self._by_digest(
                registry, upstream, name, info.digest, accept, note
            )
        note("miss")
        return await self._fetch(registry, upstream, name, tag, accept)

    async def _head_tag(
        self,
        key: tuple[Any, ...],
        upstream: IUpstream,
        name: str,
        accept: Sequence[str],
        note: Note,
    ) -> ManifestInfo:
        tag = key[3]
        record = self._record(key)
        now = self._clock.seconds()
        stored = self._load(record.digest) if record is not None else None
        fresh = record is not None and now - record.checked_at < self._ttl
        if stored is not None and fresh:
            note("hit")
            return _info(stored)
        try:
            info = await upstream.stat_manifest(name, tag, accept)
        except ManifestUnknown:
            self._tags.pop(key[:4], None)
            raise
        except UpstreamError as e:
            stale = self._stale(key) if may_serve_stale(e) else None
            if stale is None:
                raise
            note("stale")
            return _info(stale)
        if info.digest is not None:
            self._remember(key, info.digest, now)
        # As for a GET: a hit if the upstream was asked only whether the tag
        # moved, and the manifest it points to is stored.
        known = info.digest is not None and self._store.media_type(info.digest)
        note("hit" if known else "miss")
        return info

    def _record(self, key: tuple[Any, ...]) -> TagRecord | None:
        """
        What the tag of C{key} last resolved to for C{key}'s accepted types.
        """
        records = self._tags.get(key[:4])
        if records is None:
            return None
        self._tags.move_to_end(key[:4])
        return records.get(key[4])

    def _remember(self, key: tuple[Any, ...], digest: Digest, now: float) -> None:
        """
        Remember that the tag of C{key} resolves to C{digest} for C{key}'s
        accepted types, forgetting the least recently used tags beyond
        the bound.
        """
        records = self._tags.setdefault(key[:4], {})
        records.pop(key[4], None)
        records[key[4]] = TagRecord(digest, now)
        # Clients choose their Accept: keep a few sets a tag, the latest.
        while len(records) > ACCEPT_SETS_PER_TAG:
            del records[next(iter(records))]
        self._tags.move_to_end(key[:4])
        while len(self._tags) > self._max_tags:
            self._tags.popitem(last=False)

    def _stale(self, key: tuple[Any, ...]) -> Manifest | None:
        """
        The stored manifest the tag of C{key} last resolved to that a
        client accepting C{key}'s types takes: the one resolved for those
        very types, else the most recently resolved one of a type they
        accept; L{None} if none is stored.
        """
        records = self._tags.get(key[:4], {})
        exact = records.get(key[4])
        others = sorted(
            (r for k, r in records.items() if k != key[4]),
            key=lambda r: r.checked_at,
            reverse=True,
        )
        for i, record in enumerate([exact, *others]):
            stored = None if record is None else self._load(record.digest)
            if stored is not None and (i == 0 or accepts(key[4], stored.media_type)):
                return stored
        return None

    async def _fetch(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        reference: str,
        accept: Sequence[str],
    ) -> Manifest:
        manifest = await upstream.fetch_manifest(name, reference, accept)
        await self._keep(manifest)
        # The upstream served it for this repository: it holds it.
        self._store.saw(registry, name, manifest.digest)
        return manifest

    async def _keep(self, manifest: Manifest) -> None:
        if self._load(manifest.digest) is not None:
            return
        try:
            temporary = self._store.create_temporary(manifest.digest)
        except OSError:
            log.failure("cannot keep manifest {digest}", digest=str(manifest.digest))
            return
        try:
            temporary.write(manifest.content)
            await self._store.commit(temporary, manifest.media_type)
        except OSError:
            # Serving it matters more than keeping it: the next request
            # fetches it again.
            log.failure("cannot keep manifest {digest}", digest=str(manifest.digest))
            self._store.discard(temporary)
        finally:
            temporary.close()

    def _load(self, digest: Digest) -> Manifest | None:
        media_type = self._store.media_type(digest)
        if media_type is None:
            return None
        reader = self._store.open(digest)
        if reader is None:
            return None
        try:
            content = reader.read(0, MAX_MANIFEST_SIZE + 1)
        finally:
            reader.close()
        if len(content) > MAX_MANIFEST_SIZE:
            return None
        return Manifest(content, media_type, digest)

    def _once(
        self,
        key: tuple[Any, ...],
        work: Callable[[], Deferred[_T]],
        note: Note,
        starting: str | None = None,
    ) -> Deferred[_T]:
        """
        Run C{work} for C{key} unless it is running already; either way, a
        Deferred of the caller's own for its outcome. A caller that finds it
        running is noted as a C{join}; one that starts it as C{starting}
        (if L{None}, C{work} notes what it does).
        """
        running = self._running.get(key)
        if running is not None:
            note("join")
        else:
            if starting is not None:
                note(starting)
            running = self._running[key] = OneShotEvent()
            started = work()
            d = (
                started
                if isinstance(started, Deferred)
                else Deferred.fromCoroutine(started)
            )

            def settle(outcome: Any) -> None:
                del self._running[key]
                if isinstance(outcome, Failure):
                    running.fail_with(outcome)
                else:
                    running.succeed_with(outcome)

            d.addBoth(settle)
        return running.observe()


def may_serve_stale(error: UpstreamError) -> bool:
    """
    Whether a tag may be served from its last known manifest despite
    C{error}: for an outage or a rate limit, not for a refusal of access.
    """
    return not (isinstance(error, UpstreamRefused) and error.status in (401, 403))


def _digest_or_none(reference: str) -> Digest | None:
    try:
        return Digest.parse(reference)
    except InvalidDigest:
        return None


def _info(manifest: Manifest) -> ManifestInfo:
    return ManifestInfo(manifest.digest, manifest.media_type, len(manifest.content))
