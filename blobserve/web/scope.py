"""
L{RepositoryScope}: a blob or manifest stored because one repository asked
for it is answered under another only once the upstream has said that the
other holds it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from blobserve.digest import Digest
from blobserve.oneshot import OneShotEvent
from blobserve.store.files import IBlobStore

#: Asks the upstream whether one repository holds one digest (its C{HEAD}):
#: fires if it does, fails with the upstream's answer if not.
Ask = Callable[[], "Deferred[Any]"]


class RepositoryScope:
    """
    Confirms with the upstream, once per registry, repository and digest,
    that a repository holds what the store holds for another.

    What the upstream confirms is remembered in the store (see
    L{IBlobStore.saw}) for as long as the store holds the digest, so that it
    is asked once, ever; however many requests want the same confirmation
    at once, it is asked once. What it denies or fails to answer is not
    remembered: the next request asks again.
    """

    def __init__(self, store: IBlobStore) -> None:
        self._store = store
        self._asking: dict[tuple[str, str, Digest], OneShotEvent[None]] = {}

    def holds(self, registry: str, name: str, digest: Digest) -> bool:
        """
        Whether repository C{name} of C{registry} is known to hold
        C{digest}; answered from memory.
        """
        return self._store.holds(registry, name, digest)

    def confirm(
        self, registry: str, name: str, digest: Digest, ask: Ask
    ) -> Deferred[None]:
        """
        Make sure that repository C{name} of C{registry} holds C{digest}:
        at once if that is known, else by C{ask}, unless a confirmation of
        the same is under way already.

        @return: fires once it is confirmed; fails with what C{ask} failed
            with (the upstream does not hold it there, refuses, or cannot be
            reached). Cancelling it only stops waiting: the question goes on
            and its answer is remembered for the next request.
        """
        if self.holds(registry, name, digest):
            return succeed(None)
        key = (registry, name, digest)
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = OneShotEvent()

            def answered(result: object) -> None:
                del self._asking[key]
                if isinstance(result, Failure):
                    asking.fail_with(result)
                else:
                    self._store.saw(registry, name, digest)
                    asking.succeed_with(None)

            ask().addBoth(answered)
        return asking.observe()
