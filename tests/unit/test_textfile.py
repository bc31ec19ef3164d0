"""
read_text_file: a configured file's text, or one line saying why not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blobserve.textfile import UnreadableFile, read_text_file


def test_the_whole_text_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("alice:s3cret\n")
    assert read_text_file(str(path)) == "alice:s3cret\n"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"\xff\xfe s3cret", "cannot be read: not UTF-8 text"),
        (b"s3cret" * 10, "is larger than 50 bytes"),
    ],
)
def test_an_unusable_file_says_why_never_what_it_holds(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "f"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableFile) as refused:
        read_text_file(str(path), limit=50)
    assert str(refused.value) == why
    assert "s3cret" not in str(refused.value)
