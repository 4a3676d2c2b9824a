"""Archive copies written behind the delivery path, retried until stored.

The archive is history, not the delivery path (that is the offline queue and stream
management), so copies are queued and written in batches, many per commit. A storage error
used to drop the batch ("could not archive 64 messages"); now a batch is retried with
exponential backoff until it is stored, and the inserts are idempotent (a batch whose commit
succeeded but whose answer was lost is not stored twice: ``Archive.append_batch`` skips ids
already there). Memory is bounded by ``max_backlog`` copies: past it :attr:`full` is true and
the module refuses new messages with a ``wait`` error instead of queueing them (see
docs/storage-faults.md). A batch that fails for a reason retrying cannot cure (a constraint or
a value the database refuses) is split, so one poison copy never holds up the others; only
that copy is dropped, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

from xmpp_server.storage.archive import ArchiveEntry

log = logging.getLogger("natterd.mam")

Copy = tuple[str, ArchiveEntry]  # (owner bare JID, entry)
Write = Callable[[Sequence[Copy]], Awaitable[None]]

BATCH = 1000  # copies per transaction
RETRY_FIRST = 0.05  # seconds before the first retry; doubled up to RETRY_MAX
RETRY_MAX = 5.0


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the same write can never succeed: the database refused the values
    themselves (not the connection, the lock, the disk or the server being down)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return False
    return isinstance(exc, IntegrityError | DataError | ProgrammingError)


@dataclass
class WriterStats:
    """What the writer did, for logs, benchmarks and tests."""

    stored: int = 0  # copies written
    batches: int = 0  # transactions committed
    failures: int = 0  # failed write attempts (each was retried or split)
    rejected: int = 0  # copies dropped because the database refused them as values
    outages: int = 0  # runs of failures ended by a success
    longest_outage: float = 0.0  # seconds from the first failure to the write that stored it
    peak_backlog: int = 0


class ArchiveWriter:
    """A FIFO of archive copies and one task writing it; see the module docstring."""

    def __init__(
        self,
        write: Write,
        *,
        max_backlog: int,
        batch: int = BATCH,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self._write = write
        self.max_backlog = max_backlog
        self._batch = batch
        self._retry_first = retry_first
        self._retry_max = retry_max
        self._queue: deque[Copy] = deque()
        self._in_flight = 0
        self._added = 0  # sequence of the last copy added
        self._done = 0  # copies stored or rejected, in order
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self.stats = WriterStats()

    @property
    def backlog(self) -> int:
        """Copies not yet stored: queued plus the batch being written."""
        return len(self._queue) + self._in_flight

    @property
    def full(self) -> bool:
        return self.backlog >= self.max_backlog

    @property
    def failing(self) -> bool:
        """The last write attempt failed and no write has succeeded since."""
        return self._failing_since is not None

    def add(self, owner: str, entry: ArchiveEntry) -> None:
        """Queue a copy. Never refuses: callers check :attr:`full` before admitting a
        message, so the two copies of an admitted message are both kept."""
        self._queue.append((owner, entry))
        self._added += 1
        if self.backlog > self.stats.peak_backlog:
            self.stats.peak_backlog = self.backlog
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="mam-writer")

    async def flushed(self, timeout: float | None = None) -> bool:
        """Wait until every copy added so far is stored; False if ``timeout`` passed first."""
        target = self._added
        try:
            async with asyncio.timeout(timeout):
                while self._done < target:
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float) -> int:
        """Flush for up to ``timeout`` seconds, then stop; returns how many copies were not
        stored (logged as an error: they are lost with the process)."""
        await self.flushed(timeout)
        lost = self.backlog
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if lost:
            log.error("stopping with %d archive copies not stored (storage unavailable)", lost)
        return lost

    async def _run(self) -> None:
        while self._queue:
            count = min(len(self._queue), self._batch)
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight = count
            try:
                await self._store(batch)
            except asyncio.CancelledError:
                self._queue.extendleft(reversed(batch))  # still counted as not stored
                raise
            finally:
                self._in_flight = 0
            self._done += count
            self._progress.set()
            self._progress = asyncio.Event()

    async def _store(self, batch: list[Copy]) -> None:
        """Write ``batch``, retrying until it is stored; splits it on a permanent error."""
        delay = self._retry_first
        while True:
            try:
                await self._write(batch)
            except Exception as exc:
                self.stats.failures += 1
                if is_permanent(exc):
                    await self._split(batch, exc)
                    return
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.error(
                        "could not archive %d messages (%s: %s); retrying until stored",
                        len(batch),
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                    )
                # Jitter, so many servers on one database do not retry in step.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max)
                continue
            self.stats.batches += 1
            self.stats.stored += len(batch)
            if self._failing_since is not None:
                outage = time.monotonic() - self._failing_since
                self._failing_since = None
                self.stats.outages += 1
                self.stats.longest_outage = max(self.stats.longest_outage, outage)
                log.warning(
                    "archive writes work again after %.1f s; %d copies still queued",
                    outage,
                    len(self._queue),
                )
            return

    async def _split(self, batch: list[Copy], exc: Exception) -> None:
        if len(batch) == 1:
            owner, entry = batch[0]
            self.stats.rejected += 1
            log.error(
                "the database refused archive copy %s of %s, dropped: %s",
                entry.stanza_id,
                owner,
                exc,
            )
            return
        for copy in batch:
            await self._store([copy])
