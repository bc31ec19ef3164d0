"""
The log's formats: Twisted's text, or one JSON object a line written where
twistd would write its text.
"""

from __future__ import annotations

import io
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import Application
from twisted.application.twist._options import TwistOptions
from twisted.internet.testing import MemoryReactor
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatTime,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.usage import UsageError
from twisted.scripts._twistd_unix import ServerOptions

from blobserve.ops.logs import SecondStamps, json_line, log_destination
from blobserve.tap import Options, makeService


def event(**fields: Any) -> dict[str, Any]:
    """
    An event as a L{Logger} makes it.
    """
    events: list[dict[str, Any]] = []
    Logger(namespace="blobserve.test", observer=cast(ILogObserver, events.append)).emit(
        fields.pop("level", LogLevel.info), **fields
    )
    return events[0]


def test_an_event_is_one_line_of_json_with_its_text_and_fields() -> None:
    line = json_line(
        event(format="committed {digest} ({size} bytes)", digest="sha256:ab", size=3)
    )
    assert line.endswith("\n")
    assert "\n" not in line[:-1]
    said = json.loads(line)
    assert said["text"] == "committed sha256:ab (3 bytes)"
    assert said["format"] == "committed {digest} ({size} bytes)"
    assert (said["level"], said["namespace"]) == ("info", "blobserve.test")
    assert (said["digest"], said["size"]) == ("sha256:ab", 3)
    assert said["time"].endswith("Z")
    assert not [key for key in said if key.startswith("log_")]


def test_a_failure_is_one_line_with_its_traceback_as_a_field() -> None:
    try:
        raise ValueError("no\nway")
    except ValueError:
        failure = Failure()
    line = json_line(
        event(level=LogLevel.critical, format="broke", log_failure=failure)
    )
    assert "\n" not in line[:-1]
    said = json.loads(line)
    assert (said["level"], said["text"]) == ("critical", "broke")
    assert "ValueError: no\nway" in said["traceback"]


def test_fields_json_has_no_type_for_are_their_text() -> None:
    said = json.loads(json_line(event(format="{what}", what=Path("/x"), raw=b"\xff")))
    assert (said["what"], said["raw"]) == ("/x", "\xff")


def test_an_event_whose_fields_json_cannot_hold_is_said_without_them() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    for fields in ({"headers": {b"key": b"value"}}, {"cycle": cycle}):
        said = json.loads(json_line(event(format="asked {n}", n=3, **fields)))
        assert said["text"] == "asked 3"
        assert "headers" not in said and "n" not in said


@pytest.fixture
def usr1() -> Iterator[None]:
    """
    Give SIGUSR1 back to whoever handled it before the test.
    """
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize(
    "twistd",
    [{"nodaemon": True, "logfile": None}, {"nodaemon": True, "logfile": "-"}],
)
def test_the_json_log_goes_to_stdout_where_twistd_would_write_text(
    twistd: dict[str, Any],
) -> None:
    stdout = io.StringIO()
    assert log_destination(twistd, stdout) is stdout


@pytest.mark.parametrize("nodaemon", [True, False])
def test_the_json_log_goes_to_the_logfile_rotated_on_sigusr1(
    tmp_path: Path, nodaemon: bool, usr1: None
) -> None:
    path = tmp_path / "blobserve.log"
    destination = log_destination(
        {"nodaemon": nodaemon, "logfile": str(path)}, io.StringIO()
    )
    assert isinstance(destination, LogFile)
    assert destination.path == str(path)
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)


def test_a_daemon_without_logfile_logs_json_to_twistd_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usr1: None
) -> None:
    monkeypatch.chdir(tmp_path)
    destination = log_destination({"nodaemon": False, "logfile": None}, sys.stdout)
    assert isinstance(destination, LogFile)
    assert destination.path == str(tmp_path / "twistd.log")


def twistd(*arguments: str) -> ServerOptions:
    """
    twistd's options, parsed from its command line.
    """
    options = ServerOptions()
    options.parseOptions(list(arguments))
    return options


