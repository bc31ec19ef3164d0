"""
Repository names follow the distribution spec's grammar.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.web.names import (
    MAX_NAME_LENGTH,
    InvalidName,
    InvalidTag,
    parse_name,
    parse_tag,
)


@pytest.mark.parametrize(
    "name",
    ["busybox", "library/busybox", "a/b/c", "my-org/my_app.v2", "a__b/c--d", "0/1"],
)
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Library/busybox",
        "/busybox",
        "busybox/",
        "a//b",
        "..",
        "a/../b",
        "a/./b",
        "%2e%2e",
        "a\x00b",
        "-a",
        "a_",
        "a___b",
        "a" * (MAX_NAME_LENGTH + 1),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        parse_name(name)


@given(st.text(max_size=300))
def test_no_valid_name_leaves_its_directory(text: str) -> None:
    try:
        name = parse_name(text)
    except InvalidName:
        return
    parts = name.split("/")
    assert all(part and part not in (".", "..") for part in parts)


@pytest.mark.parametrize("tag", ["latest", "1.36.1-glibc", "_x", "A" * 128, "v1_2.3"])
def test_valid_tags(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a/b", "..", "a" * 129, "a:b"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidTag):
        parse_tag(tag)
