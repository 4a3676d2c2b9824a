"""Shared helpers for sans-IO tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def feed_bytewise(feed: Callable[[bytes], list[T]], data: bytes) -> list[T]:
    """Feed ``data`` one byte at a time (h11's ``tr()`` discipline) and collect the events."""
    events: list[T] = []
    for i in range(len(data)):
        events.extend(feed(data[i : i + 1]))
    return events
