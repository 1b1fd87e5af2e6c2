"""Logon timings and refusal events, written in batches.

A logon's state change (the claim) commits in its own transaction at once; its timing row
and the events that only report (a refusal) can wait a few milliseconds and share one
transaction with other logons' rows, so a logon storm does one write per logon, not two.
A crash may lose the last batch of *records*; it never loses a reservation.
"""

from __future__ import annotations

import logging
import threading

from deskpool.services.context import ServiceContext
from deskpool.store.models import Base

log = logging.getLogger(__name__)


class RecordWriter:
    """``interval_s=None`` writes every record at once (tests, the CLI); a number batches
    them: the first record starts a timer, and the timer writes what arrived meanwhile."""

    def __init__(self, ctx: ServiceContext, *, interval_s: float | None = None) -> None:
        self.ctx = ctx
        self.interval_s = interval_s
        self._pending: list[Base] = []
        self._lock = threading.Lock()
        # Held from taking the pending rows to their commit: a flush that finds nothing
        # pending still waits for a write in progress (an admin page reading right after a
        # refusal must see it).
        self._writing = threading.Lock()
        self._timer: threading.Timer | None = None

    def add(self, *rows: Base) -> None:
        with self._lock:
            self._pending.extend(rows)
            if self.interval_s is not None and self._timer is None:
                self._timer = threading.Timer(self.interval_s, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if self.interval_s is None:
            self.flush()

    def flush(self) -> None:
        """Write everything pending now (admin pages call this before they read)."""
        with self._writing:
            self._write_pending()

    def _write_pending(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
            self._timer = None
        if not rows:
            return
        # Multi-row INSERTs (``uow.record_batches``): the writer shares the interpreter with
        # the requests it serves.
        try:
            with self.ctx.uow() as uow:
                uow.record_batches.insert(rows)
                uow.commit()
        except Exception:  # records only: never let them break a logon
            log.exception("could not write %d logon records", len(rows))