def joined(tmp_path: Path, *arguments: str) -> Any:
    """
    The application twistd makes for C{twistd ARGUMENTS blobserve
    --log-format json}, once blobserve's service has joined it.
    """
    options = twistd(
        *arguments, "blobserve", "--storage", str(tmp_path), "--log-format", "json"
    )
    service = makeService(options.subOptions, MemoryReactor())
    application = Application("blobserve")
    service.setServiceParent(application)
    return application


def test_json_lines_replace_twistds_text_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    application = joined(tmp_path, "--nodaemon")
    observer = application.getComponent(ILogObserver)
    observer(event(format="hello {who}", who="you"))
    said = json.loads(capsys.readouterr().out)
    assert said["text"] == "hello you"


def test_json_lines_replace_twistds_text_in_the_logfile(
    tmp_path: Path, usr1: None
) -> None:
    path = tmp_path / "blobserve.log"
    application = joined(tmp_path, "--nodaemon", f"--logfile={path}")
    application.getComponent(ILogObserver)(event(format="hello"))
    assert json.loads(path.read_text())["text"] == "hello"


def test_text_lines_are_twistds_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = twistd("--nodaemon", "blobserve", "--storage", str(tmp_path))
    assert options.subOptions["log-format"] == "text"
    application = Application("blobserve")
    makeService(options.subOptions, MemoryReactor()).setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    twistds = io.StringIO()
    # Events a second apart, and two within one second, either side of its
    # middle: each line says its own second.
    for who, when in [("a", 1e9 + 0.9), ("b", 1e9 + 1.2), ("c", 1e9 + 1.7)]:
        said = {**event(format="hello {who}", who=who), "log_time": when}
        observer(said)
        textFileLogObserver(twistds)(said)
    assert capsys.readouterr().out == twistds.getvalue()
    assert len({line[:24] for line in twistds.getvalue().splitlines()}) == 2


def test_text_leaves_the_log_to_twistds_syslog(tmp_path: Path) -> None:
    options = twistd("--syslog", "blobserve", "--storage", str(tmp_path))
    application = Application("blobserve")
    makeService(options.subOptions, MemoryReactor()).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("runner", ["twist", "twistd --logger"])
def test_no_log_is_opened_where_twistd_does_not_take_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    usr1: None,
    log_format: str,
    runner: str,
) -> None:
    # twistd --logger takes that observer over the application's; twist
    # logs on its own.
    monkeypatch.chdir(tmp_path)
    storage = ["blobserve", "--storage", str(tmp_path), "--log-format", log_format]
    if runner == "twist":
        options: Any = TwistOptions()
        options.parseOptions(storage)
    else:
        options = twistd("--logger=twisted.logger.globalLogPublisher", *storage)
    application = Application("blobserve")
    makeService(options.subOptions, MemoryReactor()).setServiceParent(application)
    assert application.getComponent(ILogObserver) is None
    assert not (tmp_path / "twistd.log").exists()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)


def test_each_second_is_formatted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    formatted: list[float | None] = []

    def counting(when: float | None, time_format: str) -> str:
        formatted.append(when)
        return formatTime(when, time_format)

    monkeypatch.setattr("blobserve.ops.logs.formatTime", counting)
    stamps = SecondStamps()
    said = [stamps(when) for when in (10.1, 10.9, 11.0, 11.5, 9.99)]
    assert said == [formatTime(when) for when in (10, 10, 11, 11, 9)]
    assert formatted == [10, 11, 9]
    assert stamps(None) == "-"


@pytest.mark.parametrize(
    ("arguments", "refusal"),
    [
        (["--nodaemon", "--syslog"], "cannot go to syslog"),
        (["--logfile=-"], "a daemon cannot log to stdout"),
    ],
)
def test_json_is_refused_where_it_cannot_replace_twistds_log(
    arguments: list[str], refusal: str
) -> None:
    with pytest.raises(UsageError, match=refusal):
        twistd(*arguments, "blobserve", "--log-format", "json")


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(UsageError, match="must be one of text, json"):
        Options().parseOptions(["--log-format", "xml"])
