"""Console tickets: single-use, short-lived, bound to one user and one desktop.

The browser gets a ticket from the API and hands it to the console proxy (websockify), which
``consume``s it: one conditional UPDATE marks it used, so a second use, a ticket past its
expiry or a ticket for a desktop its user no longer holds opens nothing. The VNC port itself
listens on the host's loopback only; the proxy is the way in.

Native clients get a ``.vv`` file (virt-viewer / remote-viewer) for desktops whose console
the viewer can reach. (``.rdp`` files wait for an image that runs an RDP server.)
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskpool.broker.accounts import token_digest
from deskpool.domain.errors import AuthenticationFailed, Forbidden
from deskpool.domain.states import HELD_STATES
from deskpool.domain.users import Identity
from deskpool.services.context import ServiceContext
from deskpool.store.models import utcnow

TICKET_TTL = timedelta(seconds=60)


@dataclass(frozen=True)
class Ticket:
    token: str
    desktop_id: uuid.UUID
    desktop: str
    expires_at: datetime


@dataclass(frozen=True)
class ConsoleTarget:
    desktop_id: uuid.UUID
    desktop: str
    user: str
    protocol: str
    host: str
    port: int


class ConsoleTickets:
    def __init__(self, ctx: ServiceContext, *, ttl: timedelta = TICKET_TTL) -> None:
        self.ctx = ctx
        self.ttl = ttl

    def issue(self, identity: Identity, desktop_id: uuid.UUID) -> Ticket:
        """A ticket for the user's own held desktop; ``Forbidden`` for anything else (the
        same message whether the desktop exists or not, so ids cannot be probed)."""
        secret = secrets.token_urlsafe(32)
        with self.ctx.uow() as uow:
            desktop = uow.desktops.find(desktop_id)
            if (desktop is None or desktop.assigned_user != identity.name
                    or desktop.state not in HELD_STATES):
                raise Forbidden("you hold no such desktop; connect to a pool first")
            expires = utcnow() + self.ttl
            uow.console_tickets.add(token_hash=token_digest(secret), user=identity.name,
                                    desktop_id=desktop_id, expires_at=expires)
            uow.commit()
            return Ticket(token=secret, desktop_id=desktop_id, desktop=desktop.name,
                          expires_at=expires)

    def consume(self, secret: str) -> ConsoleTarget:
        """Use a ticket (once) and say where its desktop's console listens.

        ``AuthenticationFailed`` for an unknown, used or expired ticket, or one whose user no
        longer holds the desktop.
        """
        digest = token_digest(secret)
        now = utcnow()
        with self.ctx.uow() as uow:
            used = uow.console_tickets.use(digest, now)
            uow.commit()
        if used is None:
            raise AuthenticationFailed("console ticket unknown, already used or expired")
        desktop_id, user = used
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.find(desktop_id)
            if (desktop is None or desktop.assigned_user != user
                    or desktop.state not in HELD_STATES):
                raise AuthenticationFailed("the desktop of this console ticket is no longer "
                                           "yours")
            driver = self.ctx.driver_for(desktop.host)
            name = desktop.name
        address = driver.console_address(desktop_id)
        return ConsoleTarget(desktop_id=desktop_id, desktop=name, user=user,
                             protocol=address.protocol, host=address.host, port=address.port)


def virt_viewer_file(*, title: str, protocol: str, host: str, port: int, password: str | None,
                     proxy: str | None = None) -> str:
    """A ``.vv`` file for remote-viewer (format: virt-viewer's ``[virt-viewer]`` section)."""
    lines = ["[virt-viewer]", f"type={protocol}", f"host={host}", f"port={port}",
             f"title={title}", "delete-this-file=1", "fullscreen=0"]
    if password:
        lines.append(f"password={password}")
    if proxy:
        lines.append(f"proxy={proxy}")
    return "\n".join(lines) + "\n"
