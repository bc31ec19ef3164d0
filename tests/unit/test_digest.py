"""
Digest parsing: only verifiable, well-formed digests get through.
"""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobserve.digest import Digest, InvalidDigest


@given(st.binary(max_size=256), st.sampled_from(["sha256", "sha512"]))
def test_parse_round_trips_real_digests(data: bytes, algorithm: str) -> None:
    text = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    digest = Digest.parse(text)
    assert str(digest) == text
    assert digest == Digest.of(data, algorithm)


def test_hasher_verifies_content() -> None:
    digest = Digest.of(b"layer")
    hasher = digest.hasher()
    hasher.update(b"lay")
    hasher.update(b"er")
    assert hasher.hexdigest() == digest.hex


@pytest.mark.parametrize(
    "text",
    [
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709",
        "sha384:" + "0" * 96,
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + "0" * 64,
        "sha256" + "0" * 64,
        "sha256:../../../etc/passwd",
        "",
    ],
)
def test_parse_rejects_unverifiable_or_malformed(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


@given(st.text(max_size=300))
def test_parse_accepts_only_safe_file_names(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except InvalidDigest:
        return
    assert digest.algorithm in ("sha256", "sha512")
    assert set(digest.hex) <= set("0123456789abcdef")
