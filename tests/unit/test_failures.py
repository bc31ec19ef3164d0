"""
why: one readable line for a failure, never a repr of a list of Failures.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from blobserve.failures import why


@pytest.mark.parametrize(
    ("reason", "said"),
    [
        (ResponseFailed([Failure(ConnectionLost())]), "connection lost"),
        (ResponseFailed([Failure(ConnectionDone())]), "connection closed"),
        (
            ResponseNeverReceived([Failure(ConnectionDone())]),
            "no response: connection closed",
        ),
        (
            RequestTransmissionFailed([Failure(ConnectionLost())]),
            "request not sent: connection lost",
        ),
        # The same reason twice is said once; different ones are joined.
        (
            ResponseFailed(
                [
                    Failure(ConnectionLost()),
                    Failure(ConnectionLost()),
                    Failure(CancelledError()),
                ]
            ),
            "connection lost; cancelled",
        ),
        (
            ResponseFailed(
                [Failure(ResponseNeverReceived([Failure(ConnectionLost())]))]
            ),
            "no response: connection lost",
        ),
        (ResponseFailed([]), "ResponseFailed"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (DeferredTimeout(30, "Deferred"), "timed out after 30 s"),
        (DNSLookupError("nohost"), "DNS lookup failed: nohost"),
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
        (ValueError(), "ValueError"),
        (ValueError("two\nlines"), "two lines"),
    ],
)
def test_a_failure_is_said_in_one_line(reason: Exception, said: str) -> None:
    assert why(reason) == said
    assert why(Failure(reason)) == said
