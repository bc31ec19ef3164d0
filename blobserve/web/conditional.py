"""
Conditional requests (RFC 9110, section 13) on content-addressed objects:
C{If-None-Match} and C{If-Range} against an entity tag that is the object's
digest, which is strong and never changes.

It parses header values and decides; it knows nothing of HTTP objects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import frozen

#: One element of an entity-tag list, with the whitespace around it and the
#: comma (or the end) after it; the list rule allows empty elements. An
#: opaque tag may hold commas, so the list is scanned, never split.
_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*)?(?:,|\Z)')
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*')


@frozen
class EntityTag:
    """
    An entity tag as a client sent it: its opaque value without the quotes,
    and whether it was marked weak (C{W/}).
    """

    opaque: str
    weak: bool = False


#: What C{If-None-Match: *} stands for: any current representation.
ANY = "*"


def parse_tag_list(values: Sequence[str]) -> list[EntityTag] | str | None:
    """
    The entity tags the C{If-None-Match} field lines C{values} list
    together, L{ANY} for C{*}, or L{None} if they are malformed or list no
    tag.

    It never raises, whatever the values hold.
    """
    joined = ",".join(values)
    if joined.strip(" \t") == ANY:
        return ANY
    tags = []
    position = 0
    while position < len(joined):
        match = _ELEMENT.match(joined, position)
        if match is None:
            return None
        weak, opaque = match.groups()
        if opaque is not None:
            tags.append(EntityTag(opaque, weak is not None))
        position = match.end()
    return tags or None


def not_modified(if_none_match: Sequence[str], tag: str) -> bool:
    """
    Whether a C{GET} or C{HEAD} with the C{If-None-Match} field lines
    C{if_none_match} is to be answered 304 Not Modified, the object having
    the strong entity tag C{"tag"}: the field is C{*}, or lists C{tag},
    weak or not (If-None-Match compares weakly).

    No field, or a malformed one, is not a match: the client gets the whole
    answer, never a 304 it did not ask for.
    """
    tags = parse_tag_list(if_none_match)
    if tags is None:
        return False
    if isinstance(tags, str):
        return True
    return any(t.opaque == tag for t in tags)


def range_allowed(if_range: Sequence[str], tag: str) -> bool:
    """
    Whether a C{Range} may be served, given the C{If-Range} field lines
    C{if_range}, for an object with the strong entity tag C{"tag"}: there is
    no If-Range, or it is that strong tag exactly (If-Range compares
    strongly).

    A weak tag, another tag, a date (the objects have no
    C{Last-Modified}, so no date can match), several field lines or a
    malformed value: the whole object is to be sent instead.
    """
    if not if_range:
        return True
    if len(if_range) != 1:
        return False
    match = _ENTITY_TAG.fullmatch(if_range[0])
    if match is None:
        return False
    weak, opaque = match.groups()
    return weak is None and opaque == tag
