"""
Byte-range parsing: what a resuming client asks for, and nothing else.
"""

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.web.ranges import (
    MAX_RANGES,
    ByteRange,
    UnsatisfiableRange,
    parse_ranges,
)


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
    assert parse_ranges(header, 1000) == [expected]


@pytest.mark.parametrize("header", [None, "items=0-5"])
def test_whole_resource(header: str | None) -> None:
    assert parse_ranges(header, 1000) is None


@pytest.mark.parametrize(
    "header",
    ["bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=5-2", "bytes=x-", "bytes=-"],
)
def test_unsatisfiable_or_malformed(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_ranges(header, 1000)


def test_content_range() -> None:
    assert ByteRange(10, 20, 100).content_range == "bytes 10-19/100"


@given(st.text(max_size=40), st.integers(min_value=1, max_value=10**12))
def test_any_range_lies_within_the_resource(header: str, length: int) -> None:
    try:
        ranges = parse_ranges(header, length)
    except UnsatisfiableRange:
        return
    for byte_range in ranges or []:
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
    assert parse_ranges(header, 1000) == [expected]


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}"])
def test_offsets_of_thousands_of_digits_lie_beyond_the_end(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_ranges(header, 1000)


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
        ranges = parse_ranges(f"bytes={first}-{last}", length)
    except UnsatisfiableRange:
        return
    assert ranges is not None
    [byte_range] = ranges
    assert 0 <= byte_range.start < byte_range.end <= length


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", [ByteRange(0, 100, 1000)]),
        (
            "bytes=0-99,500-599",
            [ByteRange(0, 100, 1000), ByteRange(500, 600, 1000)],
        ),
        # In the order asked for, not sorted.
        ("bytes=-10, 0-9", [ByteRange(990, 1000, 1000), ByteRange(0, 10, 1000)]),
        # Adjacent ranges do not overlap.
        ("bytes=0-9,10-19", [ByteRange(0, 10, 1000), ByteRange(10, 20, 1000)]),
        # Those that select nothing are left out.
        ("bytes=0-9,5000-6000,-0", [ByteRange(0, 10, 1000)]),
    ],
)
def test_sets_of_ranges(header: str, expected: list[ByteRange]) -> None:
    assert parse_ranges(header, 1000) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "items=0-5,7-9",
        "bytes=0-99,50-149",
        "bytes=0-,999-999",
        "bytes=-100,900-950",
        "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1)),
        "bytes=" + "," * 1_000_000,
    ],
)
def test_sets_answered_with_the_whole_resource(header: str | None) -> None:
    assert parse_ranges(header, 1000) is None


def test_as_many_ranges_as_allowed_are_answered_in_parts() -> None:
    header = "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES))
    ranges = parse_ranges(header, 1000)
    assert ranges is not None
    assert len(ranges) == MAX_RANGES


@pytest.mark.parametrize(
    "header", ["bytes=1000-,2000-3000", "bytes=-0", "bytes=0-5,x-", "bytes=0-5,"]
)
def test_sets_unsatisfiable_or_malformed(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_ranges(header, 1000)


specs = st.tuples(numbers, numbers).map(lambda p: f"{p[0]}-{p[1]}")


@given(
    st.lists(st.one_of(specs, st.text(max_size=10)), min_size=1, max_size=70),
    st.integers(min_value=0, max_value=10**12),
)
def test_any_set_of_ranges_lies_within_the_resource_and_never_overlaps(
    parts: list[str], length: int
) -> None:
    try:
        ranges = parse_ranges("bytes=" + ",".join(parts), length)
    except UnsatisfiableRange:
        return
    if ranges is None:
        return
    assert 1 <= len(ranges) <= MAX_RANGES
    for byte_range in ranges:
        assert 0 <= byte_range.start < byte_range.end <= length
        assert byte_range.length == length
    ordered = sorted(ranges, key=lambda r: r.start)
    assert all(a.end <= b.start for a, b in pairwise(ordered))
