"""Storing generations off the sampling loop: one background thread runs store calls in order.

A worker hands each finished generation's store (a closure over `client.put`) to `BackgroundStores`
and goes on sampling; a full backlog drops the newest store with a warning rather than blocking the
loop, and a store that raises is logged and never stops the later ones: the cache is an accelerator,
never a dependency. Used by the diffusers adapter (flexcache.client.diffusers) and the reference
model's worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("flexcache.client")


class BackgroundStores:
    def __init__(self, backlog: int, name: str = "flexcache-store") -> None:
        self.backlog = backlog
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=backlog)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.dropped = 0  # stores refused because the backlog was full

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                task()
            except Exception:  # a failed store never stops later ones, nor reaches the sampling loop
                log.exception("flexcache: storing a generation failed")
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def submit(self, task: Callable[[], None]) -> bool:
        """Queue a store; False (and a warning) if the backlog is full and it was dropped."""
        try:
            self._queue.put_nowait(task)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("flexcache: store backlog full: generation not cached (%d dropped so far)", self.dropped)
            return False

    def flush(self) -> None:
        """Wait until every store queued so far has run (or failed)."""
        self._queue.join()

    def close(self) -> None:
        """Finish the stores already queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
