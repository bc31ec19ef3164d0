"""
Reading an upstream registry's credentials from a file: a C{user:password}
line, or a docker C{config.json} whose C{auths} entry for the registry is
used, matched as docker matches it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any

from blobserve.textfile import UnreadableFile, read_text_file
from blobserve.upstream.auth import Credentials

#: The names Docker Hub goes by: a docker config.json keys its credentials
#: by the first.
_DOCKER_HUB = {"index.docker.io", "docker.io", "registry-1.docker.io"}

#: The most of a credentials file read: a config.json with many registries
#: is a few kilobytes.
_MAX_FILE = 1024 * 1024


class UnusableCredentials(Exception):
    """
    A credentials file cannot be read, or holds no credentials for the
    registry. The message names the file and the registry, never what the
    file holds.
    """


def _hostname(key: str) -> str:
    """
    The host[:port] a docker config.json C{auths} key names (docker's
    C{ConvertToHostname}: without a scheme, and without any path).
    """
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    return key.partition("/")[0].lower()


def _names(names: Iterable[str]) -> set[str]:
    wanted = {name.lower() for name in names}
    if wanted & _DOCKER_HUB:
        wanted |= _DOCKER_HUB
    return wanted


def _from_entry(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            pair = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return _from_pair(pair)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username, password)
    return None


def _from_pair(text: str) -> Credentials | None:
    username, colon, password = text.partition(":")
    if not colon or not username:
        return None
    return Credentials(username, password)


def _from_config(text: str, names: set[str]) -> Credentials | None:
    try:
        config = json.loads(text)
    except ValueError as e:
        # The decoder's message says where, not what: it echoes no secret.
        lineno = getattr(e, "lineno", "?")
        raise UnusableCredentials(f"is not valid JSON (line {lineno})") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        raise UnusableCredentials("is a JSON file without an auths object")
    for key, entry in auths.items():
        if isinstance(key, str) and _hostname(key) in names:
            credentials = _from_entry(entry)
            if credentials is None:
                raise UnusableCredentials(
                    f"has an auths entry {key!r} with neither an auth"
                    " (base64 user:password) nor a username and password"
                )
            return credentials
    return None


def read_credentials(path: str, names: Iterable[str]) -> Credentials:
    """
    The credentials in the file at C{path} for the registry known by
    C{names} (its name in C{--upstream}, its URL's host[:port]).

    The file holds C{user:password} on its first line (the password may hold
    colons; a line end is not part of it), or is a docker C{config.json}:
    the C{auths} entry whose key names one of C{names} (with or without a
    scheme or path, as docker writes them; C{https://index.docker.io/v1/}
    for Docker Hub) gives them, as C{auth} (base64 C{user:password}) or
    C{username} and C{password}.

    @raise UnusableCredentials: if the file cannot be read, or holds none
        for the registry; its message does not echo the file's content.
    """
    wanted = _names(names)
    try:
        text = read_text_file(path, _MAX_FILE)
    except UnreadableFile as e:
        raise UnusableCredentials(str(e)) from None
    if text.lstrip().startswith(("{", "[")):
        credentials = _from_config(text, wanted)
        if credentials is None:
            raise UnusableCredentials(
                "has no auths entry for " + " or ".join(sorted(wanted))
            )
        return credentials
    credentials = _from_pair(text.splitlines()[0] if text else "")
    if credentials is None:
        raise UnusableCredentials(
            "holds neither user:password on its first line nor a docker config.json"
        )
    return credentials
