"""A host's limits on heavy work at once (desktops being made, image transfers), held across
every broker on the database: a slot is a row (``store/slots.py``), taken by compare-and-swap,
renewed while the work runs, and given back after. A broker that dies stops renewing, so its
slots free themselves within ``hold_for``."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from deskpool.domain.errors import Unavailable
from deskpool.services.context import ServiceContext
from deskpool.services.renewal import renewed_while_running

log = logging.getLogger(__name__)
HOLD_FOR = timedelta(seconds=60)  # a dead broker's slot is free again within this
POLL_S = 0.5  # the longest wait between two tries for a busy host's slot


class HostBusy(Unavailable):
    """Every slot of the kind asked for is taken and the caller would rather not wait (an API
    request answers 503 with ``Retry-After``: the client waits and asks again)."""


class SlotKind(StrEnum):
    PROVISIONING = "provisioning"
    TRANSFER = "transfer"


def process_holder() -> str:
    """Who holds a slot: this process (pid read each time: a forked child is someone else)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


@contextmanager
def host_slot(
    ctx: ServiceContext, host_id: uuid.UUID, kind: SlotKind, limit: int, *,
    holder: str | None = None, hold_for: timedelta = HOLD_FOR,
    clock: Callable[[], datetime] | None = None, wait_up_to: float | None = None,
    busy_message: str = "", retry_after: float = 5.0,
) -> Iterator[int]:
    """Wait for one of the host's ``limit`` slots of ``kind``, hold it while the block runs.

    Yields the slot's number. Waiting polls the database with a growing, jittered delay (up to
    ``POLL_S``); holding renews the slot every third of ``hold_for`` (``renewed_while_running``).
    With ``wait_up_to`` (seconds), ``HostBusy(busy_message, delay=retry_after)`` when no slot
    came free by then: a request thread should not block on a long transfer elsewhere.
    """
    now_of = clock or (lambda: datetime.now(UTC))
    who = holder or process_holder()
    delay = 0.02
    give_up = None if wait_up_to is None else time.monotonic() + wait_up_to
    while True:
        now = now_of()
        with ctx.uow() as uow:
            slot = uow.host_slots.take(host_id, kind.value, max(limit, 1), who,
                                  now + hold_for, now)
            uow.commit()
        if slot is not None:
            break
        if give_up is not None and time.monotonic() >= give_up:
            raise HostBusy(busy_message or f"every {kind.value} slot of the host is taken; "
                           f"try again in {retry_after:.0f} s", delay=retry_after)
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, POLL_S)
    taken: int = slot

    def renew() -> bool:
        with ctx.uow() as uow:
            kept = uow.host_slots.renew(host_id, kind.value, taken, who,
                                   now_of() + hold_for)
            uow.commit()
        return kept

    try:
        with renewed_while_running(renew, hold_for.total_seconds() / 3,
                                   f"{kind.value} slot {slot} of host {host_id}"):
            yield slot
    finally:
        try:
            with ctx.uow() as uow:
                uow.host_slots.release(host_id, kind.value, slot, who)
                uow.commit()
        except Exception:  # the work is done (or failed on its own): a lost give-back only delays
            log.warning("could not give back %s slot %s of host %s; it frees itself within %s",
                        kind.value, slot, host_id, hold_for, exc_info=True)

