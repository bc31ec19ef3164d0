"""
Reading the small text files blobserve is pointed at: credentials,
passwords, htpasswd files.
"""

from __future__ import annotations

#: The largest such file read, in characters: anything larger is no such
#: file, and is not read into memory.
MAX_TEXT_FILE = 4 * 1024 * 1024


class UnreadableFile(Exception):
    """
    A file cannot be read as text. The message says why in a few words,
    never what the file holds.
    """


def read_text_file(path: str, limit: int = MAX_TEXT_FILE) -> str:
    """
    The whole text of the UTF-8 file at C{path}.

    @raise UnreadableFile: if it cannot be opened or read, is not UTF-8, or
        holds more than C{limit} characters.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(limit + 1)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or "not UTF-8 text"
        raise UnreadableFile(f"cannot be read: {reason}") from None
    if len(text) > limit:
        raise UnreadableFile(f"is larger than {limit} bytes")
    return text
