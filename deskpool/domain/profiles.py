"""Roaming profiles as profile containers: the pure rules, no I/O.

A user's profile is a filesystem on a chain of immutable qcow2 layers. Each committed
*generation* is one layer whose backing chain is everything before it. A desktop session
writes to its own *session layer*, an overlay on the layer of the generation that was
committed when the session started (its ``base_generation``). At logoff the session layer
becomes generation ``base_generation + 1`` if, and only if, the profile is still at
``base_generation``: the generation number is the fencing token, written by one
compare-and-swap. A session that lost the race (another session committed first) is merged
into the newer generation file by file (``domain.profile_merge``); one whose write-back was
interrupted is set aside as ``unclean``: kept for the admin, never part of a chain.

Nothing is ever overwritten: a rollback makes a *new* generation whose layer is an empty
overlay on the kept generation's layer, so the generations in between stay where they were.
Old generations beyond the retention count are merged into a standalone base
(``flattened``) by the background flattener, and only when no session uses the profile.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import PurePosixPath

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.profile_merge import LayerMode

# The guest finds the hot-plugged disk as /dev/disk/by-id/virtio-<serial> (virtio-blk keeps
# at most 20 bytes of serial) and mounts the filesystem labelled PROFILE_FS_LABEL.
PROFILE_FS_LABEL = "deskpool-home"
DEFAULT_KEEP_GENERATIONS = 3
DEFAULT_QUOTA_BYTES = 4 * 2**30
# Never in the profile, whatever the admin lists: rebuilt by applications at will.
ALWAYS_EXCLUDED = (".cache",)


class LayerState(StrEnum):
    COMMITTED = "committed"  # a generation's layer: immutable from now on
    SESSION = "session"  # a live session's overlay, written by its desktop
    UNCLEAN = "unclean"  # a session that did not commit: set aside, shown to the admin
    FLATTENED = "flattened"  # merged into a newer standalone base; its file may go
    MERGED = "merged"  # a second session's changes, merged into a newer generation
    DISCARDED = "discarded"  # a read-only session's throw-away overlay, dropped at logoff


@dataclass(frozen=True, slots=True)
class Layer:
    """One qcow2 file of a profile. ``parent_id`` is the layer it is an overlay on (None for
    a standalone base). A session layer's ``generation`` is the one it would become."""

    id: uuid.UUID
    user: str
    generation: int
    parent_id: uuid.UUID | None
    path: str
    state: LayerState
    size_bytes: int = 0
    sha256: str | None = None
    base_generation: int | None = None
    desktop: str | None = None
    created_at: datetime | None = None  # as the store recorded it
    note: str | None = None  # why it was set aside, or what made it (rollback, reset...)
    mode: LayerMode = LayerMode.EXCLUSIVE  # how a session layer ends (profile_merge)


@dataclass(frozen=True, slots=True)
class Profile:
    """A user's profile: the committed generation and the layer that holds it."""

    user: str
    generation: int
    layer_id: uuid.UUID | None
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    size_bytes: int = 0
    keep_generations: int = DEFAULT_KEEP_GENERATIONS
    committed_at: datetime | None = None  # when the last generation was committed
    writeback_s: float | None = None  # how long that logoff took, unplug to commit


def layer_file_name(user: str, layer_id: uuid.UUID) -> str:
    """Where a layer lives under the profile store: one directory per user."""
    return f"{user}/{layer_id}.qcow2"


def disk_serial(layer_id: uuid.UUID) -> str:
    """The virtio serial of a session disk (20 bytes at most, the guest's by-id name)."""
    return f"dp-{layer_id.hex[:16]}"


