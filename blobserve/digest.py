"""
Content digests: parsing, validation and the hashers that verify them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from attrs import frozen

#: The algorithms blobserve verifies, with the length of their hex encoding.
SUPPORTED_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}

# The OCI image spec's digest grammar: algorithm ":" encoded.
_DIGEST = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_LOWER_HEX = re.compile(r"[0-9a-f]+")


class InvalidDigest(ValueError):
    """
    A digest string is malformed or names an algorithm blobserve cannot verify.
    """


class Hasher(Protocol):
    """
    What L{Digest.hasher} returns: an incremental hash, as in L{hashlib}.
    """

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...

    def copy(self) -> Hasher: ...


@frozen
class Digest:
    """
    A verified-algorithm content digest such as C{sha256:<64 hex>}.

    Instances exist only for supported algorithms with well-formed lowercase
    hex, so a L{Digest} is always safe to use as a file name component.
    """

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """
        Parse C{algorithm:hex}.

        @raise InvalidDigest: if C{text} is not a digest, or its algorithm is
            not one of L{SUPPORTED_ALGORITHMS}, or its hex has the wrong length
            or case.
        """
        match = _DIGEST.fullmatch(text)
        if match is None:
            raise InvalidDigest(f"not a digest: {text[:200]!r}")
        algorithm, encoded = match.groups()
        length = SUPPORTED_ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidDigest(f"unsupported digest algorithm: {algorithm[:50]!r}")
        if len(encoded) != length or not _LOWER_HEX.fullmatch(encoded):
            raise InvalidDigest(
                f"{algorithm} digest must be {length} lowercase hex characters"
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """
        The digest of C{data}.
        """
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Hasher:
        """
        A new incremental hasher for this digest's algorithm.
        """
        return hashlib.new(self.algorithm)

    def short(self) -> str:
        """
        The digest's short form, for logs and pages: its algorithm and the
        first 12 characters of its hex, as C{docker images} shows image IDs.
        """
        return f"{self.algorithm}:{self.hex[:12]}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
