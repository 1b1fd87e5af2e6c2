"""Roaming-profile maintenance on the reconciler's schedule.

Every ``profile_maintenance_interval_s`` (0: never) a pass starts one run of
``ProfileMaintenance.run`` (flatten a few long chains, sweep and verify the profiles verified
longest ago; see ``services.profile_maintenance``) on a thread of its own, so a run that
reads gigabytes holds up no desktop step. A pass waits for it as long as it waits for its
steps; a run still going then finishes in the background and the next one starts only after
it ended. Several brokers may run at once: each profile's maintenance lease gives it to one.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta

from deskpool.reconciler.report import PassReport
from deskpool.services.context import ServiceContext
from deskpool.services.profile_maintenance import MaintenanceReport, ProfileMaintenance

log = logging.getLogger(__name__)


class ProfileUpkeep:
    def __init__(self, ctx: ServiceContext, *, owner: str, lease: timedelta,
                 clock: Callable[[], datetime]) -> None:
        settings = ctx.settings
        self.interval_s = settings.profile_maintenance_interval_s
        self.flatten_limit = settings.profile_flatten_per_run
        self.verify_limit = settings.profile_verify_per_run
        self.maintenance = ProfileMaintenance(ctx, settings.resolved_profile_dir, owner=owner,
                                              lease=lease, clock=clock)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-upkeep")
        self._running: Future[MaintenanceReport] | None = None
        self._last_start: float | None = None
        self._lock = threading.Lock()
        weakref.finalize(self, self._executor.shutdown, wait=False)

    def due(self) -> bool:
        if self.interval_s <= 0 or (self.flatten_limit == 0 and self.verify_limit == 0):
            return False
        return (self._last_start is None
                or time.monotonic() - self._last_start >= self.interval_s)

    def tick(self, report: PassReport, wait_s: float | None) -> None:
        """Start a run if one is due and none is running; wait up to ``wait_s`` (None: until
        it ends) and put what it found in ``report``."""
        with self._lock:
            if self._running is not None and self._running.done():
                self._running = None  # reported by the pass that waited, else logged
            if self._running is None and self.due():
                self._last_start = time.monotonic()
                self._running = self._executor.submit(
                    self.maintenance.run, flatten_limit=self.flatten_limit,
                    verify_limit=self.verify_limit)
                self._running.add_done_callback(self._ended)
            running = self._running
        if running is None:
            return
        done, _ = wait([running], timeout=wait_s)
        if done:
            self._into(running, report)

    @staticmethod
    def _ended(future: Future[MaintenanceReport]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("profile maintenance stopped: %s", exc)
        else:
            for problem in future.result().problems:
                log.warning("profile maintenance: %s", problem)

    @staticmethod
    def _into(future: Future[MaintenanceReport], report: PassReport) -> None:
        if future.cancelled() or future.exception() is not None:
            report.error(f"profile maintenance: {future.exception()}")
            return
        found = future.result()
        report.notes += [f"profile of {user} flattened" for user in found.flattened]
        report.notes += [f"profile of {user} not flattened: {why.value}"
                         for user, why in found.skipped]
        # What it found wrong is the admin's (an error event each), not the pass's failure.
        report.notes += [f"profile maintenance: {problem}" for problem in found.problems]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