def exclusions(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The paths (relative to the home) kept out of the profile: ``.cache`` always, then
    ``extra`` in order, without duplicates. ``InvalidInput`` for an absolute path, one with
    ``..`` or an empty one."""
    result: list[str] = list(ALWAYS_EXCLUDED)
    for raw in extra:
        path = PurePosixPath(raw.strip().removeprefix("~/"))
        if (not raw.strip() or path.is_absolute() or ".." in path.parts or str(path) == "."
                or len(raw) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in raw)):
            raise InvalidInput(f"profile exclusion {raw!r} must be a path inside the home "
                               "(like '.local/share/Trash'), not absolute, without '..' or "
                               "control characters, at most 255 characters")
        if str(path) not in result:
            result.append(str(path))
    return tuple(result)


def check_quota(quota_bytes: int) -> int:
    if quota_bytes < 64 * 2**20:
        raise InvalidInput(f"a profile quota of {quota_bytes} bytes is too small "
                           "(at least 64 MiB)")
    return quota_bytes


def check_keep(keep: int) -> int:
    if keep < 1:
        raise InvalidInput(f"a profile keeps at least 1 old generation, not {keep}")
    return keep


# --- chains ------------------------------------------------------------------------------


def chain(layers: Sequence[Layer], top_id: uuid.UUID) -> list[Layer]:
    """The layers from the standalone base up to ``top_id`` (base first). ``NotFound`` when
    a link is missing, ``Conflict`` for a loop (a broken store, never made by these rules)."""
    by_id = {layer.id: layer for layer in layers}
    result: list[Layer] = []
    seen: set[uuid.UUID] = set()
    current: uuid.UUID | None = top_id
    while current is not None:
        if current in seen:
            raise Conflict(f"profile layer {current} is its own ancestor")
        seen.add(current)
        layer = by_id.get(current)
        if layer is None:
            raise NotFound(f"profile layer {current} is missing from the chain of {top_id}")
        result.append(layer)
        current = layer.parent_id
    result.reverse()
    return result


def generation_layers(layers: Sequence[Layer]) -> dict[int, Layer]:
    """The committed layer of each generation still held (flattened ones count: their
    content survives in the base that replaced them, but see ``rollback_target``)."""
    return {layer.generation: layer for layer in layers if layer.state is LayerState.COMMITTED}


# --- a session ---------------------------------------------------------------------------


def open_session(profile: Profile, layers: Sequence[Layer], layer_id: uuid.UUID, path: str,
                 desktop: str, mode: LayerMode = LayerMode.EXCLUSIVE) -> Layer:
    """The session layer to create for a new session: an overlay on the committed layer,
    to become the next generation. ``NotFound`` for a profile with no committed layer yet
    (make its base first)."""
    if profile.layer_id is None:
        raise NotFound(f"the profile of {profile.user} has no committed generation yet")
    base = {layer.id: layer for layer in layers}.get(profile.layer_id)
    if base is None or base.state is not LayerState.COMMITTED:
        raise Conflict(f"the profile of {profile.user} points at layer {profile.layer_id}, "
                       "which is not a committed layer")
    return Layer(id=layer_id, user=profile.user, generation=profile.generation + 1,
                 parent_id=base.id, path=path, state=LayerState.SESSION,
                 base_generation=profile.generation, desktop=desktop, mode=mode)


@dataclass(frozen=True, slots=True)
class Commit:
    """The session layer becomes this generation (if the store's CAS agrees)."""

    expected_generation: int
    new_generation: int


@dataclass(frozen=True, slots=True)
class SetAside:
    """The session layer is kept aside as unclean, with the sentence the admin sees."""

    reason: str


@dataclass(frozen=True, slots=True)
class Merge:
    """The session started before another one committed: its changes are merged, file by
    file, into the committed generation (``domain.profile_merge``), as the next one."""

    onto_generation: int


@dataclass(frozen=True, slots=True)
class Discard:
    """A read-only session's overlay: dropped, whatever it holds."""


def decide_commit(profile: Profile, session: Layer, *, check_error: str | None = None
                  ) -> Commit | Merge | Discard | SetAside:
    """What logoff does with a session layer. A read-only session's layer is dropped. A
    clean layer whose base is still the committed generation is committed; a clean one
    whose base is older (another session committed meanwhile) is merged into it. Anything
    else is set aside, and the profile keeps its committed generation. ``check_error`` is
    what the layer check found wrong, if anything."""
    if session.state is not LayerState.SESSION or session.base_generation is None:
        return SetAside(f"layer {session.id} is {session.state}, not an open session")
    if session.mode is LayerMode.READ_ONLY:
        return Discard()
    if check_error is not None:
        return SetAside(f"the session layer of {session.desktop or 'a desktop'} failed its "
                        f"check ({check_error}); generation {profile.generation} stays")
    if session.base_generation != profile.generation:
        return Merge(profile.generation)
    return Commit(profile.generation, profile.generation + 1)


def orphaned_sessions(layers: Sequence[Layer], live_desktops: Iterable[str]) -> list[Layer]:
    """Session layers whose desktop no longer runs a session (a broker or QEMU that died
    between detach and commit): they are set aside, never committed after the fact, since
    nothing proves their write-back finished."""
    live = set(live_desktops)
    return [layer for layer in layers
            if layer.state is LayerState.SESSION and layer.desktop not in live]


# --- retention, rollback, flattening -----------------------------------------------------


def kept_generations(profile: Profile) -> range:
    """The generations a rollback may go to: the committed one and ``keep`` before it."""
    return range(max(1, profile.generation - profile.keep_generations), profile.generation + 1)


def rollback_target(profile: Profile, layers: Sequence[Layer], generation: int) -> Layer:
    """The committed layer to roll back to. ``InvalidInput`` for the current generation or
    one outside the kept ones; ``NotFound`` when its layer is gone (flattened away)."""
    if generation == profile.generation:
        raise InvalidInput(f"generation {generation} is already the profile of {profile.user}")
    kept = kept_generations(profile)
    if generation not in kept:
        raise InvalidInput(
            f"generation {generation} of {profile.user}'s profile is not kept (kept: "
            f"{kept.start}-{kept.stop - 1})")
    layer = generation_layers(layers).get(generation)
    if layer is None:
        raise NotFound(f"generation {generation} of {profile.user}'s profile has no layer left")
    return layer


@dataclass(frozen=True, slots=True)
class FlattenPlan:
    """Merge the chain under ``target`` (the oldest kept generation) into one standalone
    file that replaces it; ``child`` (if any) is rebased onto that file. ``retired`` are the
    layers that then belong to no kept generation's chain."""

    target: Layer
    child: Layer | None
    retired: tuple[Layer, ...]


def flatten_plan(profile: Profile, layers: Sequence[Layer]) -> FlattenPlan | None:
    """What the background flattener may do now, or None. Never while a session layer is
    open on the profile (a session reads the whole chain), never of a standalone layer
    (nothing to merge)."""
    if any(layer.state is LayerState.SESSION for layer in layers) or profile.layer_id is None:
        return None
    oldest = min(kept_generations(profile))
    current_chain = chain(layers, profile.layer_id)
    target = next((layer for layer in current_chain if layer.generation >= oldest), None)
    if target is None or target.parent_id is None:
        return None
    # Layers of kept generations that are not in the current chain (a rollback's
    # abandoned line) keep their own chains: none of their ancestors may go.
    needed: set[uuid.UUID] = set()
    for layer in generation_layers(layers).values():
        if layer.generation >= oldest and layer.id not in {c.id for c in current_chain}:
            needed |= {c.id for c in chain(layers, layer.id)}
    index = current_chain.index(target)
    below = current_chain[:index + 1]
    if any(layer.id in needed for layer in below):
        return None  # an older kept line shares them; flatten later, when it ages out
    child = current_chain[index + 1] if index + 1 < len(current_chain) else None
    return FlattenPlan(target=target, child=child, retired=tuple(below))
