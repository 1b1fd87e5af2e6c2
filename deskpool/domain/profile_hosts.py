"""Which hosts hold which profile layers, and what a desktop's host lacks: the pure rules.

A profile layer is immutable once committed, so a copy of it on another host is the same
layer: a copy is incremental by construction (only the layers a host lacks cross). Each copy
is recorded per host (``HoldState``): ``copying`` while its bytes travel, ``held`` only once
the receiving host published it whole (``HypervisorDriver.receive_volume``), so no record ever
says a host holds an incomplete layer.

* A layer with no record at all lives in the profile store every host reaches (the store all
  hosts share, as every profile made before hosts were tracked): it is held everywhere.
* A host whose storage is shared with another (``Host.shared_storage``, the same name) holds
  what that storage holds: a layer held by one of them is held by all.
* A layer's volume on a host is named ``layer_volume_name``: its file name in the profile
  store, so the relative backing-file names inside a chain's qcow2 headers stay valid in the
  host's storage directory.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from deskpool.domain.profiles import Layer


class HoldState(StrEnum):
    COPYING = "copying"  # bytes on their way: the host does not hold it yet
    HELD = "held"  # published whole on the host's storage


@dataclass(frozen=True, slots=True)
class LayerHolding:
    """One layer's record on one host (a copy in flight shows its progress)."""

    layer_id: uuid.UUID
    host_id: uuid.UUID
    state: HoldState
    bytes_done: int = 0
    bytes_total: int = 0
    copier: str | None = None  # the process copying it (``host_slots.process_holder``)
    updated_at: datetime | None = None


def layer_volume_name(layer_id: uuid.UUID) -> str:
    """The layer's volume on a host: its file name in the profile store."""
    return f"{layer_id}.qcow2"


def storage_mates(host_id: uuid.UUID, shared: Mapping[uuid.UUID, str | None]
                  ) -> frozenset[uuid.UUID]:
    """``host_id`` and every host on the same shared storage (``shared``: each host's
    ``shared_storage``)."""
    name = shared.get(host_id)
    if name is None:
        return frozenset({host_id})
    return frozenset(h for h, s in shared.items() if s == name) | {host_id}


def holds(layer_id: uuid.UUID, host_id: uuid.UUID,
          holders: Mapping[uuid.UUID, Collection[uuid.UUID]],
          shared: Mapping[uuid.UUID, str | None]) -> bool:
    """Whether ``host_id`` holds the layer (``holders``: the hosts with a ``held`` record
    of each layer that has any record; a layer missing from it is everywhere)."""
    found = holders.get(layer_id)
    if found is None:
        return True
    return bool(storage_mates(host_id, shared) & set(found))


def missing_layers(chain: Sequence[Layer], host_id: uuid.UUID,
                   holders: Mapping[uuid.UUID, Collection[uuid.UUID]],
                   shared: Mapping[uuid.UUID, str | None]) -> list[Layer]:
    """The layers of ``chain`` (base first) that ``host_id`` lacks, oldest first: what a
    logon there copies before it opens a session on the chain's top."""
    return [layer for layer in chain if not holds(layer.id, host_id, holders, shared)]


def latest_holders(top: uuid.UUID | None, holders: Mapping[uuid.UUID, Collection[uuid.UUID]],
                   shared: Mapping[uuid.UUID, str | None]) -> frozenset[uuid.UUID]:
    """The hosts holding the layer of a profile's latest generation (with their storage
    mates), for placement to prefer. Empty when no host is preferred: no profile yet, or
    a layer every host reaches."""
    if top is None or top not in holders:
        return frozenset()
    result: set[uuid.UUID] = set()
    for host in holders[top]:
        result |= storage_mates(host, shared)
    return frozenset(result)


def copy_source(layer_id: uuid.UUID, holders: Mapping[uuid.UUID, Collection[uuid.UUID]],
                usable: Collection[uuid.UUID]) -> uuid.UUID | None:
    """A host to copy the layer from: one holding it whose driver may be asked (``usable``:
    enabled or draining hosts), the first by id for a stable choice; None when none is."""
    candidates = sorted(h for h in holders.get(layer_id, ()) if h in set(usable))
    return candidates[0] if candidates else None
