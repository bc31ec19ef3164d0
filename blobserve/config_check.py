"""
C{blobserve-config-check FILE}: check a configuration file as C{twistd
blobserve --config FILE} would at start, and print the settings blobserve
would run with, as a configuration file, with no password in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from blobserve.config import LISTEN, UPSTREAMS, key_of, known_keys
from blobserve.tap import PASSWORD_VARIABLE, Options

#: Exit statuses: the file is usable, or it is not (the reason on stderr).
VALID, INVALID = 0, 1


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # A JSON string is a TOML basic string.
    return json.dumps(str(value), ensure_ascii=False)


def effective_settings(options: Options) -> str:
    """
    The settings C{options} hold once parsed, as a configuration file that
    sets each of them: sizes in bytes, defaults spelt out, a key that is not
    set as a comment. Of credentials it names the files, never a user name
    or a password.
    """
    flags = {key_of(str(flag[0])) for flag in Options.optFlags}
    lines = []
    for key in known_keys(options):
        if key == UPSTREAMS:
            continue
        if key == LISTEN:
            lines.append(f"{LISTEN} = {_toml(options[LISTEN])}")
            continue
        value = options[key.replace("_", "-")]
        if key == "upstream_username" and value is not None:
            # Half of the credentials: output like this ends up in CI logs.
            lines.append(f"# {key} is set (hidden)")
            continue
        if key in flags:
            value = bool(value)
        if value is None:
            lines.append(f"# {key} is not set")
        else:
            lines.append(f"{key} = {_toml(value)}")
    if options["credentials"] is not None and options["upstream-password-file"] is None:
        lines.append(f"# the upstream password is in ${PASSWORD_VARIABLE}")
    files = options["upstream-credentials"]
    for registry, url in options["upstreams"].items():
        lines += ["", f"[{UPSTREAMS}.{_toml(registry)}]", f"url = {_toml(url)}"]
        if registry in files:
            lines.append(f"credentials_file = {_toml(files[registry])}")
        credentials = options["registry-credentials"].get(registry)
        if credentials is not None:
            lines.append("# with credentials (user and password hidden)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Check a configuration file and print its effective settings; the exit
    status is L{VALID} or L{INVALID} (2 for a wrong command line).
    """
    parser = argparse.ArgumentParser(
        prog="blobserve-config-check",
        description="Check a blobserve configuration file as twistd blobserve"
        " --config FILE does at start, and print the settings it gives (every"
        " option's value, defaults included; passwords hidden).",
    )
    parser.add_argument("file", help="the configuration file (TOML)")
    arguments = parser.parse_args(argv)
    options = Options()
    try:
        options.parseOptions(["--config", arguments.file])
    except usage.UsageError as e:
        print(f"blobserve-config-check: {e}", file=sys.stderr)
        return INVALID
    print(effective_settings(options))
    return VALID
