"""
Tags lists (C{/v2/<name>/tags/list}): the query a client sends, the
upstream's answer through a L{ListingCache}, and the C{Link} to the next
page, rewritten to lead back to blobserve.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.defer import Deferred

from blobserve.upstream.client import IUpstream, Listing
from blobserve.web.listings import ListingCache
from blobserve.web.manifests import Note
from blobserve.web.names import InvalidTag, parse_tag

#: The most digits of C{n} accepted (a bound before C{int()}).
_MAX_N_DIGITS = 9
_N = re.compile(rf"[0-9]{{1,{_MAX_N_DIGITS}}}")
_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


class InvalidPage(ValueError):
    """
    A tags list query's C{n} or C{last} is not one blobserve passes on.
    """


def parse_page(n: str | None, last: str | None) -> tuple[int | None, str | None]:
    """
    The page a tags list query asks for: C{n} (at most this many tags, a
    number of at most nine digits) and C{last} (the tags after this one, a
    valid tag), each L{None} if not given.

    @raise InvalidPage: if either is given and is not that.
    """
    if n is not None and not _N.fullmatch(n):
        raise InvalidPage(f"n is not a number of at most {_MAX_N_DIGITS} digits")
    if last is not None:
        try:
            parse_tag(last)
        except InvalidTag as e:
            raise InvalidPage(f"last is not a tag: {e}") from None
    return (None if n is None else int(n)), last


def next_link(link: str | None, name: str, registry: str | None) -> str | None:
    """
    The C{Link} header that leads a client to the next page through
    blobserve: the same path of blobserve's, relative, with the C{n} and
    C{last} of the upstream's C{rel="next"} link, and C{ns=registry} if
    the client named one; L{None} if the upstream gave no next page, or
    one whose C{n} or C{last} blobserve would refuse.
    """
    match = _NEXT.search(link or "")
    if match is None:
        return None
    query = parse_qs(urlsplit(match.group(1)).query)
    try:
        n, last = parse_page(_first(query, "n"), _first(query, "last"))
    except InvalidPage:
        return None
    given = [("n", n), ("last", last), ("ns", registry)]
    parameters = urlencode([(key, value) for key, value in given if value is not None])
    return f'</v2/{name}/tags/list?{parameters}>; rel="next"'


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


class TagsLists:
    """
    The tags lists of the upstreams' repositories, each page asked of the
    upstream at most once per the cache's TTL and served stale as the
    cache says (see L{ListingCache}).
    """

    def __init__(self, listings: ListingCache) -> None:
        self._listings = listings

    def get(
        self,
        registry: str,
        upstream: IUpstream,
        name: str,
        n: int | None,
        last: str | None,
        note: Note,
    ) -> Deferred[Listing]:
        """
        The page of repository C{name}'s tags that C{n} and C{last} ask for,
        as the upstream of C{registry} sent it (its C{Link} unchanged).

        @param note: told, once, what the cache did for this caller.
        """
        return self._listings.get(
            ("tags", registry, name, n, last),
            lambda: upstream.fetch_tags(name, n, last),
            note,
        )
