"""A libvirt domain's power state, and why it is off: a SIGKILLed QEMU reads "shut off
(crashed)" (libvirt saw its monitor close without the guest asking to shut down), told apart
from a shutdown or a forced stop someone asked for."""

from __future__ import annotations

import libvirt

from deskpool.domain.models import PowerState, StopReason

_POWER_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # shutting down: still running
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}
# Why a shut-off domain is off. A QEMU killed by a signal reads "crashed": libvirt saw its
# monitor close without the guest having asked to shut down.
_STOP_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopReason.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopReason.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopReason.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopReason.FAILED,
    # Killed by libvirtd itself at its restart, when it could not reconnect to the QEMU it
    # had left running: nobody asked for it to stop.
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: StopReason.CRASHED,
    # Not run since the daemon started: a host reboot (a /run on tmpfs loses the status of
    # every guest), or a VM defined and never booted.
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: StopReason.UNKNOWN,
}


def power_of(dom: libvirt.virDomain) -> tuple[PowerState, StopReason | None]:
    """The domain's power state and, when it is off or crashed, why."""
    state, reason = dom.state(0)
    power = _POWER_STATES.get(state, PowerState.UNKNOWN)
    if power is PowerState.SHUTOFF:
        if dom.hasManagedSaveImage(0):
            return PowerState.SAVED, StopReason.OTHER
        return power, _STOP_REASONS.get(reason, StopReason.OTHER)
    if power is PowerState.CRASHED:
        return power, StopReason.CRASHED
    return power, None
