"""
How blobserve's log is written: as Twisted's lines of text, or as one JSON
object a line for a log shipper; and where, as twistd would write it. Both
are written by blobserve in twistd's place, but for what twistd alone does
(its syslog).
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import partial
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

#: The values of C{--log-format}.
FORMATS = ("text", "json")


def json_line(event: LogEvent) -> str:
    """
    The line of JSON that says C{event}: an object with C{time} (ISO 8601,
    UTC, to the millisecond), C{level} (C{debug}, C{info}, C{warn},
    C{error}, C{critical}), C{namespace} (the module that logged it),
    C{text} (the message as the text log says it), C{format} (the message
    before its fields were put in: the same for every event of a kind),
    C{traceback} if a failure was logged with it, and the event's own fields
    (C{digest}, C{repository}, ...), which those names override. A field
    JSON has no type for is written as its C{str}. A line holds no newline
    but its last character.
    """
    said: dict[str, Any] = {
        key: value for key, value in event.items() if not key.startswith("log_")
    }
    level = event.get("log_level")
    said.update(
        time=datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        level=getattr(level, "name", None),
        namespace=event.get("log_namespace"),
        text=formatEvent(event),
        format=event.get("log_format"),
    )
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        said["traceback"] = failure.getTraceback()
    try:
        return json.dumps(said, default=_as_text) + "\n"
    except (TypeError, ValueError):
        # A field JSON cannot hold even as text (a mapping with keys that
        # are not strings, a cycle): the event is said without its fields,
        # rather than lost (this observer may be the only one).
        plain = {key: said[key] for key in _STANDARD if key in said}
        return json.dumps(plain, default=_as_text) + "\n"


#: The keys every line has, whatever the event's own fields.
_STANDARD = ("time", "level", "namespace", "text", "format", "traceback")


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def json_observer(out: IO[Any]) -> ILogObserver:
    """
    An observer writing each event to C{out} as one line of JSON (see
    L{json_line}), flushed at once.
    """
    return FileLogObserver(out, json_line)


class CannotLogThere(Exception):
    """
    twistd's options ask for a log that blobserve cannot write in its place.
    """


def check_destination(twistd: Mapping[str, Any]) -> None:
    """
    Refuse the twistd options a log written in twistd's place cannot go
    with: C{--syslog} (syslog has formats of its own), and C{--logfile=-}
    for a daemon (which has no standard output; twistd refuses it for its
    own log too).

    @raise CannotLogThere: saying why.
    """
    if twistd.get("syslog"):
        raise CannotLogThere("--log-format=json cannot go to syslog (--syslog)")
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise CannotLogThere("a daemon cannot log to stdout (--logfile=-)")


def log_destination(twistd: Mapping[str, Any], stdout: IO[str]) -> IO[Any]:
    """
    Where twistd, run with the options C{twistd}, writes its log: C{stdout}
    with C{--logfile=-}, or with C{--nodaemon} and no C{--logfile}; else the
    file C{--logfile} names (C{twistd.log} by default), rotated as twistd
    rotates it (at 1 MB, and on C{SIGUSR1} unless something else handles
    that signal).
    """
    path = twistd.get("logfile") or ""
    if path == "-" or (twistd.get("nodaemon") and not path):
        return stdout
    log_file: LogFile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signal_number: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return cast(IO[Any], log_file)


def twistd_json_observer(twistd: Mapping[str, Any]) -> ILogObserver:
    """
    An observer writing JSON lines where twistd would write its text.
    """
    return json_observer(log_destination(twistd, sys.stdout))


class SecondStamps:
    """
    Twisted's C{formatTime} for a time format of whole seconds, which
    formats each second once: a busy cache writes an access line for every
    request, and formatting a line's time zone and time cost twice as much
    as all the rest of its line (27 of 36 us).
    """

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self._format = time_format
        # One tuple, replaced whole: threads that log see a second and its
        # text together.
        self._last: tuple[int, str] | None = None

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when, self._format)
        second = math.floor(when)
        last = self._last
        if last is None or last[0] != second:
            last = self._last = (second, formatTime(second, self._format))
        return last[1]


def twistd_text_observer(twistd: Mapping[str, Any]) -> ILogObserver:
    """
    Twisted's lines of text, where and as twistd writes them (see
    L{log_destination}), with each second's time stamp formatted once.
    """
    return FileLogObserver(
        log_destination(twistd, sys.stdout),
        partial(formatEventAsClassicLogText, formatTime=SecondStamps()),
    )
