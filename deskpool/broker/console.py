"""Console tickets: single-use, short-lived, bound to one user, one desktop and one display.

The browser gets a VNC ticket from the API and hands it to the console proxy (websockify),
which ``consume``s it: one conditional UPDATE marks it used, so a second use, a ticket past
its expiry or a ticket for a desktop its user no longer holds opens nothing.

Native clients get a ``.vv`` file for remote-viewer (``spice_file``) carrying two secrets,
both fresh for that file: a SPICE ticket, as the credentials of the broker's SPICE proxy
(``deskpool.api.spice_proxy``), and a password for the desktop's SPICE display, set on the VM
for the ticket's lifetime. The proxy admits a connection only with the ticket and ignores the
target the client names; the display admits only the password. SPICE opens several
connections per client (its channels): the first spends the ticket, the others follow within
``CHANNEL_WINDOW`` on it (``admit_spice``), or later only to follow a live move (below).

A live move takes the desktop to another host with its user's session; each native client
follows it by its own protocol, on the same ticket:

* SPICE's own client migration: QEMU tells the connected client where the display is on the
  target, and the client opens its channels there through the proxy while the move runs. The
  proxy admits that one other place, the desktop's display on the host the move takes it to
  (``Desktop.moving_to_id``), on a ticket used long ago only while one of the same ticket's
  channels is open through it (the client being moved); any other target a client names is
  ignored as before. The display's password is kept valid on the target for the move (the
  libvirt driver).
* RDP's auto-reconnect: the move ends the guest's forwarded port, the client reconnects with
  the same routing token, and a spent RDP ticket is admitted again once, within
  ``RDP_RECONNECT_WINDOW`` of its connection closing (the proxy keeps the time), with the
  ticket's one-time password set in the guest again: the client signs in with the password it
  holds, and xrdp gives it the user's running session. The broker keeps only the password's
  SHA-256, as the guest does.

RDP clients get a ``.rdp`` file (``rdp_file``) naming the broker's RDP proxy
(``deskpool.api.rdp_proxy``) with an RDP ticket as its load-balancing info, which the client
sends in its first packet, and the user's Linux account. The guest's xrdp signs them in with
a one-time password made for that file: the broker sets its SHA-256 in the guest through the
agent (``rdp-otp set``; valid ``RDP_PASSWORD_TTL``, once) and hands the password to the user
beside the file, never storing it. ``admit_rdp`` spends the ticket: one connection.

Both displays and the guest's forwarded RDP port listen on the host's loopback only; the
proxies are the way in.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskpool.broker.accounts import token_digest
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import (
    AuthenticationFailed,
    Conflict,
    DeskpoolError,
    Forbidden,
    Unavailable,
)
from deskpool.domain.models import ConsoleProtocol
from deskpool.domain.states import HELD_STATES
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.store.models import utcnow

TICKET_TTL = timedelta(seconds=60)
# How long after a SPICE ticket's first connection the client's other channels may follow.
CHANNEL_WINDOW = timedelta(seconds=30)
SPICE_PROXY_USER = "deskpool"  # the user name of the proxy credentials; the ticket is the rest
# The guest's one-time RDP password: the ticket's minute, then the time to sign in (TLS and
# xrdp's session start are slow under TCG).
RDP_PASSWORD_TTL = timedelta(seconds=180)
RDP_OTP = "/usr/lib/deskpool/rdp-otp"  # the desktop flavor's guest script (guest-desktop/)
# How long after an RDP connection closed its client may come back on the same ticket (a live
# move ends it; the client's auto-reconnect retries every few seconds).
RDP_RECONNECT_WINDOW = timedelta(seconds=120)
Address = tuple[str, int]  # (host, port)


@dataclass(frozen=True)
class Ticket:
    token: str
    desktop_id: uuid.UUID
    desktop: str
    expires_at: datetime
    host_id: uuid.UUID


@dataclass(frozen=True)
class ViewerFile:
    desktop: str
    text: str  # a ``.vv`` file's contents


@dataclass(frozen=True)
class RdpFile:
    desktop: str
    text: str  # a ``.rdp`` file's contents
    account: str  # the user's Linux account in the desktop
    password: str  # one-time, for that account's next RDP sign-in; the broker keeps no copy
    expires_at: datetime  # the ticket's expiry: open the file before then


@dataclass(frozen=True)
class ConsoleTarget:
    desktop_id: uuid.UUID
    desktop: str
    user: str
    protocol: str
    host: str
    port: int
    followed: bool = False  # the display on the host a live move is taking the desktop to
    host_id: uuid.UUID | None = None  # where the desktop ran when this target was found


class ConsoleTickets:
    def __init__(self, ctx: ServiceContext, *, ttl: timedelta = TICKET_TTL) -> None:
        self.ctx = ctx
        self.ttl = ttl

    def issue(self, identity: Identity, desktop_id: uuid.UUID,
              protocol: ConsoleProtocol = ConsoleProtocol.VNC, *,
              otp_digest: str | None = None) -> Ticket:
        """A ticket for the user's own held desktop's ``protocol`` display; ``Forbidden``
        for anything else (the same message whether the desktop exists or not, so ids cannot
        be probed)."""
        secret = secrets.token_urlsafe(32)
        with self.ctx.uow() as uow:
            desktop = uow.desktops.find(desktop_id)
            if (desktop is None or desktop.assigned_user != identity.name
                    or desktop.state not in HELD_STATES):
                raise Forbidden("you hold no such desktop; connect to a pool first")
            expires = utcnow() + self.ttl
            uow.console_tickets.add(token_hash=token_digest(secret), user=identity.name,
                                    desktop_id=desktop_id, expires_at=expires,
                                    protocol=protocol, otp_digest=otp_digest)
            uow.commit()
            return Ticket(token=secret, desktop_id=desktop_id, desktop=desktop.name,
                          expires_at=expires, host_id=desktop.host_id)

    def spice_file(self, identity: Identity, desktop_id: uuid.UUID, *, proxy_host: str,
                   proxy_port: int) -> ViewerFile:
        """A ``.vv`` file that opens the user's held desktop in remote-viewer through the
        SPICE proxy at ``proxy_host:proxy_port``, valid for the ticket's lifetime."""
        ticket = self.issue(identity, desktop_id, ConsoleProtocol.SPICE)
        password = secrets.token_urlsafe(18)
        self.ctx.driver_for_id(ticket.host_id).set_console_password(
            desktop_id, ConsoleProtocol.SPICE, password, ticket.expires_at)
        return ViewerFile(ticket.desktop, virt_viewer_file(
            title=ticket.desktop, protocol="spice", host=ticket.desktop, port=5900,
            password=password,
            proxy=f"http://{SPICE_PROXY_USER}:{ticket.token}@{_url_host(proxy_host)}:{proxy_port}"))

    def rdp_file(self, identity: Identity, desktop_id: uuid.UUID, *, proxy_host: str,
                 proxy_port: int) -> RdpFile:
        """A ``.rdp`` file that opens the user's held desktop through the RDP proxy at
        ``proxy_host:proxy_port`` (a ticket as its ``loadbalanceinfo``), and a one-time
        password for their account set in the guest. ``Conflict`` when the desktop has no
        account of theirs or no RDP server (a desktop of the console flavor);
        ``Unavailable`` while its RDP server is still starting (its first boot)."""
        password = secrets.token_urlsafe(18)
        digest = hashlib.sha256(password.encode()).hexdigest()
        ticket = self.issue(identity, desktop_id, ConsoleProtocol.RDP,  # Forbidden first
                            otp_digest=digest)
        with self.ctx.uow(read_only=True) as uow:
            found = uow.linux_accounts.find(identity.name)
        if found is None:
            raise Conflict("you have no account in a desktop yet: RDP opens the session of a "
                           "desktop-flavor desktop, made when you connect to its pool")
        account = found[0]
        driver = self.ctx.driver_for_id(ticket.host_id)
        driver.console_address(desktop_id, ConsoleProtocol.RDP)  # the port, before the client
        code, err = _set_rdp_password(driver, desktop_id, account, digest)
        if code == 5:  # its xrdp waits for the desktop's own keys, made at its first boot
            raise Unavailable(f"the RDP server of desktop {ticket.desktop} is still starting; "
                              "try again in a minute", delay=30)
        if code != 0:
            what = ("its image has no RDP server" if code == 127 else
                    f"no account {account} there yet" if code == 3 else err.strip()[:200])
            raise Conflict(f"desktop {ticket.desktop} cannot take an RDP sign-in: {what}")
        return RdpFile(ticket.desktop, rdp_file_text(
            host=proxy_host, port=proxy_port, account=account, token=ticket.token),
            account=account, password=password, expires_at=ticket.expires_at)

    def admit_rdp(self, secret: str, *, reconnect: bool = False) -> ConsoleTarget:
        """Spend an RDP ticket (one connection) and say where its desktop's RDP port is
        forwarded. With ``reconnect`` (the proxy saw this ticket's connection close within
        ``RDP_RECONNECT_WINDOW``) a spent ticket is admitted again, its one-time password set
        in the guest again. ``AuthenticationFailed`` as ``consume``."""
        digest = token_digest(secret)
        with self.ctx.uow() as uow:
            used = uow.console_tickets.use(digest, utcnow(), ConsoleProtocol.RDP)
            uow.commit()
        if used is not None:
            return self._target(*used, ConsoleProtocol.RDP)
        if not reconnect:
            raise AuthenticationFailed("RDP ticket unknown, already used or expired")
        with self.ctx.uow(read_only=True) as uow:
            used = uow.console_tickets.used_since(digest, None, ConsoleProtocol.RDP)
            otp = uow.console_tickets.otp_digest(digest)
            found = uow.linux_accounts.find(used[1]) if used is not None else None
        if used is None or otp is None or found is None:
            raise AuthenticationFailed("RDP ticket unknown, or one no client may come back on")
        target = self._target(*used, ConsoleProtocol.RDP)
        assert target.host_id is not None  # an RDP target is never a followed one
        code, err = _set_rdp_password(self.ctx.driver_for_id(target.host_id),
                                      target.desktop_id, found[0], otp)
        if code != 0:
            raise Unavailable(f"desktop {target.desktop} cannot take the RDP client back yet: "
                              f"{err.strip()[:200] or f'exit {code}'}", delay=5)
        return target

    def consume(self, secret: str) -> ConsoleTarget:
        """Use a VNC ticket (once) and say where its desktop's console listens.

        ``AuthenticationFailed`` for an unknown, used or expired ticket, one for another
        display, or one whose user no longer holds the desktop.
        """
        digest = token_digest(secret)
        with self.ctx.uow() as uow:
            used = uow.console_tickets.use(digest, utcnow())
            uow.commit()
        if used is None:
            raise AuthenticationFailed("console ticket unknown, already used or expired")
        return self._target(*used, ConsoleProtocol.VNC)

    def admit_spice(self, secret: str, *, requested: Address | None = None,
                    joined: bool = False) -> tuple[ConsoleTarget, bool]:
        """A SPICE proxy connection with ``secret``: where the desktop's SPICE display
        listens, and whether this connection spent the ticket (the client's first channel)
        rather than following it, within ``CHANNEL_WINDOW`` or, with ``joined`` (a channel of
        this ticket is open through the proxy) at any time to follow a live move.
        ``requested`` is the address the client asked for: honoured only when it is the
        desktop's display on the host a live move is taking it to (the client follows the
        move), else the display where the desktop runs. ``AuthenticationFailed`` otherwise
        (unknown, expired, long used and not following a move, another display's, no longer
        the user's)."""
        digest = token_digest(secret)
        now = utcnow()
        with self.ctx.uow() as uow:
            used = uow.console_tickets.use(digest, now, ConsoleProtocol.SPICE)
            uow.commit()
        first, late = used is not None, False
        if used is None:
            with self.ctx.uow(read_only=True) as uow:
                used = uow.console_tickets.used_since(digest, now - CHANNEL_WINDOW,
                                                      ConsoleProtocol.SPICE)
                if used is None and joined:
                    used = uow.console_tickets.used_since(digest, None, ConsoleProtocol.SPICE)
                    late = True
        if used is None:
            raise AuthenticationFailed("SPICE ticket unknown, used too long ago or expired")
        target = self._target(*used, ConsoleProtocol.SPICE, requested)
        if late and not target.followed:
            raise AuthenticationFailed("SPICE ticket used too long ago (only a client that "
                                       "follows its desktop's live move joins later)")
        return target, first

    def still_held(self, target: ConsoleTarget) -> bool:
        """Whether the console's desktop is still its user's (else its consoles close)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.find(target.desktop_id)
            return (desktop is not None and desktop.assigned_user == target.user
                    and desktop.state in HELD_STATES)

    def _target(self, desktop_id: uuid.UUID, user: str, protocol: ConsoleProtocol,
                requested: Address | None = None) -> ConsoleTarget:
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.find(desktop_id)
            if (desktop is None or desktop.assigned_user != user
                    or desktop.state not in HELD_STATES):
                raise AuthenticationFailed("the desktop of this console ticket is no longer "
                                           "yours")
            driver = self.ctx.driver_for(desktop.host)
            name, host_id = desktop.name, desktop.host_id
            moving_to = desktop.moving_to_id
        if requested is not None and moving_to is not None:
            followed = self._display_on(moving_to, desktop_id, protocol, requested)
            if followed is not None:
                return ConsoleTarget(desktop_id=desktop_id, desktop=name, user=user,
                                     protocol=protocol.value, host=requested[0],
                                     port=requested[1], followed=True)
        address = driver.console_address(desktop_id, protocol)
        return ConsoleTarget(desktop_id=desktop_id, desktop=name, user=user,
                             protocol=address.protocol, host=address.host, port=address.port,
                             host_id=host_id)

    def _display_on(self, host_id: uuid.UUID, desktop_id: uuid.UUID,
                    protocol: ConsoleProtocol, requested: Address) -> Address | None:
        """``requested``, if it is the desktop's ``protocol`` display on host ``host_id``
        (where a live move is taking it); None otherwise or when that host cannot tell."""
        try:
            there = self.ctx.driver_for_id(host_id).console_address(desktop_id, protocol)
        except DeskpoolError:
            return None
        return requested if (there.host, there.port) == requested else None


def _set_rdp_password(driver: HypervisorDriver, desktop_id: uuid.UUID, account: str,
                      digest: str) -> tuple[int, str]:
    """Arm the one-time password whose SHA-256 is ``digest`` for ``account``'s next RDP
    sign-in in the guest: the guest script's exit code and what it said."""
    code, _out, err = GuestAgent(driver, desktop_id).exec_capture(
        ["/bin/sh", RDP_OTP, "set", account, digest,
         str(int(RDP_PASSWORD_TTL.total_seconds()))], timeout_s=30.0)
    return code, err


