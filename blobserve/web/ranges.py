"""
Byte ranges of the HTTP C{Range} header: the single ranges registry clients
send to resume a layer pull, and the sets of ranges lazy-pulling snapshotters
send to read parts of a layer.
"""

from __future__ import annotations

import re
from itertools import pairwise

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


#: The most ranges one request may ask for and be answered part by part;
#: more are answered with the whole blob (RFC 9110 allows it), so that a
#: request cannot make blobserve send a part header for every byte.
MAX_RANGES = 64


def parse_ranges(header: str | None, length: int) -> list[ByteRange] | None:
    """
    The byte ranges C{header} asks for in a resource of C{length} bytes, in
    the order it asks for them, leaving out those that start beyond the end;
    or L{None} if the whole resource should be sent: no header, a unit other
    than bytes, more than L{MAX_RANGES} ranges, or ranges that overlap.

    It never raises anything else, whatever the header holds.

    @raise UnsatisfiableRange: if the header asks for bytes in a malformed way,
        or only for bytes beyond the end.
    """
    if header is None:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    # Split at most once more than allowed: a header of a million commas
    # costs no more than one of 65 ranges.
    parts = specs.split(",", MAX_RANGES)
    if len(parts) > MAX_RANGES:
        return None
    ranges = [
        r for r in (_one(spec, length, header) for spec in parts) if r is not None
    ]
    if not ranges:
        raise UnsatisfiableRange(f"no range starts within the {length} bytes there are")
    ordered = sorted(ranges, key=lambda r: r.start)
    if any(a.end > b.start for a, b in pairwise(ordered)):
        return None
    return ranges


def _one(spec: str, length: int, header: str) -> ByteRange | None:
    """
    The range one C{spec} of C{header} asks for, or L{None} if it starts
    beyond the end of a resource of C{length} bytes.

    @raise UnsatisfiableRange: if C{spec} is malformed.
    """
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match.groups() == ("", ""):
        raise UnsatisfiableRange(f"malformed range: {header[:100]!r}")
    first, last = match.groups()
    if first == "":
        suffix = _offset(last)
        if suffix == 0 or length == 0:
            return None  # selects no bytes
        return ByteRange(max(length - suffix, 0), length, length)
    start = _offset(first)
    end = length if last == "" else _offset(last) + 1
    if last != "" and end <= start:
        raise UnsatisfiableRange(f"malformed range: {header[:100]!r}")
    if start >= length:
        return None
    return ByteRange(start, min(end, length), length)
