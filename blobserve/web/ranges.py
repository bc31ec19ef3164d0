"""
Single byte ranges of the HTTP C{Range} header, as registry clients send them
to resume a layer pull.
"""

from __future__ import annotations

import re

from attrs import frozen

_SPEC = re.compile(r"([0-9]*)-([0-9]*)")

#: Offsets with more digits than this lie beyond any blob (and beyond what
#: int() converts: CPython refuses strings of more than 4300 digits).
_MAX_DIGITS = 18
_BEYOND_ANY_BLOB: int = 10**_MAX_DIGITS


def _offset(digits: str) -> int:
    """
    The number C{digits} spell, or a number past the end of any blob if they
    spell a larger one.
    """
    stripped = digits.lstrip("0") or "0"
    if len(stripped) > _MAX_DIGITS:
        return _BEYOND_ANY_BLOB
    return int(stripped)


class UnsatisfiableRange(ValueError):
    """
    The C{Range} header is malformed, or no byte it asks for exists.
    """


@frozen
class ByteRange:
    """
    The bytes from C{start} up to, but not including, C{end} of a resource of
    C{length} bytes.
    """

    start: int
    end: int
    length: int

    @property
    def content_range(self) -> str:
        """
        The C{Content-Range} header of a 206 response for this range.
        """
        return f"bytes {self.start}-{self.end - 1}/{self.length}"


def parse_range(header: str | None, length: int) -> ByteRange | None:
    """
    The single byte range C{header} asks for in a resource of C{length} bytes,
    or L{None} if the whole resource should be sent (no header, a unit other
    than bytes, or several ranges, which blobserve answers in full).

    It never raises anything else, whatever the header holds.

    @raise UnsatisfiableRange: if the header asks for bytes in a malformed way,
        or only for bytes beyond the end.
    """
    if header is None:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in specs:
        return None
    match = _SPEC.fullmatch(specs.strip())
    if match is None or match.groups() == ("", ""):
        raise UnsatisfiableRange(f"malformed range: {header[:100]!r}")
    first, last = match.groups()
    if first == "":
        suffix = _offset(last)
        if suffix == 0:
            raise UnsatisfiableRange("an empty suffix range selects no bytes")
        return ByteRange(max(length - suffix, 0), length, length)
    start = _offset(first)
    end = length if last == "" else _offset(last) + 1
    if end <= start:
        raise UnsatisfiableRange(f"malformed range: {header[:100]!r}")
    if start >= length:
        raise UnsatisfiableRange(f"range starts beyond the {length} bytes there are")
    return ByteRange(start, min(end, length), length)
