"""Pool users for tests: desktops obtained and given back the way users do, through the
broker's ``connect`` (claim, power on, readiness check), the console proxy's ``connected``
event and the session service's ``log_off`` (the pool's logout policy)."""

from __future__ import annotations

import uuid

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker, Handover
from deskpool.broker.sessions import SessionService
from deskpool.domain.users import Identity
from deskpool.services.context import ServiceContext


def person(name: str) -> Identity:
    """A signed-in local user, as the API hands it to the broker (no user row is needed:
    the entitlement names the user)."""
    return Identity(name=name, display_name=name, source="local")


class PoolUsers:
    """Users of one pool, through one broker on ``ctx``."""

    def __init__(self, ctx: ServiceContext, pool: str, *, ready_timeout_s: float = 5.0
                 ) -> None:
        self.ctx, self.pool = ctx, pool
        self.broker = Broker(ctx, ready_timeout_s=ready_timeout_s)
        self.sessions = SessionService(ctx)

    def entitle(self, *users: str) -> None:
        for user in users:
            EntitlementService(self.ctx).grant(self.pool, "user", user)

    def try_connect(self, user: str) -> Handover:
        """The broker's answer as is: ``ready`` or ``pending`` (refusals raise)."""
        return self.broker.connect(person(user), self.pool)

    def connect(self, user: str) -> uuid.UUID:
        """Hand ``user`` a desktop (the broker's connect must answer ``ready``): its id."""
        handover = self.try_connect(user)
        assert handover.status == "ready" and handover.desktop_id is not None, handover
        return handover.desktop_id

    def open_console(self, desktop_id: uuid.UUID, user: str) -> None:
        """The user's console opens (what the console proxy reports): reserved -> in_use."""
        self.sessions.console_connected(desktop_id, user)

    def log_off(self, desktop_id: uuid.UUID, user: str) -> str:
        """``user`` logs off: the pool's logout policy applies. Returns the new state."""
        return self.sessions.log_off(desktop_id, by=person(user), reason="logged out")
