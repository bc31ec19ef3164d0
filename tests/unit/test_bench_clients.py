"""
The benchmark's clients against a server of a few lines on a loopback
socket: what their first byte at the wire counts, and what it leaves out.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench import load

#: How long the server below waits, once it has read a request, to answer.
ANSWER_AFTER = 0.2


@contextmanager
def answering_late(delay: float) -> Iterator[str]:
    """
    A server that answers one HTTP request with a body of five bytes,
    C{delay} seconds after it has read the request: its URL.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(4096)
            time.sleep(delay)
            connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/blob"
    finally:
        server.join(10)
        listener.close()


@pytest.mark.parametrize("kind", sorted(load.CLIENTS))
def test_a_first_byte_at_the_wire_counts_the_servers_wait(kind: str) -> None:
    with answering_late(ANSWER_AFTER) as url:
        got = load.CLIENTS[kind](url, timeout=10)
    assert (got.status, got.size) == (200, 5)
    assert got.wire_first_byte is not None
    # The kernel's stamp and the wall clock are the same clock, in steps of
    # far less than this margin.
    assert ANSWER_AFTER - 0.005 <= got.wire_first_byte <= got.done


@pytest.fixture
def connected() -> Iterator[tuple[socket.socket, socket.socket]]:
    """
    Both ends of a loopback TCP connection: the client's, then the
    server's.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_a_first_byte_at_the_wire_is_when_it_arrived_not_when_it_was_read(
    connected: tuple[socket.socket, socket.socket],
) -> None:
    client, server = connected
    sent = load._stamped(client)
    server.sendall(b"x")
    # The client's thread is kept from reading for a while, as by the CPU or
    # the GIL on a busy machine.
    time.sleep(ANSWER_AFTER)
    arrived = load._arrival(client)
    assert arrived - sent < ANSWER_AFTER / 2
    # Only looked at: the byte is still there for the client.
    assert client.recv(1) == b"x"


def test_a_request_leaves_when_the_kernel_sent_it_not_when_it_was_noted(
    connected: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = connected
    sending = load._stamped(client)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    # The client's thread gets back to it only a while later.
    time.sleep(ANSWER_AFTER)
    left = load._departure(client, otherwise=0.0)
    assert sending <= left < sending + ANSWER_AFTER / 2
    # Asking again finds no stamp, and waits for none.
    assert load._departure(client, otherwise=-1.0) == -1.0
