"""
Settings and fixtures shared by the tests of several modules.
"""

import pytest
from hypothesis import settings

# Bounded and free of wall-clock deadlines, so CI stays fast and steady.
settings.register_profile("blobserve", max_examples=200, deadline=None)
settings.load_profile("blobserve")


@pytest.fixture
def sink_for_every_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Send every body with the sink, however small: the blobs of the tests
    that ask for it are a few KiB, and bodies that small go through the
    transport (see test_a_small_body_goes_with_its_headers_in_one_write),
    where those tests pin how bodies go with the sink.
    """
    monkeypatch.setattr("blobserve.serve.producer.SMALL_BODY", 0)
