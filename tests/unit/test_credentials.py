"""
Upstream credentials files: user:password lines and docker config.json.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from blobserve.upstream.auth import Credentials
from blobserve.upstream.credentials import UnusableCredentials, read_credentials

SECRET = "pa:ss word"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "credentials"
    path.write_text(text)
    return str(path)


def config(auths: dict[str, object]) -> str:
    return json.dumps({"auths": auths, "credsStore": "desktop"})


def basic(pair: str) -> str:
    return base64.b64encode(pair.encode()).decode()


def test_a_user_password_line_keeps_colons_in_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, f"bob:{SECRET}\r\n")
    assert read_credentials(path, ["r.test"]) == Credentials("bob", SECRET)


@pytest.mark.parametrize(
    "key",
    [
        "r.test:5000",
        "https://r.test:5000",
        "http://r.test:5000/v2/",
        "R.TEST:5000",
    ],
)
def test_config_json_auth_is_matched_by_host_and_port(tmp_path: Path, key: str) -> None:
    path = write(
        tmp_path,
        config(
            {
                "other.test": {"auth": basic("eve:nope")},
                key: {"auth": basic(f"bob:{SECRET}")},
            }
        ),
    )
    assert read_credentials(path, ["mirror", "r.test:5000"]) == Credentials(
        "bob", SECRET
    )


def test_config_json_username_and_password_fields(tmp_path: Path) -> None:
    path = write(tmp_path, config({"r.test": {"username": "bob", "password": SECRET}}))
    assert read_credentials(path, ["r.test"]) == Credentials("bob", SECRET)


def test_docker_hub_is_found_under_its_index_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, config({"https://index.docker.io/v1/": {"auth": basic("bob:x")}})
    )
    assert read_credentials(path, ["docker.io", "registry-1.docker.io"]) == (
        Credentials("bob", "x")
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no colon here\n",
        f":{SECRET}\n",
        "{not json " + SECRET,
        json.dumps([SECRET]),
        config({"other.test": {"auth": basic(f"bob:{SECRET}")}}),
        config({"r.test": {"auth": "!!" + SECRET}}),
        config({"r.test": {"auth": basic(SECRET.replace(":", ""))}}),
        config({"r.test": {"identitytoken": SECRET}}),
    ],
)
def test_unusable_files_say_so_without_echoing_them(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UnusableCredentials) as raised:
        read_credentials(path, ["r.test"])
    message = str(raised.value)
    assert message
    for secret in (SECRET, "ss word", "bob", basic(f"bob:{SECRET}")):
        assert secret not in message


def test_an_unreadable_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(UnusableCredentials, match="cannot be read"):
        read_credentials(str(tmp_path / "missing"), ["r.test"])