class SpiceAdmission:
    """What the SPICE proxy asks the broker (``deskpool.api.spice_proxy.Admission``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.tickets = ConsoleTickets(ctx)
        self.sessions = SessionService(ctx)

    def admit(self, secret: str, requested: Address | None = None,
              joined: bool = False) -> tuple[ConsoleTarget, bool]:
        return self.tickets.admit_spice(secret, requested=requested, joined=joined)

    def still_held(self, target: ConsoleTarget) -> bool:
        return self.tickets.still_held(target)

    def opened(self, target: ConsoleTarget) -> None:
        self.sessions.console_connected(target.desktop_id, target.user)

    def closed(self, target: ConsoleTarget) -> None:
        self.sessions.console_disconnected(target.desktop_id, target.user)


class RdpAdmission:
    """What the RDP proxy asks the broker (``deskpool.api.rdp_proxy.Admission``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.tickets = ConsoleTickets(ctx)
        self.sessions = SessionService(ctx)

    def admit(self, secret: str, reconnect: bool = False) -> ConsoleTarget:
        return self.tickets.admit_rdp(secret, reconnect=reconnect)

    def still_held(self, target: ConsoleTarget) -> bool:
        return self.tickets.still_held(target)

    def opened(self, target: ConsoleTarget) -> None:
        self.sessions.console_connected(target.desktop_id, target.user)

    def closed(self, target: ConsoleTarget) -> None:
        self.sessions.console_disconnected(target.desktop_id, target.user)


def rdp_file_text(*, host: str, port: int, account: str, token: str) -> str:
    """A ``.rdp`` file (Microsoft's ``name:type:value`` lines) for mstsc and xfreerdp. The
    ticket goes as ``loadbalanceinfo``: clients send it, as they do for an RD Connection
    Broker, as the routing token of their first packet, where the proxy takes it."""
    lines = [f"full address:s:{_url_host(host)}:{port}", f"username:s:{account}",
             f"loadbalanceinfo:s:{token}", "prompt for credentials:i:0",
             "use multimon:i:0", "screen mode id:i:1",
             # Back by itself when the connection ends (a live move of the desktop does).
             "autoreconnection enabled:i:1", "autoreconnect max retries:i:60"]
    return "\r\n".join(lines) + "\r\n"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
