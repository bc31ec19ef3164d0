"""
One request and its response, as the access log and the metrics see it:
what the request was, what the cache did for it, and how its response
ended, however it ended.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote, unquote_plus

from attrs import define
from twisted.logger import Logger
from zope.interface import Interface, implementer

from blobserve.digest import Digest

#: The methods that keep their name in metric labels; others are "other".
_METHODS = {"GET", "HEAD"}

#: Query parameters of the registry API whose values are logged; the values
#: of any other (a token, a signature) are not.
_PLAIN_PARAMETERS = {"ns", "n", "last", "artifactType", "digest"}

#: The access log's own namespace, to route or filter its lines.
access_log = Logger(namespace="blobserve.access")

#: The user and password of an absolute request target (C{GET
#: http://user:password@host/v2/}).
_USERINFO = re.compile(rb"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")

#: The most of a path the access log shows.
_PATH_LIMIT = 512


@define
class Exchange:
    """
    One request and its response, filled in as it is answered.

    @ivar route: what the request was for: C{blob}, C{manifest}, C{tags}
        (a tags list), C{referrers}, C{base}
        (C{/v2/}), C{operator} (status, health, metrics) or C{other}.
    @ivar outcome: what the cache did: C{hit}, C{miss}, C{join}, C{stale},
        C{forward} (a range asked of the upstream and passed through);
        L{None} when it did none of these (an error, another route).
    @ivar digest: the blob or manifest served, if any.
    @ivar sent: body bytes handed to the connection.
    @ivar duration: seconds from the request's arrival to its end.
    @ivar first_byte: for a blob body, seconds from the request's arrival
        to its first byte.
    @ivar aborted: the response did not end: its client left, or blobserve
        cut it.
    """

    client: str
    method: str
    uri: bytes
    started: float
    route: str = "other"
    outcome: str | None = None
    digest: Digest | None = None
    status: int = 200
    sent: int = 0
    duration: float = 0.0
    first_byte: float | None = None
    aborted: bool = False

    def first_byte_sent(self, now: Callable[[], float]) -> None:
        """
        The first byte of the body is sent: note when, by C{now}.
        """
        self.first_byte = now() - self.started

    @property
    def method_label(self) -> str:
        """
        The method as a metric label: one of a few values, whatever clients
        send.
        """
        return self.method if self.method in _METHODS else "other"

    def shown_path(self) -> str:
        """
        The path and query, fit for a log (see L{shown_uri}).
        """
        return shown_uri(self.uri)


def shown_uri(uri: bytes) -> str:
    """
    A request target fit for a log: without the user and password of an
    absolute URI, the values of query parameters that may be secrets
    replaced by C{***} (parameters split at C{&} and C{;} alike), bytes
    outside printable ASCII escaped, and at most L{_PATH_LIMIT} characters.
    """
    path, separator, query = uri.partition(b"?")
    path = _USERINFO.sub(rb"\1", path)
    shown = quote(path.decode("latin-1"), safe="/:@!$&'()*+,;=-._~")
    if separator:
        said = []
        for parameter in re.split(r"[&;]", query.decode("latin-1")):
            name, equals, value = (
                unquote_plus(part) for part in parameter.partition("=")
            )
            if name in _PLAIN_PARAMETERS:
                value = quote(value, safe=":/")
            elif value or equals:
                value = "***"
            said.append(quote(name, safe="") + ("=" if equals else "") + value)
        shown += "?" + "&".join(said)
    if len(shown) > _PATH_LIMIT:
        shown = shown[:_PATH_LIMIT] + "..."
    return shown


class IExchangeObserver(Interface):
    """
    Told of every request once its response has ended.
    """

    def exchange_ended(exchange: Exchange) -> None:
        """
        C{exchange}'s response has ended, whole or cut off.
        """


@implementer(IExchangeObserver)
class AccessLog:
    """
    Logs one line per request, also for responses cut off or abandoned, in
    the namespace C{blobserve.access}: client, method, path, status, bytes
    sent, duration, cache outcome, and the digest's short form.
    """

    def exchange_ended(self, exchange: Exchange) -> None:
        digest = exchange.digest
        path = exchange.shown_path()
        outcome = exchange.outcome or "-"
        short = "" if digest is None else " " + digest.short()
        ending = " aborted" if exchange.aborted else ""
        # The line is made here, and handed over as one field: Twisted's
        # formatting of a message of nine fields costs a request more than
        # everything else the access log and the metrics do for it.
        line = (
            f'{exchange.client} "{exchange.method} {path}" {exchange.status}'
            f" {exchange.sent} {exchange.duration:.3f}s {outcome}{short}{ending}"
        )
        access_log.info(
            "{line}",
            line=line,
            client=exchange.client,
            method=exchange.method,
            path=path,
            status=exchange.status,
            bytes=exchange.sent,
            duration=exchange.duration,
            outcome=outcome,
            digest=None if digest is None else str(digest),
            aborted=exchange.aborted,
        )
