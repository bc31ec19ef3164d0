"""
If-None-Match and If-Range against a digest's entity tag, as RFC 9110
compares them: weakly for If-None-Match, strongly for If-Range.
"""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.digest import Digest
from blobserve.web.conditional import (
    ANY,
    EntityTag,
    not_modified,
    parse_tag_list,
    range_allowed,
)

TAG = str(Digest.of(b"blob"))
OTHER = str(Digest.of(b"another blob"))

#: What may stand between the quotes of an entity tag.
opaque = st.text(
    alphabet=st.sampled_from(
        [chr(c) for c in range(0x21, 0x7F) if c != 0x22]
        + [chr(c) for c in range(0x80, 0x100)]
    ),
    max_size=20,
)
entity_tags = st.builds(EntityTag, opaque, st.booleans())
whitespace = st.text(alphabet=" \t", max_size=3)


def written(tag: EntityTag) -> str:
    return ('W/"' if tag.weak else '"') + tag.opaque + '"'


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([f'"{TAG}"'], [EntityTag(TAG)]),
        ([f'W/"{TAG}"'], [EntityTag(TAG, weak=True)]),
        (['"a", W/"b" ,"c"'], [EntityTag("a"), EntityTag("b", True), EntityTag("c")]),
        (['"a"', '"b"'], [EntityTag("a"), EntityTag("b")]),
        # An opaque tag may hold commas and "W/".
        (['"a,b", "W/"'], [EntityTag("a,b"), EntityTag("W/")]),
        # The list rule allows empty elements.
        ([', "a",, "b" ,'], [EntityTag("a"), EntityTag("b")]),
        (['""'], [EntityTag("")]),
        (["*"], ANY),
        ([" * "], ANY),
    ],
)
def test_tag_lists(values: list[str], expected: object) -> None:
    assert parse_tag_list(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        [" , "],
        ["a"],
        [TAG],
        ['"a'],
        ['"a" "b"'],
        ['w/"a"'],
        ['W/ "a"'],
        ['"a"b'],
        ['*, "a"'],
        ["*", '"a"'],
        ['"a\x7f"'],
    ],
)
def test_malformed_or_empty_tag_lists(values: list[str]) -> None:
    assert parse_tag_list(values) is None


@given(st.lists(st.tuples(whitespace, entity_tags, whitespace), min_size=1))
def test_any_written_tag_list_is_read_back(
    elements: list[tuple[str, EntityTag, str]],
) -> None:
    field = ",".join(before + written(tag) + after for before, tag, after in elements)
    assert parse_tag_list([field]) == [tag for _, tag, _ in elements]


@given(st.lists(st.text(max_size=30), max_size=3))
def test_any_value_is_parsed_without_raising(values: list[str]) -> None:
    parsed = parse_tag_list(values)
    assert parsed is None or parsed == ANY or isinstance(parsed, list)


@given(st.lists(st.text(alphabet=' \t,"W/a', max_size=300), max_size=2))
def test_parsing_takes_time_in_proportion(values: list[str]) -> None:
    started = time.monotonic()
    parse_tag_list(values)
    assert time.monotonic() - started < 0.5


def test_long_lists_are_parsed_at_once() -> None:
    field = ", ".join([" \t " * 50] * 2000 + ['"x"']) + ' "'
    started = time.monotonic()
    assert parse_tag_list([field]) is None
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    "values",
    [
        [f'"{TAG}"'],
        [f'W/"{TAG}"'],
        [f'"{OTHER}", "{TAG}"'],
        [f'"{OTHER}"', f'W/"{TAG}"'],
        ["*"],
    ],
)
def test_if_none_match_naming_the_tag_is_not_modified(values: list[str]) -> None:
    assert not_modified(values, TAG)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [f'"{OTHER}"'],
        [TAG],
        [f'"{TAG}'],
        [f'"{TAG.upper()}"'],
        [f'"{TAG}" "{TAG}"'],
        [f'*, "{TAG}"'],
    ],
)
def test_if_none_match_not_naming_the_tag_or_malformed_is_a_full_answer(
    values: list[str],
) -> None:
    assert not not_modified(values, TAG)


@given(st.lists(entity_tags, min_size=1))
def test_if_none_match_compares_weakly(tags: list[EntityTag]) -> None:
    field = ", ".join(written(tag) for tag in tags)
    assert not_modified([field], TAG) == any(t.opaque == TAG for t in tags)


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        ([], True),
        ([f'"{TAG}"'], True),
        ([f' "{TAG}" '], True),
        # If-Range compares strongly: a weak tag never matches.
        ([f'W/"{TAG}"'], False),
        ([f'"{OTHER}"'], False),
        # A date: the blob has no Last-Modified to match it.
        (["Sat, 29 Oct 1994 19:43:31 GMT"], False),
        ([time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())], False),
        ([f'"{TAG}", "{TAG}"'], False),
        ([f'"{TAG}"', f'"{TAG}"'], False),
        (["*"], False),
        ([TAG], False),
        ([""], False),
    ],
)
def test_if_range(values: list[str], allowed: bool) -> None:
    assert range_allowed(values, TAG) is allowed


@given(entity_tags)
def test_if_range_allows_only_the_strong_tag_itself(tag: EntityTag) -> None:
    expected = not tag.weak and tag.opaque == TAG
    assert range_allowed([written(tag)], TAG) is expected
    assert range_allowed([written(EntityTag(TAG, tag.weak))], TAG) is not tag.weak
