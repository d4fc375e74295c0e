"""A work queue of run keys, as Kubernetes controllers use them (docs/operator.md, "Reconcile").

- a key waits in the queue at most once, however often it is added (a burst of child events is one
  reconcile); `add(key, first=True)` puts it at the front (a new or changed run before wake-ups);
- a key being processed is not handed out again until `done`; added meanwhile, it is handed out after;
- `add_after(key, seconds)` adds it later (the earliest wins): deadlines, retries;
- `backoff(key)` grows per key (1 s, 2 s, 4 s ... up to `max_backoff`) until `forget(key)`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable


class WorkQueue:
    def __init__(self, base_backoff: float = 1.0, max_backoff: float = 300.0):
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()  # added while processing
        self._later: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._seq = itertools.count()
        self._failures: dict[Hashable, int] = {}
        self._closed = False
        self.base_backoff, self.max_backoff = base_backoff, max_backoff

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, key: Hashable, first: bool = False) -> None:
        """Queue `key`; `first` puts it before every other waiting key (moving it if it waits already)."""
        with self._cond:
            self._add(key, first)

    def _add(self, key: Hashable, first: bool = False) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._queue.appendleft if first else self._queue.append)(key)
            self._cond.notify()
        elif first:
            self._queue.remove(key)
            self._queue.appendleft(key)

    def add_after(self, key: Hashable, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        with self._cond:
            due = time.monotonic() + seconds
            if self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._later, (due, next(self._seq), key))
            self._cond.notify()

    def backoff(self, key: Hashable) -> float:
        """The delay before retrying `key` after a failure (doubles with each failure)."""
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        return min(self.base_backoff * 2**n, self.max_backoff)

    def forget(self, key: Hashable) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def _promote(self) -> float | None:
        """Move due keys into the queue; seconds until the next one (None: none waiting)."""
        now = time.monotonic()
        while self._later:
            due, _, key = self._later[0]
            if self._due.get(key) != due:  # superseded by an earlier add_after
                heapq.heappop(self._later)
                continue
            if due > now:
                return due - now
            heapq.heappop(self._later)
            del self._due[key]
            self._add(key)
        return None

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key (now marked processing), or None after `timeout` seconds or once shut down."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                wait = self._promote()
                if self._closed:
                    return None
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def shut_down(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
