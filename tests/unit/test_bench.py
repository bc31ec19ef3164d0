"""
The benchmark's plan of steps for its flags, and how it judges a body: no
servers are started.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import load
from bench.__main__ import (
    plan,
    wrong_bodies,
)


def arguments(**overrides: Any) -> argparse.Namespace:
    """
    The flags of C{python -m bench} at their defaults, but for C{overrides}.
    """
    defaults: dict[str, Any] = {
        "smoke": False,
        "sizes": "256,1024",
        "clients": "1,8,32",
        "client_kinds": "recv",
        "crowd_clients": 256,
        "crowd_size": 64,
        "image_clients": "2,32",
        "systems": "blobserve,registry-proxy,nginx-cache",
        "scenarios": "image",
    }
    return argparse.Namespace(**{**defaults, **overrides})


def steps(**overrides: Any) -> list[tuple[str, dict[str, Any]]]:
    """
    The steps C{plan} yields for the flags: each one's method name and
    keyword arguments.
    """
    return [
        (step.func.__name__, step.keywords)  # type: ignore[attr-defined]
        for step in plan(arguments(**overrides))
    ]


def test_smoke_runs_drain_clients_in_the_crowd() -> None:
    crowd = steps(smoke=True, systems="blobserve", scenarios="crowd")
    assert [keywords["kind"] for _, keywords in crowd] == ["read1", "drain"]


def test_cold_and_crowd_run_every_kind_of_client_asked_for() -> None:
    planned = steps(
        client_kinds="recv,read1,drain",
        systems="blobserve",
        scenarios="cold,crowd",
        sizes="64",
        clients="8",
    )
    assert [(name, keywords.get("kind")) for name, keywords in planned] == [
        ("cold", None),  # the direct fetch, the floor
        ("cold", "recv"),
        ("cold", "read1"),
        ("cold", "drain"),
        ("crowd", "recv"),
        ("crowd", "read1"),
        ("crowd", "drain"),
    ]


def fetch(status: int = 200, size: int = 10, sha256: str = "ab") -> load.Fetch:
    return load.Fetch(status, size, 0.0, 1.0, sha256, 0.0)


def test_a_body_that_was_not_hashed_is_judged_by_its_status_and_size() -> None:
    drained = fetch(sha256="")
    short, refused = fetch(size=9, sha256=""), fetch(status=0, size=0, sha256="")
    assert wrong_bodies([drained, short, refused], 10, "ab") == [short, refused]


def test_a_hashed_body_must_match_the_digest() -> None:
    right, other = fetch(), fetch(sha256="cd")
    assert wrong_bodies([right, other], 10, "ab") == [other]


def test_drain_is_a_client_kind_that_does_not_hash() -> None:
    assert "drain" in load.CLIENTS
    assert "drain" not in load.HASHING
    assert set(load.CLIENTS) > load.HASHING


def test_clients_together_are_all_let_go_once_every_thread_has_started() -> None:
    seen: list[tuple[int, float, float]] = []

    def client(n: int, began: float) -> int:
        seen.append((n, began, time.monotonic()))
        return n * n

    assert load.together(64, client) == [n * n for n in range(64)]
    let_go = {began for _, began, _ in seen}
    assert len(let_go) == 1
    assert all(ran >= began > 0 for _, began, ran in seen)
