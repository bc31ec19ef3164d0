"""
C{blobserve-haproxy-config NODE... [--listen ADDR:PORT]}: the HAProxy
configuration that puts several blobserve nodes behind one address, each
digest on one node, so that a cluster fetches each blob from its upstream
once.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

#: Where HAProxy listens unless told otherwise: blobserve's own default port,
#: on every interface.
DEFAULT_LISTEN = "0.0.0.0:5000"

#: The line that picks a node by the request's shard key (see
#: L{haproxy_config}).
BALANCE_BY_SHARD = "balance hash var(txn.shard)"

#: Exit statuses: the configuration was printed, or the command line was
#: wrong (the reason on stderr).
PRINTED, WRONG_USAGE = 0, 2

# A host name, an IPv4 address, or an IPv6 address in brackets, then a port.
_ADDRESS = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r":(?P<port>[0-9]{1,5})"
)
# The same, or with the host left out or "*": every interface.
_LISTEN = re.compile(rf"(?:{_ADDRESS.pattern})|\*?:(?P<any_port>[0-9]{{1,5}})")

# A digest-addressed blob or manifest: /v2/<name>/blobs/<digest> or
# /v2/<name>/manifests/<digest>, the digest as the OCI distribution
# specification writes it (algorithm:encoded). HAProxy's "path" leaves out the
# query string, so ?ns= does not change the key either.
_BY_DIGEST = r"^/v2/.+/(blobs|manifests)/[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$"


class AddressError(ValueError):
    """
    A node or listen address that is not C{host:port}.
    """


#: How each node is checked and weighed (see the comment in the config).
_DEFAULT_SERVER = (
    "check inter 1s fastinter 500ms downinter 2s fall 2 rise 2"
    " weight 64 on-marked-down shutdown-sessions"
)


def _checked(text: str, pattern: re.Pattern[str], what: str) -> str:
    match = pattern.fullmatch(text)
    port = None
    if match is not None:
        port = match.group("port") or match.groupdict().get("any_port")
    if port is None or not 1 <= int(port) <= 65535:
        raise AddressError(
            f"{what} {text!r} is not HOST:PORT (a host name, an IPv4 address or"
            " an IPv6 address in brackets, and a port from 1 to 65535)"
        )
    return text


def haproxy_config(nodes: Sequence[str], listen: str = DEFAULT_LISTEN) -> str:
    """
    The HAProxy (2.6 or later) configuration for the blobserve nodes
    C{nodes} (each C{host:port}), listening on C{listen} (C{addr:port}, C{*:port}
    or C{:port}).

    A blob or manifest requested by digest goes to the node the digest alone
    hashes to (consistent hashing: the repository name and C{?ns=} do not
    count), so each blob is fetched from the upstream by one node. Every
    other request (tags, tag lists, referrers, C{/v2/}) is spread by the hash
    of its whole path. Nodes are checked on C{/_blobserve/health}; a node
    that fails is taken out, and only its share of the digests moves to the
    others, and back when it returns. The nodes' order gives their place on
    the hash ring: add a node at the end, and keep the others in place.

    @raise AddressError: if an address is not C{host:port}, or there is no
        node, or a node is named twice.
    """
    if not nodes:
        raise AddressError("a cluster needs at least one node")
    if len(set(nodes)) != len(nodes):
        raise AddressError("a node is named twice")
    for node in nodes:
        _checked(node, _ADDRESS, "node")
    _checked(listen, _LISTEN, "listen address")
    servers = "\n".join(
        f"    server node{n} {node} id {n}" for n, node in enumerate(nodes, 1)
    )
    return f"""\
# HAProxy in front of blobserve nodes, each digest on one node.
# Written by: blobserve-haproxy-config {" ".join(nodes)} --listen {listen}
# Check it with: haproxy -c -f FILE

global
    # One line per request (option httplog), on standard output: the journal
    # under systemd.
    log stdout format raw local0
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    # Every timeout below is an inactivity timeout, never a limit on a whole
    # transfer: a multi-GiB layer from a slow upstream streams for as long as
    # bytes move. blobserve answers a miss once the upstream's headers arrive
    # (it waits at most --upstream-timeout, 30 s, for them and as long again
    # for a download slot) and resumes a body that stalls for
    # --upstream-idle-timeout (30 s), so a node that sends nothing for 10
    # minutes is stuck. A client may pause reading (an unpacking puller) for
    # as long. No "timeout tunnel": nothing here is upgraded to a tunnel.
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout client-fin 30s
    timeout server-fin 30s
    # A client's request headers, and its idle time between requests.
    timeout http-request 30s
    timeout http-keep-alive 60s
    timeout queue 30s
    timeout check 5s
    # "option http-buffer-request" stays off (HAProxy's default, never
    # enabled here): a request is passed on as it arrives, and a response
    # streams through HAProxy's buffers without waiting for its end.

frontend blobserve
    bind {listen}
    # The shard key: the digest alone for a blob or manifest by digest, so
    # that the same digest under any repository name, with or without ?ns=,
    # lands on one node; the whole path for anything else.
    acl by_digest path_reg {_BY_DIGEST}
    http-request set-var(txn.shard) path,field(-1,/) if by_digest
    http-request set-var(txn.shard) path unless by_digest
    default_backend nodes

backend nodes
    {BALANCE_BY_SHARD}
    # Consistent hashing: when a node goes down or joins, only its share of
    # the keys moves. No hash-balance-factor: a busy digest stays on its
    # node, where its one download is.
    hash-type consistent
    option httpchk GET /_blobserve/health
    http-check expect status 200
    # A node is out after two failed checks (2 s for one that refuses; up to
    # about 11 s for one that hangs, each check waiting "timeout check"),
    # back after two good ones; the transfers still open on a node marked
    # out are cut then, not left to hang for "timeout server". Weight 64: a
    # node has 16 points on the ring per unit of weight, and with 16 the
    # shares of three nodes came out as 40/28/32 %; with 1024, about 34/33/33.
    default-server {_DEFAULT_SERVER}
    # A request that never reached a node (refused) or that a node closed
    # before answering anything is sent again, to another node: safe for GET
    # and HEAD, which change nothing; blobserve answers nothing else.
    # A response cut after its headers is not retried here: the client sees
    # a truncated body and retries itself, and its retry goes to a node that
    # is up.
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response
    http-request disable-l7-retry unless METH_GET
{servers}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """
    Print the HAProxy configuration for the nodes on the command line; the
    exit status is L{PRINTED} or L{WRONG_USAGE}.
    """
    parser = argparse.ArgumentParser(
        prog="blobserve-haproxy-config",
        description="Print an HAProxy configuration for a cluster of blobserve"
        " nodes: each blob and manifest by digest goes to one node, by a"
        " consistent hash of the digest, and nodes are health-checked. Add new"
        " nodes at the end of the list.",
    )
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="a node, HOST:PORT")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR:PORT",
        help=f"where HAProxy listens (default: {DEFAULT_LISTEN})",
    )
    arguments = parser.parse_args(argv)
    try:
        config = haproxy_config(arguments.nodes, arguments.listen)
    except AddressError as e:
        print(f"blobserve-haproxy-config: {e}", file=sys.stderr)
        return WRONG_USAGE
    sys.stdout.write(config)
    return PRINTED
