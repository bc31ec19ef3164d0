"""
Several ranges in one request: a C{multipart/byteranges} body, of a stored
blob and of one in flight, read back with the standard library's MIME parser.
"""

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from test_resource import DATA, Registry, commit, registry_for
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from blobserve.serve.multipart import byteranges
from blobserve.web.ranges import MAX_RANGES

from fakes import Connection

SIZE = len(DATA)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return registry_for(tmp_path, Clock())


def parts_of(connection: Connection) -> list[tuple[str, str, bytes]]:
    """
    The content type, content range and bytes of each part of a complete
    206 multipart response, checking its length on the way.
    """
    status, headers, body = connection.response()
    assert status == 206
    assert int(headers["content-length"]) == len(body)
    assert headers["content-type"].startswith("multipart/byteranges; boundary=")
    message = email.message_from_bytes(
        f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body,
        policy=email.policy.HTTP,
    )
    assert isinstance(message, EmailMessage)
    assert message.is_multipart()
    found = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((part["Content-Type"], part["Content-Range"], payload))
    return found


def expected(*ranges: tuple[int, int]) -> list[tuple[str, str, bytes]]:
    return [
        ("application/octet-stream", f"bytes {a}-{b}/{SIZE}", DATA[a : b + 1])
        for a, b in ranges
    ]


def test_several_ranges_of_a_stored_blob_are_parts(registry: Registry) -> None:
    commit(registry)
    client = registry.get(headers={"Range": "bytes=0-99,1000-1999,-10"})
    assert parts_of(client) == expected((0, 99), (1000, 1999), (SIZE - 10, SIZE - 1))
    assert registry.upstream.fetches == []


def test_unsatisfiable_ranges_of_a_set_are_left_out(registry: Registry) -> None:
    commit(registry)
    client = registry.get(headers={"Range": f"bytes=5-9,{SIZE}-,20-29"})
    assert parts_of(client) == expected((5, 9), (20, 29))


def test_a_set_of_which_nothing_is_satisfiable_is_416(registry: Registry) -> None:
    commit(registry)
    status, headers, _ = registry.get(
        headers={"Range": f"bytes={SIZE}-,{SIZE + 5}-{SIZE + 9}"}
    ).response()
    assert status == 416
    assert headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-99,50-149",
        "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1)),
    ],
)
def test_overlapping_or_too_many_ranges_get_the_whole_blob(
    registry: Registry, header: str
) -> None:
    commit(registry)
    status, headers, body = registry.get(headers={"Range": header}).response()
    assert (status, body) == (200, DATA)
    assert "content-range" not in headers


def test_parts_of_a_blob_in_flight_stream_as_their_bytes_land(
    registry: Registry,
) -> None:
    client = registry.get(headers={"Range": "bytes=60000-60099,10-19"})
    response = registry.answer()
    assert response.protocol is not None
    status, headers, body = client.response()
    assert status == 206
    assert b"60000-60099" in body  # the first part's headers, at once
    declared = int(headers["content-length"])

    response.protocol.dataReceived(DATA[:60050])
    # The first part as far as it has landed; nothing of the second yet.
    assert client.response()[2].endswith(DATA[60000:60050])
    response.protocol.dataReceived(DATA[60050:70000])
    # Every part, before the blob is complete.
    assert parts_of(client) == expected((60000, 60099), (10, 19))
    assert len(client.response()[2]) == declared
    response.protocol.dataReceived(DATA[70000:])
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert registry.committed()
    assert not client.transport.aborted


def test_the_declared_length_is_the_body_length() -> None:
    body = byteranges([(0, 10), (500, 501)], 1000, boundary="b")
    assert body.content_type == b"multipart/byteranges; boundary=b"
    assert body.length == (
        sum(len(span.head) for span in body.spans) + 10 + 1 + len(body.tail)
    )
    assert body.tail == b"\r\n--b--\r\n"
