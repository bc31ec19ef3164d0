"""
L{RetryPolicy}: how often and after how long a broken upstream transfer is
resumed, and when it is given up.
"""

from __future__ import annotations

from attrs import frozen
from twisted.python.failure import Failure

from blobserve.fetch.writer import VerificationFailed
from blobserve.upstream.client import BlobUnknown

#: The longest pause between two attempts to resume a transfer.
MAX_RETRY_DELAY = 30.0


@frozen
class RetryPolicy:
    """
    How a broken transfer is resumed: up to C{retries} times, waiting
    C{delay} seconds before the first attempt and twice as long before each
    next (at most L{MAX_RETRY_DELAY}).
    """

    retries: int = 5
    delay: float = 0.5

    def pause(self, attempt: int) -> float:
        return float(min(self.delay * 2 ** (attempt - 1), MAX_RETRY_DELAY))

    def exhausted(self, attempt: int) -> bool:
        """
        Whether attempt C{attempt} is one more than allowed.
        """
        return attempt > self.retries

    def gives_up(self, attempt: int, reason: Failure) -> bool:
        """
        Whether a transfer that broke for C{reason} is not resumed with
        attempt C{attempt}: the retries are exhausted, or no resume can
        mend it (the upstream no longer has the blob, or its bytes are
        wrong).
        """
        return self.exhausted(attempt) or bool(
            reason.check(BlobUnknown, VerificationFailed)
        )


#: The policy of a download that is given none.
DEFAULT_RETRY = RetryPolicy()
