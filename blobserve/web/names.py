"""
Repository names, as the OCI distribution spec defines them.
"""

from __future__ import annotations

import re

#: The longest repository name accepted, as in the reference registry.
MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


class InvalidName(ValueError):
    """
    A repository name does not follow the spec's grammar.
    """


def parse_name(text: str) -> str:
    """
    Check that C{text} is a repository name such as C{library/busybox}, and
    return it.

    Because a valid name has only lowercase letters, digits, separators and
    single slashes between components, it never names a path outside the place
    it is joined to (no C{..}, no leading slash, no escapes).

    @raise InvalidName: if it is not.
    """
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidName(f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(text):
        raise InvalidName(f"invalid repository name: {text[:100]!r}")
    return text


_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class InvalidTag(ValueError):
    """
    A tag does not follow the spec's grammar.
    """


def parse_tag(text: str) -> str:
    """
    Check that C{text} is a tag such as C{latest} or C{1.36.1-glibc}, and
    return it. A valid tag has no slash and does not start with a dot.

    @raise InvalidTag: if it is not.
    """
    if not _TAG.fullmatch(text):
        raise InvalidTag(f"invalid tag: {text[:130]!r}")
    return text
