"""
Why something failed, in a few words fit for one log line.

Twisted's HTTP client fails with exceptions that wrap a list of Failures
(C{ResponseFailed}, C{ResponseNeverReceived}, C{RequestTransmissionFailed}),
whose message is the C{repr} of that list; and its connection errors say in a
sentence what three words say.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoRouteError,
    TCPTimedOutError,
)
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

#: What the common ways a connection fails are called; the first match wins.
_PHRASES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionAborted, "connection aborted"),
    (ConnectionLost, "connection lost"),
    (ConnectionDone, "connection closed"),
    (TCPTimedOutError, "connection timed out"),
    (NoRouteError, "no route to host"),
    (CancelledError, "cancelled"),
)

#: What each of the HTTP client's wrapping exceptions adds to its reasons.
_WRAPPERS: tuple[tuple[type[Exception], str], ...] = (
    (ResponseNeverReceived, "no response: "),
    (ResponseFailed, ""),
    (RequestTransmissionFailed, "request not sent: "),
    (RequestGenerationFailed, "request not sent: "),
)


def why(reason: Failure | BaseException) -> str:
    """
    Say on one line why C{reason} happened: for an exception of Twisted's
    HTTP client that wraps other failures, the innermost reasons, each said
    once (C{"connection lost"}, C{"no response: connection closed"}); for
    any other, its message (or the name of its type if it has none). Never
    a traceback, never a C{repr} of a Failure.
    """
    error = reason.value if isinstance(reason, Failure) else reason
    for wrapper, prefix in _WRAPPERS:
        if isinstance(error, wrapper):
            inner = getattr(error, "reasons", None) or []
            said = dict.fromkeys(why(r) for r in inner if isinstance(r, Failure))
            return prefix + ("; ".join(said) or type(error).__name__)
    for kind, phrase in _PHRASES:
        if isinstance(error, kind):
            return phrase
    if isinstance(error, DeferredTimeout) and error.args:
        seconds = error.args[0]
        if isinstance(seconds, (int, float)):
            return f"timed out after {seconds:g} s"
    message = " ".join(str(error).split()).rstrip(".")
    return message or type(error).__name__
