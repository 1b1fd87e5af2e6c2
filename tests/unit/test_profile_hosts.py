"""The pure rules of roaming profiles across hosts (``deskpool.domain.profile_hosts``)."""

from __future__ import annotations

import uuid

from deskpool.domain.profile_hosts import (
    copy_source,
    holds,
    latest_holders,
    layer_volume_name,
    missing_layers,
    storage_mates,
)
from deskpool.domain.profiles import Layer, LayerState

A, B, C, D = (uuid.uuid5(uuid.NAMESPACE_DNS, n) for n in "abcd")


def chain_of(n: int) -> list[Layer]:
    layers: list[Layer] = []
    parent = None
    for gen in range(1, n + 1):
        layer_id = uuid.uuid4()
        layers.append(Layer(id=layer_id, user="ann", generation=gen, parent_id=parent,
                            path=f"/store/ann/{layer_id}.qcow2", state=LayerState.COMMITTED))
        parent = layer_id
    return layers


def test_a_host_lacks_only_the_layers_nobody_gave_it_oldest_first() -> None:
    one, two, three = chain_of(3)
    holders = {one.id: {A, B}, two.id: {A}, three.id: {A}}
    assert missing_layers([one, two, three], B, holders, {}) == [two, three]
    assert missing_layers([one, two, three], A, holders, {}) == []
    assert missing_layers([one, two, three], C, holders, {}) == [one, two, three]


def test_a_layer_without_records_is_in_the_store_every_host_reaches() -> None:
    (one,) = chain_of(1)
    assert holds(one.id, C, {}, {})
    # A first copy in flight (a record, nobody holding it yet) does not make it everywhere.
    assert not holds(one.id, C, {one.id: set()}, {})


def test_hosts_on_one_shared_storage_hold_what_it_holds() -> None:
    one, two = chain_of(2)
    shared = {A: "nfs1", B: "nfs1", C: None, D: "nfs2"}
    holders = {one.id: {A}, two.id: {A}}
    assert storage_mates(B, shared) == {A, B}
    assert missing_layers([one, two], B, holders, shared) == []
    assert missing_layers([one, two], D, holders, shared) == [one, two]
    assert latest_holders(two.id, holders, shared) == {A, B}


def test_placement_prefers_nobody_for_layers_everywhere_or_no_profile() -> None:
    (one,) = chain_of(1)
    assert latest_holders(None, {}, {}) == frozenset()
    assert latest_holders(one.id, {}, {}) == frozenset()


def test_a_copy_comes_from_a_holder_that_answers() -> None:
    (one,) = chain_of(1)
    holders = {one.id: {C, A}}
    assert copy_source(one.id, holders, [A, B, C]) == min(A, C)
    assert copy_source(one.id, holders, [C]) == C
    assert copy_source(one.id, holders, [B]) is None


def test_a_layers_volume_keeps_its_store_file_name() -> None:
    """Overlays name their backing file relative to their own directory: the same name on
    a host keeps a copied chain valid there."""
    (one,) = chain_of(1)
    assert layer_volume_name(one.id) == one.path.rsplit("/", 1)[1]
