"""
The configuration file (C{twistd blobserve --config blobserve.toml}): a TOML
file with a key for each command-line option, read and checked as a whole
before blobserve starts, and laid under the flags given on the command line.
"""

from __future__ import annotations

import getopt
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from blobserve.upstream.credentials import UnusableCredentials, read_credentials
from blobserve.web.clientauth import UnusableHtpasswd, read_htpasswd

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The keys that are no option's plain value: the endpoints to listen on (a
#: list, for a repeatable flag), and the table of upstreams, which holds what
#: --upstream and --upstream-credentials give.
LISTEN = "listen"
UPSTREAMS = "upstreams"

#: The options with no key: the file's own name.
_NOT_IN_FILE = {"config"}

#: The most of a configuration file read: a few kilobytes are plenty.
_MAX_FILE = 1024 * 1024


class ConfigError(usage.UsageError):
    """
    A configuration file cannot be read, or holds a key blobserve does not
    know or a value it cannot use. The message names the file and the key,
    never a password.
    """


@frozen
class Upstream:
    """
    A registry the file mirrors: its URL, and the file its credentials are in.
    """

    url: str
    credentials_file: str | None = None


@frozen
class Config:
    """
    What a configuration file sets: the value of each option it names (by
    the option's long name, as L{usage.Options} keeps it), the endpoints to
    listen on, and the upstreams in the file's order, the first the default.
    """

    path: str
    values: Mapping[str, Any]
    listen: tuple[str, ...] | None
    upstreams: Mapping[str, Upstream] | None


def key_of(option: str) -> str:
    """
    The configuration file's key for the command-line option C{option}.
    """
    return option.replace("-", "_")


class _UnusedReactor:
    """
    The reactor endpoint parsers are given when an endpoint is only checked:
    they keep it for later, and Twisted's never call it while parsing. One
    that did gets a L{ValueError}, so the endpoint is refused, not the
    process ended.
    """

    # Not twisted.internet.testing's MemoryReactor: importing that module
    # loads twisted.trial with it, 2.4 MiB of the server's RSS for good.

    def __getattr__(self, name: str) -> Any:
        raise ValueError(f"its parser needs the reactor ({name}) to parse")


def check_endpoint(description: str) -> None:
    """
    Check that C{description} is a Twisted server endpoint string, without
    listening on it (and without touching the reactor, which twistd may not
    have installed yet).

    @raise ValueError: if it is not.
    """
    try:
        serverFromString(_UnusedReactor(), description)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"not a server endpoint: {description[:80]!r} ({e})") from None


def upstream_url(url: str) -> str:
    """
    An upstream registry's URL, without a trailing slash.

    @raise ValueError: if it is not an http(s) URL with a host, or carries a
        user or password (which would be logged with it).
    """
    parsed = urlsplit(url)
    if "@" in parsed.netloc:
        # Not echoed, whatever else is wrong with it: what precedes the @
        # is a password, or part of one.
        raise ValueError("URLs take no user or password: give a credentials file")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"needs an http(s) URL, not {url[:80]!r}")
    return url.rstrip("/")


def given_options(options: usage.Options, argv: Iterable[str]) -> set[str]:
    """
    The long names of the options that C{argv} gives C{options} (a flag given
    there wins over the file, in whichever order it comes). A command line
    that does not parse names none: C{options} refuses it anyway.
    """
    try:
        pairs, _ = getopt.getopt(list(argv), options.shortOpt, options.longOpt)
    except getopt.error:
        return set()
    given = set()
    for flag, _value in pairs:
        name = flag.lstrip("-")
        name = options.synonyms.get(name, options.synonyms.get(key_of(name), name))
        given.add(name)
    return given


@frozen
class _Setting:
    """
    One plain key: the option it sets, the TOML types it takes, and how a
    value becomes the option's (as the option's flag turns its text into it).
    """

    option: str
    types: tuple[type, ...]
    coerce: Callable[[str], Any] | None


def _settings(options: usage.Options) -> dict[str, _Setting]:
    """
    The plain keys of C{options}: one for each flag (a boolean) and for each
    parameter, whose TOML types follow from its default: a whole number, any
    number, or text (or a number of bytes, for a size's text).
    """
    settings = {}
    flags: list[list[Any]] = getattr(options, "optFlags", [])
    parameters: list[list[Any]] = getattr(options, "optParameters", [])
    for flag in flags:
        settings[key_of(flag[0])] = _Setting(flag[0], (bool,), None)
    for name, _short, default, _doc, *rest in parameters:
        coerce = rest[0] if rest else None
        if name in _NOT_IN_FILE:
            continue
        if default is None and coerce is None:
            types: tuple[type, ...] = (str,)
        elif isinstance(default, int):
            types = (int,)
        elif isinstance(default, float):
            types = (int, float)
        elif coerce is None:
            types = (str,)
        else:
            types = (str, int)
        settings[key_of(name)] = _Setting(name, types, coerce)
    return settings


def known_keys(options: usage.Options) -> list[str]:
    """
    Every key a configuration file for C{options} may hold.
    """
    return [LISTEN, *_settings(options), UPSTREAMS]


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number"}


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, "a string") for t in types)


