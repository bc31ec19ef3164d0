"""
What a prefetch shows: progress bars per blob and overall on a terminal,
one line per blob otherwise, and a summary at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from attrs import define, field
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from zope.interface import implementer

from blobserve.prefetch.fetching import (
    Blob,
    BlobResult,
    IPrefetchEvents,
    Summary,
)
from blobserve.prefetch.references import ImageReference


def blob_line(result: BlobResult) -> str:
    """
    One line on how fetching a blob ended.
    """
    blob = result.blob
    what = f"{blob.image.repository}@{blob.digest.short()}"
    if result.failure is not None:
        return f"failed  {what}: {result.failure}"
    return f"{result.cache or 'done':<7} {what} {blob.size} bytes"


def summary_line(summary: Summary) -> str:
    """
    The last line of a prefetch.
    """
    rate = summary.received / summary.seconds if summary.seconds > 0 else 0.0
    images = f"{summary.images} image{'s' if summary.images != 1 else ''}"
    if summary.images_failed:
        images += f" ({summary.images_failed} failed)"
    return (
        f"{images}: {summary.complete} blobs complete"
        f" ({summary.cached} already cached, {summary.fetched} fetched),"
        f" {summary.failed} failed; {decimal(summary.received)}"
        f" in {summary.seconds:.1f} s ({decimal(int(rate))}/s)"
    )


@implementer(IPrefetchEvents)
@define
class PlainDisplay:
    """
    One line per blob as it ends (unless C{quiet}) on C{out}, failures on
    C{errors}, and the summary on C{out}.
    """

    out: TextIO
    errors: TextIO
    quiet: bool = False

    def image_failed(self, image: ImageReference, reason: str) -> None:
        print(f"error: {reason}", file=self.errors, flush=True)

    def blobs_found(self, blobs: Sequence[Blob]) -> None:
        if not self.quiet:
            size = decimal(sum(blob.size for blob in blobs))
            print(f"{len(blobs)} blobs to fetch, {size}", file=self.out, flush=True)

    def blob_started(self, blob: Blob) -> None:
        pass

    def blob_progress(self, blob: Blob, received: int) -> None:
        pass

    def blob_ended(self, result: BlobResult) -> None:
        if result.failure is not None:
            print(blob_line(result), file=self.errors, flush=True)
        elif not self.quiet:
            print(blob_line(result), file=self.out, flush=True)

    def finished(self, summary: Summary) -> None:
        print(summary_line(summary), file=self.out, flush=True)


@implementer(IPrefetchEvents)
@define
class TerminalDisplay:
    """
    Progress bars on a terminal, C{console}: one for all blobs and one for
    each blob in flight (bytes, rate, time left), and a line for each blob
    that ends, above them.
    """

    console: Console
    _progress: Progress = field(init=False)
    _overall: TaskID | None = None
    _tasks: dict[Blob, TaskID] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )

    def image_failed(self, image: ImageReference, reason: str) -> None:
        self.console.print(f"error: {reason}", markup=False, highlight=False)

    def blobs_found(self, blobs: Sequence[Blob]) -> None:
        self._overall = self._progress.add_task(
            f"{len(blobs)} blobs", total=sum(blob.size for blob in blobs)
        )
        self._progress.start()

    def blob_started(self, blob: Blob) -> None:
        self._tasks[blob] = self._progress.add_task(
            f"  {blob.digest.short()}", total=blob.size
        )

    def blob_progress(self, blob: Blob, received: int) -> None:
        self._progress.advance(self._tasks[blob], received)
        if self._overall is not None:
            self._progress.advance(self._overall, received)

    def blob_ended(self, result: BlobResult) -> None:
        task = self._tasks.pop(result.blob, None)
        if task is not None:
            self._progress.remove_task(task)
        self._progress.console.print(blob_line(result), markup=False, highlight=False)

    def finished(self, summary: Summary) -> None:
        self._progress.stop()
        self.console.print(summary_line(summary), markup=False, highlight=False)
