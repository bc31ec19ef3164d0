"""
The client snippets of deploy/, as a test installs them: with the mirror's
placeholder address replaced by the blobserve under test.
"""

from __future__ import annotations

from pathlib import Path

#: Where the snippets expect the mirror; a test puts its own address there.
PLACEHOLDER = "blobserve.internal:5000"

DEPLOY = Path(__file__).parents[2] / "deploy"


def rendered(snippet: str, mirror: str) -> str:
    """
    The text of C{deploy/<snippet>} pointing at C{mirror} (host:port).

    @raise AssertionError: if the snippet does not name the placeholder,
        so that a test never runs with a file that points elsewhere.
    """
    text = (DEPLOY / snippet).read_text()
    assert PLACEHOLDER in text, f"deploy/{snippet} does not name {PLACEHOLDER}"
    return text.replace(PLACEHOLDER, mirror)
