"""What each reconciler pass recovers besides desktops: work a dead process left half done
outside the desktops' own rows. Each part is told apart in the pass's errors."""

from __future__ import annotations

import logging

from deskpool.domain.errors import DeskpoolError
from deskpool.reconciler.report import PassReport
from deskpool.reconciler.steps import StepRunner
from deskpool.services.context import ServiceContext
from deskpool.services.offline_transfers import release_stale_slots

log = logging.getLogger(__name__)


def recover_leftovers(ctx: ServiceContext, steps: StepRunner, report: PassReport) -> None:
    """Roaming profiles' open session layers that no session or coming logoff will end are
    set aside (``ProfileDesktops.recover``; an event each); copies of profile layers between
    hosts whose process died are removed (``ProfileCopies.recover``); transfer slots of
    offline check-outs no longer transferring are given back (``release_stale_slots``)."""
    try:
        for layer in steps.profiles.recover():
            log.warning("profile layer %s of %s (desktop %s) set aside by recovery",
                        layer.id, layer.user, layer.desktop)
        for copy in steps.profiles.copies.recover():
            log.warning("a cut copy of profile layer %s to host %s removed",
                        copy.layer_id, copy.host_id)
    except DeskpoolError as exc:
        report.error(f"profile recovery: {exc}")
    try:
        release_stale_slots(ctx)
    except DeskpoolError as exc:
        report.error(f"offline transfer slots: {exc}")
