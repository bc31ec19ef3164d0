"""
The C{blobserve-prefetch} command: its options, and the run on the reactor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool

from blobserve.prefetch.display import PlainDisplay, TerminalDisplay
from blobserve.prefetch.fetching import IPrefetchEvents, Prefetcher, Unreachable
from blobserve.prefetch.manifests import BadPlatform, Platform
from blobserve.prefetch.references import (
    BadReference,
    ImageReference,
    parse_reference,
)

#: Exit statuses (also in --help).
OK, FAILED, USAGE = 0, 1, 2

_EPILOG = """\
An image is [registry/]repository[:tag|@digest], as docker writes it:
alpine is docker.io's library/alpine:latest. A registry named in it is sent
to blobserve as ?ns=REGISTRY; an image naming none is fetched from
blobserve's default upstream.

Exit status: 0 when every image resolved and every blob arrived complete;
1 when any did not, or blobserve could not be reached; 2 for usage errors
(an unreadable image list, a malformed image or platform).
"""


def _positive(value: str) -> int:
    number = int(value) if value.isdigit() and len(value) < 5 else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {value[:20]!r}")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value[:30])
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e6:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value[:20]!r}")
    return seconds


def parser() -> argparse.ArgumentParser:
    """
    The command line of C{blobserve-prefetch}.
    """
    p = argparse.ArgumentParser(
        prog="blobserve-prefetch",
        description="Pull images through a running blobserve, so that it holds"
        " every blob they need before clients ask.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="an image to fetch")
    p.add_argument(
        "--server",
        default="http://127.0.0.1:5000",
        help="the blobserve to warm (default: %(default)s)",
    )
    p.add_argument(
        "--from-file",
        type=Path,
        metavar="FILE",
        help="read images from FILE, one a line; blank lines and lines"
        " starting with # are skipped",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="of an index (multi-platform image), fetch only this platform's"
        " manifest; repeat for several (default: every platform). An image"
        " that is not an index is fetched whatever its platform",
    )
    p.add_argument(
        "--parallel",
        type=_positive,
        default=4,
        metavar="N",
        help="requests at once (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for an answer, or for more of a body, before"
        " failing it (default: %(default)g)",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the summary and errors",
    )
    return p


def images_of(names: Sequence[str], listing: Path | None) -> list[ImageReference]:
    """
    The images named on the command line, then those of the file C{listing}.

    @raise BadReference: naming the file and line of a malformed image.
    @raise OSError: if C{listing} cannot be read.
    """
    images = [parse_reference(name) for name in names]
    if listing is not None:
        lines = listing.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                images.append(parse_reference(text))
            except BadReference as error:
                raise BadReference(f"{listing}:{number}: {error}") from None
    return images


async def prefetch(
    reactor: Any, options: argparse.Namespace, images: Sequence[ImageReference]
) -> int:
    """
    Prefetch C{images} as C{options} say; the exit status.
    """
    events: IPrefetchEvents
    if sys.stdout.isatty() and not options.quiet:
        events = TerminalDisplay(Console(file=sys.stdout))
    else:
        events = PlainDisplay(sys.stdout, sys.stderr, options.quiet)
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = options.parallel
    try:
        summary = await Prefetcher(
            options.server.rstrip("/"),
            HTTPClient(Agent(reactor, pool=pool)),
            reactor,
            events,
            [Platform.parse(p) for p in options.platform],
            options.parallel,
            options.timeout,
        ).run(images)
    except Unreachable as error:
        print(f"blobserve-prefetch: {error}", file=sys.stderr)
        return FAILED
    finally:
        await pool.closeCachedConnections()
    return OK if summary.ok else FAILED


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run C{blobserve-prefetch}; exit with its status.
    """
    p = parser()
    options = p.parse_args(argv)
    try:
        images = images_of(options.images, options.from_file)
        for platform in options.platform:
            Platform.parse(platform)
    except (BadReference, BadPlatform) as error:
        p.error(str(error))
    except OSError as error:
        p.error(f"cannot read {options.from_file}: {error.strerror}")
    if not images:
        p.error("no images: name some, or give --from-file")

    def run(reactor: Any) -> Deferred[None]:
        def leave(status: int) -> None:
            raise SystemExit(status)

        return Deferred.fromCoroutine(prefetch(reactor, options, images)).addCallback(
            leave
        )

    react(run)
