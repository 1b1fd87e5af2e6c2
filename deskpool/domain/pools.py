"""Pools: what an administrator asks for, validated before anything is stored."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

from deskpool.domain.errors import InvalidInput
from deskpool.domain.naming import validate_pattern
from deskpool.domain.offline import OfflinePolicy
from deskpool.domain.profile_merge import SecondSession
from deskpool.domain.profiles import ALWAYS_EXCLUDED, exclusions
from deskpool.domain.redirection import redirect_folders

# Pool names: the alphabet of host names (they appear in URLs, audit targets and metrics).
POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_SIZE = 100_000  # desktops in one pool; the reconciler plans each pass over all of them
MAX_EXCLUSIONS = 32  # paths kept out of a pool's profiles
# Every timer of a pool: at least a second, at most ten years (a database integer, and a
# date the timers can add it to).
MAX_SECONDS = 10 * 365 * 86400


class PoolKind(StrEnum):
    STATELESS = "stateless"  # every session starts from the same clean state
    STATEFUL = "stateful"  # a user's desktop keeps its changes


class Assignment(StrEnum):
    FLOATING = "floating"  # any free desktop, handed back after use
    DEDICATED = "dedicated"  # one desktop per user, kept for that user


class OnLogout(StrEnum):
    RECYCLE_REVERT = "recycle-revert"  # back to the factory snapshot
    RECYCLE_AS_IS = "recycle-as-is"  # handed back untouched (kiosks)
    RETIRE = "retire"  # destroyed; a fresh one replaces it


class RevertBy(StrEnum):
    """How a reverting pool's desktop goes back to the template (``OnLogout.RECYCLE_REVERT``)."""

    # Its factory snapshot (internal, the guest's memory included): back in seconds, but the
    # snapshot is a few hundred MiB of each desktop's own disk.
    SNAPSHOT = "snapshot"
    # A fresh overlay on the master, booted again (identity and machine secrets given anew):
    # a boot's time, and nearly no disk of its own.
    BOOT = "boot"


class PowerPolicy(StrEnum):
    RUNNING = "running"  # unassigned desktops stay running (fastest hand-over)
    SUSPEND = "suspend"  # memory saved to disk; resumed on demand
    SHUTOFF = "shutoff"  # powered off; booted on demand


def resets_on_reboot(kind: PoolKind, on_logout: OnLogout) -> bool:
    """Stateless mode: a reboot or shutdown from inside the guest throws the desktop's writes
    away as a logoff does (a kiosk's recycle-as-is keeps them, by the admin's choice)."""
    return kind is PoolKind.STATELESS and on_logout is not OnLogout.RECYCLE_AS_IS


# A user layer's disk: room for a few packages and files at least, and no more than the
# disks deskpool makes elsewhere.
USER_LAYER_MIN_MIB = 64
USER_LAYER_MAX_MIB = 1024 * 1024