def _readable(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def _parse(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from None
    if len(data) > _MAX_FILE:
        raise ConfigError(f"{path}: larger than {_MAX_FILE} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib says where, and quotes no value.
        raise ConfigError(f"{path}: is not TOML: {e}") from None


def read_config(path: str, options: usage.Options) -> Config:
    """
    Read and check the configuration file at C{path} for C{options}: every
    key known, every value of its type and usable (sizes, numbers, endpoints,
    URLs; the credentials, password and htpasswd files it names readable and
    holding what they should).

    @raise ConfigError: naming the file and the first key found wrong.
    """
    table = _parse(path)
    settings = _settings(options)

    def refuse(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    values: dict[str, Any] = {}
    listen = upstreams = None
    for key, value in table.items():
        if key == LISTEN:
            listen = _listen(value, refuse)
            continue
        if key == UPSTREAMS:
            upstreams = _upstreams(value, refuse)
            continue
        setting = settings.get(key)
        if setting is None:
            raise ConfigError(f"{path}: unknown key {key!r}")
        # bool is an int to Python, but not to a reader of the file.
        if not isinstance(value, setting.types) or (
            isinstance(value, bool) and bool not in setting.types
        ):
            raise refuse(key, f"must be {_type_names(setting.types)}, not {value!r}")
        if setting.coerce is not None:
            try:
                value = setting.coerce(str(value))
            except ValueError as e:
                raise refuse(key, str(e)) from None
        values[setting.option] = value
    _check_files(values, refuse)
    if "metrics-listen" in values:
        try:
            check_endpoint(values["metrics-listen"])
        except ValueError as e:
            raise refuse("metrics_listen", str(e)) from None
    return Config(path, values, listen, upstreams)


Refuse = Callable[[str, str], ConfigError]


def _listen(value: object, refuse: Refuse) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise refuse(LISTEN, f"must be a list of endpoint strings, not {value!r}")
    for endpoint in value:
        if not isinstance(endpoint, str):
            raise refuse(LISTEN, f"must be a list of strings, not {endpoint!r}")
        try:
            check_endpoint(endpoint)
        except ValueError as e:
            raise refuse(LISTEN, str(e)) from None
    return tuple(value)


def _upstreams(value: object, refuse: Refuse) -> dict[str, Upstream]:
    if not isinstance(value, dict) or not value:
        raise refuse(
            UPSTREAMS, 'must be tables, as [upstreams."docker.io"] url = "https://…"'
        )
    found = {}
    for registry, entry in value.items():
        key = f'{UPSTREAMS}."{registry}"'
        if not isinstance(entry, dict):
            raise refuse(key, "must be a table with url and credentials_file")
        unknown = set(entry) - {"url", "credentials_file"}
        if unknown:
            raise refuse(key, f"unknown key {sorted(unknown)[0]!r}")
        url, credentials = entry.get("url"), entry.get("credentials_file")
        if not isinstance(url, str):
            raise refuse(f"{key}.url", f"must be a string, not {url!r}")
        try:
            url = upstream_url(url)
        except ValueError as e:
            raise refuse(f"{key}.url", str(e)) from None
        if credentials is not None:
            if not isinstance(credentials, str):
                raise refuse(
                    f"{key}.credentials_file", f"must be a string, not {credentials!r}"
                )
            try:
                read_credentials(credentials, (registry, urlsplit(url).netloc))
            except UnusableCredentials as e:
                raise refuse(f"{key}.credentials_file", f"{credentials} {e}") from None
        found[registry] = Upstream(url, credentials)
    return found


def _check_files(values: Mapping[str, Any], refuse: Refuse) -> None:
    """
    Check the files the plain keys name, so that a file that cannot be used
    is refused with its key named (the options read them again at start).
    """
    password_file = values.get("upstream-password-file")
    if password_file is not None:
        try:
            _readable(password_file)
        except OSError as e:
            raise refuse(
                "upstream_password_file",
                f"{password_file} cannot be read: {e.strerror}",
            ) from None
    htpasswd = values.get("htpasswd")
    if htpasswd is not None:
        try:
            read_htpasswd(htpasswd)
        except UnusableHtpasswd as e:
            raise refuse("htpasswd", f"{htpasswd} {e}") from None


def apply_config(options: usage.Options, config: Config, given: set[str]) -> None:
    """
    Set in C{options} what C{config} sets, but the options C{given} on the
    command line, which win. C{--upstream} flags replace the file's upstreams
    (URLs and credentials files alike), as any flag replaces its key;
    C{--upstream-credentials} flags add to the file's credentials files, and
    win for the same registry.
    """
    for option, value in config.values.items():
        if option not in given:
            options[option] = value
    if config.listen is not None and LISTEN not in given:
        options[LISTEN] = list(config.listen)
    if config.upstreams is not None and "upstream" not in given:
        options["upstreams"] = {
            registry: upstream.url for registry, upstream in config.upstreams.items()
        }
        # --upstream-username gives the default upstream its credentials:
        # then the file's for it do not count, as a flag wins over a key.
        default = next(iter(config.upstreams), None)
        overridden = default if "upstream-username" in given else None
        options["upstream-credentials"] = {
            **{
                registry: upstream.credentials_file
                for registry, upstream in config.upstreams.items()
                if upstream.credentials_file is not None and registry != overridden
            },
            **options["upstream-credentials"],
        }
