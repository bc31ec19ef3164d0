"""
The site's root: the operator's pages under C{/_blobserve/}, the metrics at
C{/metrics}, and the registry API at every other path.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

#: The prefix of the operator's pages (status, health).
OPERATOR_PREFIX = b"_blobserve"

#: The paths served without client authentication (--htpasswd): health
#: checks and scrapers carry no credentials. The status page is not among
#: them: it names repositories.
OPEN_PATHS = frozenset({b"/" + OPERATOR_PREFIX + b"/health", b"/metrics"})


class _Routes(Resource):
    """
    Fixed children; every other path goes to C{otherwise}.
    """

    def __init__(self, children: Mapping[bytes, IResource], otherwise: IResource):
        super().__init__()
        for name, child in children.items():
            self.putChild(name, child)
        self._otherwise = otherwise

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self._otherwise

    def render(self, request: Request) -> bytes | int:
        # The folder itself (/_blobserve, with no page named) is no page of
        # its own either: C{otherwise} answers it as it answers every path
        # it does not know.
        return self._otherwise.render(request)  # type: ignore[no-any-return]


def site_root(
    registry: IResource,
    operator: Mapping[bytes, IResource],
    metrics: IResource | None = None,
) -> IResource:
    """
    The resource a site serves: C{/_blobserve/<name>} from C{operator} by
    name, C{/metrics} from C{metrics} if given, and everything else,
    unknown operator pages included, from C{registry} (a leaf that routes by
    the whole path, and answers what it does not know with an OCI 404).
    """
    children: dict[bytes, IResource] = {OPERATOR_PREFIX: _Routes(operator, registry)}
    if metrics is not None:
        children[b"metrics"] = metrics
    return _Routes(children, registry)
