"""
What the downloads in flight are doing, seen from outside the data path:
L{ProgressSampler} looks at them when asked and measures their rates from
samples it keeps; L{ProgressLines} logs a line for each long one at an
interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from attrs import asdict, frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from blobserve.digest import Digest
from blobserve.fetch.download import Download
from blobserve.fetch.inflight import IInFlightTable

log = Logger()


@frozen
class DownloadProgress:
    """
    One download in flight, as it stands.

    @ivar written: bytes on disk so far.
    @ivar expected: the blob's declared size, or L{None} if unknown.
    @ivar rate: bytes per second over the last few seconds, or L{None} before
        there are two samples to measure it from.
    @ivar clients: responses following the download, and clients waiting
        for its upstream's answer.
    @ivar age: seconds since the download started.
    @ivar state: what it does now (see L{Download.state}).
    @ivar segments: how many parallel range requests fetch it now (0 when
        it is fetched over one connection).
    """

    digest: str
    registry: str | None
    repository: str
    written: int
    expected: int | None
    rate: float | None
    clients: int
    age: float
    state: str
    segments: int = 0

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        """
        One line for a person: what, from where, how far, how fast, for whom.
        """
        origin = self.repository
        if self.registry is not None:
            origin = f"{self.registry}/{origin}"
        amount = size_text(self.written)
        if self.expected is not None:
            amount += f" of {size_text(self.expected)}"
            if self.expected > 0:
                amount += f" ({100 * self.written // self.expected} %)"
        if self.rate is not None:
            amount += f" at {size_text(self.rate)}/s"
        clients = "1 client" if self.clients == 1 else f"{self.clients} clients"
        return f"{self.state} {self.digest[:19]}… from {origin}: {amount}, {clients}"


def size_text(count: float) -> str:
    """
    A count of bytes as a person reads it: C{"512 B"}, C{"12.5 MiB"}.
    """
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            break
    return f"{count:.1f} {unit}"


class ProgressSampler:
    """
    Reports the downloads in flight when asked, with the rate of each
    measured between the moment of asking and a sample taken at least
    C{window} seconds before, if any, else the oldest sample.

    A sample (time, bytes written) is kept at most every tenth of the window
    and dropped once a newer one is old enough to measure from, so a
    download costs a few samples however often it is asked about; the
    samples of a download that has left the table go at the next asking.
    Nothing runs on the data path.
    """

    def __init__(
        self,
        downloads: IInFlightTable,
        clock: IReactorTime,
        following: Callable[[], Mapping[Digest, int]] = dict,
        window: float = 5.0,
    ) -> None:
        """
        @param following: how many responses follow each digest now.
        """
        self._downloads = downloads
        self._clock = clock
        self._following = following
        self._window = window
        self._samples: dict[Download, deque[tuple[float, int]]] = {}

    def survey(self) -> list[DownloadProgress]:
        """
        The downloads in flight now, the oldest first.
        """
        now = self._clock.seconds()
        following = self._following()
        samples: dict[Download, deque[tuple[float, int]]] = {}
        report = []
        for download in sorted(self._downloads, key=lambda d: d.started_at):
            progress = download.progress
            written = 0 if progress is None else progress.written
            kept = samples[download] = self._samples.get(download, deque())
            report.append(
                DownloadProgress(
                    digest=str(download.digest),
                    registry=download.registry,
                    repository=download.name,
                    written=written,
                    expected=None if progress is None else progress.expected_length,
                    rate=self._rate(kept, now, written),
                    clients=following.get(download.digest, 0)
                    + download.clients_waiting,
                    age=now - download.started_at,
                    state=download.state,
                    segments=download.segments,
                )
            )
        self._samples = samples
        return report

    def _rate(
        self, samples: deque[tuple[float, int]], now: float, written: int
    ) -> float | None:
        """
        The rate from the oldest useful sample to now; record a new sample.
        """
        while len(samples) > 1 and samples[1][0] <= now - self._window:
            samples.popleft()
        rate = None
        if samples and samples[0][0] < now:
            then, before = samples[0]
            rate = (written - before) / (now - then)
        if not samples or now - samples[-1][0] >= self._window / 10:
            samples.append((now, written))
        return rate


class ProgressLines(Service):
    """
    Logs, every C{interval} seconds, a line for each download that has run
    that long or longer (see L{DownloadProgress.describe}); none for a
    shorter one.
    """

    def __init__(
        self, progress: ProgressSampler, interval: float, clock: IReactorTime
    ) -> None:
        self._progress = progress
        self._interval = interval
        self._loop = LoopingCall(self.log_progress)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def log_progress(self) -> None:
        """
        Log a line for each download in flight for C{interval} or longer.
        """
        for download in self._progress.survey():
            if download.age < self._interval:
                continue
            log.info(
                "{line}",
                line=download.describe(),
                digest=download.digest,
                registry=download.registry,
                repository=download.repository,
                written=download.written,
                expected=download.expected,
                rate=download.rate,
                clients=download.clients,
                state=download.state,
            )
