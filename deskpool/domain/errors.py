"""deskpool's own error types. Every layer raises these; edges turn them into one-line messages.

They are modelled by what the caller should do next, as kopf models its handler errors:

* ``TemporaryError``: something did not answer or was busy; the same call may succeed later
  (after ``delay`` seconds when the raiser knows; the caller's own backoff otherwise).
* ``PermanentError``: the request or the object is wrong; repeating it changes nothing.
* ``LostRace``: another actor changed the object first (a compare-and-swap found it moved on).
  Not a failure of the caller's work: the winner owns the object now, the loser leaves it.

Anything that is not a ``DeskpoolError`` is a programming error: it is logged with its trace
and counted, never turned into a desktop's ``error`` state as if the desktop had failed.

Drivers translate hypervisor errors into these so nothing above them sees libvirt exceptions.
"""

from __future__ import annotations

import uuid


class DeskpoolError(Exception):
    """Base of every error deskpool raises on purpose. ``str(err)`` is a complete sentence."""


class TemporaryError(DeskpoolError):
    """Try again later: after ``delay`` seconds when given, else after the caller's backoff."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(DeskpoolError):
    """Retrying the same request cannot succeed; something must change first."""


class InvalidInput(PermanentError):
    """The caller asked for something malformed (a bad name, pattern, size, path...)."""


class NotFound(PermanentError):
    """A named object (template, version, desktop, host, image) does not exist."""


class Conflict(PermanentError):
    """The request collides with existing state (a name in use, a published version...)."""


class InvalidTransition(Conflict):
    """A desktop state change that the transition table forbids."""


class LostRace(Conflict):
    """Another actor changed the object first: a compare-and-swap found it in another state.

    Whoever raced with the caller won; the caller leaves the object to them. Callers that race
    on purpose (two brokers, a broker and its reconciler) catch exactly this, nothing wider.
    """


class HypervisorUnreachable(TemporaryError):
    """The hypervisor at a libvirt URI could not be reached or is not a hypervisor."""


class DriverError(DeskpoolError):
    """The hypervisor refused or failed an operation."""


class DiskInUse(DriverError):
    """A VM's disk is held by another process: QEMU's image lock on the disk is taken, so a QEMU
    somewhere (on any host sharing the storage) still has it open. Starting a second VM on it
    would corrupt it; deskpool's fence against running one desktop twice."""


class ChecksumMismatch(DriverError):
    """A file or a volume no longer has the checksum recorded for it (it is corrupt)."""


class TemplateUnusable(Conflict):
    """A template version's disk cannot be used on a host: missing, or corrupt. Nothing is made
    from it until it is fine again (restored, re-imported) or another version is published."""

    def __init__(self, message: str, *, version_id: uuid.UUID, source: str) -> None:
        super().__init__(message)
        self.version_id = version_id  # the TemplateVersion's id
        self.source = source  # the version's disk in the template store


class VmNotFound(DriverError, PermanentError):
    """The driver has no VM with that deskpool id."""


class AgentUnavailable(DriverError, TemporaryError):
    """The guest agent did not answer (VM off, agent not started yet, or no agent channel)."""


class HostConnectionLost(DriverError, TemporaryError):
    """The connection to a host broke during a call (its daemon was restarted or killed, the
    network dropped): whether the call took effect is unknown. The driver reconnects at its
    next call; what was half-made is the caller's to finish or clear, not a reason to give
    up on the object."""


class ImageBuildError(DeskpoolError):
    """Building or importing a guest image failed."""


class AuthenticationFailed(PermanentError):
    """Wrong user name or password, or an expired / revoked session or token."""


class Forbidden(PermanentError):
    """An authenticated user asked for something they are not entitled to."""


class Unavailable(TemporaryError):
    """A service deskpool depends on (a directory server, a host, a desktop's guest) did not
    answer in time, or is too busy right now."""


class PoolExhausted(TemporaryError):
    """Every desktop a pool may have is taken: the pool is at its maximum and none is free.

    Not a dependency's failure (that is ``Unavailable``): the pool works, it is full. A user
    may try again once someone logs off; an administrator may raise the pool's maximum."""


class SignInLocked(TemporaryError):
    """Too many failed sign-ins for a user name or from an address: refused, without looking
    at the password, until ``delay`` seconds have passed."""
