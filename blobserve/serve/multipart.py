"""
The C{multipart/byteranges} body (RFC 9110, section 14.6) of a response to a
request for several ranges of a blob, as the L{Span}s a
L{blobserve.serve.producer.FollowingProducer} sends.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from attrs import frozen

from blobserve.serve.producer import Span


@frozen
class ByteRangesBody:
    """
    A multipart body of parts of one blob.

    @ivar content_type: the response's C{Content-Type}, naming the boundary.
    @ivar spans: each part's headers, then its bytes of the blob.
    @ivar tail: the closing delimiter, after the last part.
    @ivar length: the body's length in bytes: its C{Content-Length}.
    """

    content_type: bytes
    spans: list[Span]
    tail: bytes
    length: int


def byteranges(
    ranges: Sequence[tuple[int, int]], size: int, boundary: str | None = None
) -> ByteRangesBody:
    """
    The body of a 206 response that sends, in the order given, the bytes from
    C{start} up to, not including, C{end} of each of C{ranges} of a blob of
    C{size} bytes, each as a part of type C{application/octet-stream} with
    its C{Content-Range}.

    @param boundary: the delimiter between parts; a random one by default,
        which no blob's bytes can be expected to hold (a part's end is told
        by the boundary alone).
    """
    if boundary is None:
        boundary = secrets.token_hex(16)
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    spans = [
        Span(
            delimiter
            + b"Content-Type: application/octet-stream\r\n"
            + b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (start, end - 1, size),
            start,
            end,
        )
        for start, end in ranges
    ]
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    length = sum(len(s.head) + s.end - s.start for s in spans) + len(tail)
    return ByteRangesBody(
        f"multipart/byteranges; boundary={boundary}".encode("ascii"),
        spans,
        tail,
        length,
    )
