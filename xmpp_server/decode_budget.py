"""A bound on what media decoders in flight may hold: so many jobs, so many bytes.

Decoding is where a small upload turns into a lot of memory (a 343 KB PNG of 9400×9400
pixels is 350 MB once decoded), so every thumbnail job states its cost up front, from headers
alone, and waits here until both a job slot and that many bytes are free. A job that costs
more than the whole budget is refused outright (:class:`OverBudget`) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class OverBudget(Exception):
    """The job alone would need more than the whole budget."""


class DecodeBudget:
    """``await budget.run(cost, fn, *args)``: ``fn`` in a worker thread once it fits.

    The reservation lasts as long as the thread runs, even if the awaiting task is cancelled
    (a thread cannot be stopped), so the accounting always matches what decoders may hold.
    """

    def __init__(self, capacity: int, jobs: int) -> None:
        self.capacity = capacity
        self.jobs = jobs
        self.in_use = 0  # bytes reserved by running jobs
        self.running = 0
        self.peak = 0  # the most bytes ever reserved at once (for tests and stats)
        self.peak_running = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _fits(self, cost: int) -> bool:
        return self.running < self.jobs and self.in_use + cost <= self.capacity

    def _take(self, cost: int) -> None:
        self.running += 1
        self.in_use += cost
        self.peak = max(self.peak, self.in_use)
        self.peak_running = max(self.peak_running, self.running)

    def _release(self, cost: int) -> None:
        self.running -= 1
        self.in_use -= cost
        for waiter in self._waiters:  # each checks again whether it fits now
            if not waiter.done():
                waiter.set_result(None)

    async def run(self, cost: int, fn: Callable[..., T], *args: object) -> T:
        if cost > self.capacity:
            raise OverBudget(f"needs {cost} bytes, the budget is {self.capacity}")
        loop = asyncio.get_running_loop()
        while not self._fits(cost):
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self._take(cost)
        job = loop.run_in_executor(None, fn, *args)
        job.add_done_callback(lambda _: self._release(cost))
        return await asyncio.shield(job)
