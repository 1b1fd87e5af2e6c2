"""deskpool's own error types. Every layer raises these; edges turn them into one-line messages.

Drivers translate hypervisor errors into these so nothing above them sees libvirt exceptions.
"""


class DeskpoolError(Exception):
    """Base of every error deskpool raises on purpose. ``str(err)`` is a complete sentence."""


class InvalidInput(DeskpoolError):
    """The caller asked for something malformed (a bad name, pattern, size, path...)."""


class NotFound(DeskpoolError):
    """A named object (template, version, desktop, host, image) does not exist."""


class Conflict(DeskpoolError):
    """The request collides with existing state (a name in use, a published version...)."""


class InvalidTransition(Conflict):
    """A desktop state change that the transition table forbids, or that lost a race."""


class HypervisorUnreachable(DeskpoolError):
    """The hypervisor at a libvirt URI could not be reached or is not a hypervisor."""


class DriverError(DeskpoolError):
    """The hypervisor refused or failed an operation."""


class VmNotFound(DriverError):
    """The driver has no VM with that deskpool id."""


class AgentUnavailable(DriverError):
    """The guest agent did not answer (VM off, agent not started yet, or no agent channel)."""


class ImageBuildError(DeskpoolError):
    """Building or importing a guest image failed."""


class AuthenticationFailed(DeskpoolError):
    """Wrong user name or password, or an expired / revoked session or token."""


class Forbidden(DeskpoolError):
    """An authenticated user asked for something they are not entitled to."""


class Unavailable(DeskpoolError):
    """A service deskpool depends on (a directory server, a host) did not answer in time."""
