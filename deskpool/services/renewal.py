"""Holding a claim in the database (a host slot, a lease on a desktop or pool) while work runs.

A claim is written with a short expiry and renewed from a helper thread while its holder
works. A holder that dies stops renewing, so what it claimed is free again within one hold
time, however long its work would have taken: a restarted or surviving broker takes over
in seconds, not after the longest step's worst case.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def renewed_while_running(renew: Callable[[], bool], every_s: float, what: str
                          ) -> Iterator[None]:
    """Call ``renew`` every ``every_s`` seconds from a helper thread while the block runs.

    ``renew`` returns False when the claim was lost (it expired and another holder took it):
    that is logged and renewing stops, but the block is not interrupted (its own
    compare-and-swap writes keep it from undoing the other holder's work). A ``renew`` that
    raises (a database hiccup) is logged and tried again at the next tick.
    """
    done = threading.Event()

    def keep_renewing() -> None:
        while not done.wait(every_s):
            try:
                kept = renew()
            except Exception:
                log.warning("could not renew %s", what, exc_info=True)
                continue
            if not kept:
                log.warning("lost %s to another broker while working", what)
                return

    renewer = threading.Thread(target=keep_renewing, name=f"renew {what}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