@dataclass(frozen=True)
class PoolSpec:
    name: str
    template: str
    kind: PoolKind = PoolKind.STATELESS
    assignment: Assignment = Assignment.FLOATING
    min_size: int = 0
    max_size: int = 10
    spare: int = 1
    naming_pattern: str = "desktop-{n:03}"
    clone_mode: str = "linked"
    on_logout: OnLogout = OnLogout.RECYCLE_REVERT
    revert_by: RevertBy = RevertBy.SNAPSHOT  # how a revert is done (RevertBy)
    one_time: bool = False
    max_age_s: int | None = None
    power_policy: PowerPolicy = PowerPolicy.RUNNING
    canary: int = 0  # new-version desktops that must be ready before old free ones retire
    reservation_timeout_s: int = 300  # a reservation never connected to is released after
    idle_timeout_s: int | None = None  # a session idle this long is logged off
    disconnect_timeout_s: int | None = 1800  # a disconnected session can be resumed this long
    placement: str = "spread"  # "spread" over hosts, or "pack" them one after another
    # How long the user's own graphical session may take to start at hand-over (desktops
    # with the session hook); past it the desktop fails and another is tried.
    session_start_timeout_s: int = 150
    # The user's home follows them: a profile container (deskpool.services.profiles) is
    # plugged in and mounted at logon on desktops with the session hook, committed at logoff.
    roaming_profiles: bool = False
    # What a user's second concurrent session gets: refused, a read-only profile, or one
    # merged at logoff (deskpool.domain.profile_merge).
    second_session: SecondSession = SecondSession.MERGE
    # Paths inside the home kept out of the profile on this pool's desktops, besides
    # ~/.cache (bound from the desktop's own disk, thrown away with it).
    profile_exclusions: tuple[str, ...] = ()
    # Folders of the home put on the user's own share of deskpool's Samba server at logon
    # (e.g. Documents, Desktop, Downloads; empty: none), desktops with the session hook.
    redirect_folders: tuple[str, ...] = ()
    # The load balancer may move this pool's running desktops live off a host under memory
    # or CPU pressure (off by default: a move pauses the guest for a moment).
    balance: bool = False
    # Whether and how its desktops may be checked out to a laptop (issue 15); default: never.
    offline: OfflinePolicy = field(default_factory=OfflinePolicy)
    # A stateful pool's user layer: MiB of a disk of each desktop's own that holds the user's
    # changes to the system as files (the upper layer of an overlay root over the template);
    # 0: none, the changes go into the desktop's root overlay.
    user_layer_mib: int = 0

    def validate(self) -> PoolSpec:
        """Refuse a pool that can never be satisfied, naming the offending fields."""
        if not POOL_NAME.match(self.name):
            raise InvalidInput(f"pool name {self.name!r} must be 1-63 characters of a-z, 0-9, "
                               "'.', '_' and '-', starting with a letter or digit")
        for label, size in (("min_size", self.min_size), ("max_size", self.max_size),
                            ("spare", self.spare), ("canary", self.canary)):
            if not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
                raise InvalidInput(f"pool {self.name!r}: {label} ({size}) must be a whole "
                                   f"number from 0 to {MAX_SIZE}")
        if self.max_size < self.min_size:
            raise InvalidInput(
                f"pool {self.name!r}: max ({self.max_size}) is below min ({self.min_size})"
            )
        if self.spare > self.max_size:
            raise InvalidInput(
                f"pool {self.name!r}: spare ({self.spare}) is above max ({self.max_size})"
            )
        if self.canary > self.max_size:
            raise InvalidInput(
                f"pool {self.name!r}: canary ({self.canary}) is above max ({self.max_size})"
            )
        for label, seconds in (("max_age_s", self.max_age_s),
                               ("reservation_timeout_s", self.reservation_timeout_s),
                               ("idle_timeout_s", self.idle_timeout_s),
                               ("disconnect_timeout_s", self.disconnect_timeout_s),
                               ("session_start_timeout_s", self.session_start_timeout_s)):
            # 0 or less would time every session out at once, NaN or a huge number would
            # stop the timers (no date can be computed from it).
            if seconds is not None and not (
                    isinstance(seconds, int) and math.isfinite(seconds)
                    and 0 < seconds <= MAX_SECONDS):
                raise InvalidInput(f"pool {self.name!r}: {label} ({seconds}) must be whole "
                                   f"seconds from 1 to {MAX_SECONDS}")
        if self.kind is PoolKind.STATEFUL and self.on_logout is OnLogout.RECYCLE_REVERT:
            raise InvalidInput(
                f"pool {self.name!r}: a stateful pool keeps users' changes, so it cannot "
                "revert on logout (use recycle-as-is or retire)"
            )
        if self.user_layer_mib and not (
                isinstance(self.user_layer_mib, int)
                and USER_LAYER_MIN_MIB <= self.user_layer_mib <= USER_LAYER_MAX_MIB):
            raise InvalidInput(f"pool {self.name!r}: user_layer_mib ({self.user_layer_mib}) "
                               f"must be 0 (no user layer) or from {USER_LAYER_MIN_MIB} to "
                               f"{USER_LAYER_MAX_MIB} MiB")
        if self.user_layer_mib and self.kind is not PoolKind.STATEFUL:
            raise InvalidInput(f"pool {self.name!r}: only a stateful pool keeps a user layer "
                               "(a stateless desktop throws its changes away)")
        if self.user_layer_mib and self.offline.may_go_offline:
            # A check-out carries the desktop's root disk; its user's changes are on the layer.
            raise InvalidInput(f"pool {self.name!r}: desktops with a user layer cannot go "
                               "offline yet (the laptop would get the template without the "
                               "user's layer)")
        if self.user_layer_mib and self.clone_mode == "instant":
            # An instant clone runs the template's memory, booted on the template's root:
            # there is no boot at which to assemble the layered root.
            raise InvalidInput(f"pool {self.name!r}: instant clones cannot have a user layer "
                               "(use linked or full clones)")
        if self.clone_mode not in ("linked", "full", "instant"):
            raise InvalidInput(
                f"pool {self.name!r}: clone mode {self.clone_mode!r} is not linked, full or "
                "instant"
            )
        if self.placement not in ("spread", "pack"):
            raise InvalidInput(f"pool {self.name!r}: placement {self.placement!r} is not "
                               "spread or pack")
        validate_pattern(self.naming_pattern)
        if self.offline.may_go_offline and (self.kind is not PoolKind.STATEFUL
                                            or self.assignment is not Assignment.DEDICATED):
            # A laptop's work comes back into the user's own desktop: a desktop that resets
            # or changes hands would lose it.
            raise InvalidInput(f"pool {self.name!r}: only a stateful, dedicated pool may let "
                               "its desktops go offline")
        if len(self.profile_exclusions) > MAX_EXCLUSIONS:
            raise InvalidInput(f"pool {self.name!r}: at most {MAX_EXCLUSIONS} profile "
                               "exclusions")
        # Each a path inside the home, kept as the guest will see it: "~/" and what is
        # always kept out (~/.cache) dropped, duplicates once.
        kept = exclusions(self.profile_exclusions)[len(ALWAYS_EXCLUDED):]
        folders = redirect_folders(self.redirect_folders)
        both = sorted(set(folders) & set(kept))
        if both:  # the guest would bind one over the other: say which wins, never guess
            raise InvalidInput(f"pool {self.name!r}: {', '.join(both)} cannot be both kept out "
                               "of profiles and redirected to the file share; choose one")
        if kept == self.profile_exclusions and folders == self.redirect_folders:
            return self
        return replace(self, profile_exclusions=kept, redirect_folders=folders)

    def desired_total(self, assigned: int) -> int:
        """How many desktops the pool should have, given how many users hold one: at least
        min, ``spare`` more than are held (free ones, ready or on their way), never above max."""
        return min(max(self.min_size, assigned + self.spare), self.max_size)
