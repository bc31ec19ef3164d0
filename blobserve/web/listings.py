"""
L{ListingCache}: the upstream's answers to list queries (tags lists,
referrers), trusted for a TTL and served stale when the upstream fails.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from blobserve.oneshot import OneShotEvent
from blobserve.upstream.client import Listing, ManifestUnknown, UpstreamError
from blobserve.web.manifests import Note, may_serve_stale

log = Logger()

#: How many answers a cache keeps at most, by default.
MAX_LISTINGS = 10_000

#: How many bytes of answers a cache keeps at most, by default: clients
#: choose the queries (C{n}, C{last}, C{artifactType}), and an answer may be
#: megabytes.
MAX_LISTING_BYTES = 64 * 2**20


@frozen
class _Record:
    listing: Listing
    fetched_at: float


class ListingCache:
    """
    Keeps what the upstream answered to list queries, by a key that names
    the query whole (registry, repository and parameters), so that each is
    asked of the upstream at most once per C{ttl} seconds however many
    clients ask, at once or one after another.

    When the upstream is unreachable, answers 5xx or rate-limits (429), the
    last answer is served, however old; when it refuses access (401, 403) or
    says the repository or manifest is gone (404), so does blobserve, and
    a gone one's answer is forgotten. At most C{size} answers, of at most
    C{max_bytes} together, are kept: the least recently used one goes
    first.

    A caller that cancels what L{get} returned only stops waiting: the
    query goes on for the others, and its answer is kept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float,
        size: int = MAX_LISTINGS,
        max_bytes: int = MAX_LISTING_BYTES,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._max_bytes = max_bytes
        # Bytes of the answers kept.
        self._bytes = 0
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()
        self._running: dict[Hashable, OneShotEvent[Listing]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(
        self, key: Hashable, fetch: Callable[[], Deferred[Listing]], note: Note
    ) -> Deferred[Listing]:
        """
        The answer to the query C{key}: kept, or got with C{fetch} (unless a
        fetch for it is under way already).

        @param note: told, once, what the cache did for this caller: C{hit},
            C{miss}, C{join} or C{stale}.

        @return: fires with the answer; fails as C{fetch} does when no
            answer may be served in its place.
        """
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
            if self._clock.seconds() - record.fetched_at < self._ttl:
                note("hit")
                return succeed(record.listing)
        running = self._running.get(key)
        if running is not None:
            note("join")
            return running.observe()
        event = self._running[key] = OneShotEvent[Listing]()

        def settle(outcome: Listing | Failure) -> None:
            del self._running[key]
            if isinstance(outcome, Failure):
                event.fail_with(outcome)
            else:
                event.succeed_with(outcome)

        Deferred.fromCoroutine(self._refresh(key, fetch, note)).addBoth(settle)
        return event.observe()

    async def _refresh(
        self, key: Hashable, fetch: Callable[[], Deferred[Listing]], note: Note
    ) -> Listing:
        now = self._clock.seconds()
        try:
            listing = await fetch()
        except ManifestUnknown:
            self._forget(key)
            note("miss")
            raise
        except UpstreamError as e:
            record = self._records.get(key)
            if record is None or not may_serve_stale(e):
                note("miss")
                raise
            note("stale")
            log.warn("serving {query} from the cache: {reason}", query=key, reason=e)
            return record.listing
        note("miss")
        self._forget(key)
        self._records[key] = _Record(listing, now)
        self._bytes += len(listing.content)
        while len(self._records) > self._size or (
            self._bytes > self._max_bytes and len(self._records) > 1
        ):
            self._forget(next(iter(self._records)))
        return listing

    def _forget(self, key: Hashable) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self._bytes -= len(record.listing.content)
