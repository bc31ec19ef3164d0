"""
Byte-range parsing: what a resuming client asks for, and nothing else.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.web.ranges import ByteRange, UnsatisfiableRange, parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", ByteRange(0, 100, 1000)),
        ("bytes=900-", ByteRange(900, 1000, 1000)),
        ("bytes=-100", ByteRange(900, 1000, 1000)),
        ("bytes=-5000", ByteRange(0, 1000, 1000)),
        ("bytes=500-5000", ByteRange(500, 1000, 1000)),
        ("bytes=999-999", ByteRange(999, 1000, 1000)),
        (" Bytes = 1-2 ", ByteRange(1, 3, 1000)),
    ],
)
def test_single_ranges(header: str, expected: ByteRange) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", [None, "items=0-5", "bytes=0-1,5-6"])
def test_whole_resource(header: str | None) -> None:
    assert parse_range(header, 1000) is None


@pytest.mark.parametrize(
    "header",
    ["bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=5-2", "bytes=x-", "bytes=-"],
)
def test_unsatisfiable_or_malformed(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, 1000)


def test_content_range() -> None:
    assert ByteRange(10, 20, 100).content_range == "bytes 10-19/100"


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10**12))
def test_any_range_lies_within_the_resource(header: str, length: int) -> None:
    try:
        byte_range = parse_range(header, length)
    except UnsatisfiableRange:
        return
    if byte_range is not None:
        assert 0 <= byte_range.start < byte_range.end <= length
        assert byte_range.length == length


HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"bytes=0-{HUGE}", ByteRange(0, 1000, 1000)),
        (f"bytes=-{HUGE}", ByteRange(0, 1000, 1000)),
        (f"bytes=0{'0' * 5000}7-8", ByteRange(7, 9, 1000)),
        (f"bytes=5-0{'0' * 5000}9", ByteRange(5, 10, 1000)),
    ],
)
def test_numbers_of_thousands_of_digits(header: str, expected: ByteRange) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}"])
def test_offsets_of_thousands_of_digits_lie_beyond_the_end(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, 1000)


numbers = st.one_of(
    st.just(""),
    st.integers(min_value=0, max_value=10**25).map(str),
    st.integers(min_value=1, max_value=20_000).map(lambda n: "9" * n),
)


@given(numbers, numbers, st.integers(min_value=1, max_value=10**12))
def test_a_range_of_any_numbers_never_raises_anything_else(
    first: str, last: str, length: int
) -> None:
    try:
        byte_range = parse_range(f"bytes={first}-{last}", length)
    except UnsatisfiableRange:
        return
    assert byte_range is not None
    assert 0 <= byte_range.start < byte_range.end <= length
