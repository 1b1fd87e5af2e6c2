"""The profile rules of ``deskpool.domain.profiles``: fencing by generation, retention,
rollback, flattening plans and exclusions."""

from __future__ import annotations

import uuid

import pytest

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.profile_merge import LayerMode
from deskpool.domain.profiles import (
    Commit,
    Discard,
    Layer,
    LayerState,
    Merge,
    Profile,
    SetAside,
    chain,
    decide_commit,
    disk_serial,
    exclusions,
    flatten_plan,
    kept_generations,
    open_session,
    orphaned_sessions,
    rollback_target,
)

C = LayerState.COMMITTED


def linear(user: str, generations: int) -> list[Layer]:
    """Generations 1..n, each an overlay on the previous one."""
    layers: list[Layer] = []
    parent: uuid.UUID | None = None
    for generation in range(1, generations + 1):
        layer = Layer(id=uuid.uuid4(), user=user, generation=generation, parent_id=parent,
                      path=f"{user}/{generation}.qcow2", state=C)
        layers.append(layer)
        parent = layer.id
    return layers


def profile_of(layers: list[Layer], keep: int = 3) -> Profile:
    top = layers[-1]
    return Profile(user=top.user, generation=top.generation, layer_id=top.id,
                   keep_generations=keep)


def test_a_session_sits_on_the_committed_layer_and_aims_at_the_next_generation() -> None:
    layers = linear("ann", 2)
    session = open_session(profile_of(layers), layers, uuid.uuid4(), "ann/s.qcow2", "desk-1")
    assert (session.parent_id, session.generation, session.base_generation, session.state) == (
        layers[-1].id, 3, 2, LayerState.SESSION)


def test_no_session_without_a_committed_generation() -> None:
    with pytest.raises(NotFound, match="no committed generation"):
        open_session(Profile("ann", 0, None), [], uuid.uuid4(), "p", "d")


def test_commit_wins_only_from_the_committed_generation_and_the_other_merges() -> None:
    layers = linear("ann", 2)
    profile = profile_of(layers)
    first = open_session(profile, layers, uuid.uuid4(), "a", "desk-a")
    second = open_session(profile, layers, uuid.uuid4(), "b", "desk-b")
    assert decide_commit(profile, first) == Commit(2, 3)
    after = Profile("ann", 3, first.id)
    assert decide_commit(after, second) == Merge(3)


def test_a_read_only_session_is_discarded_whatever_it_holds() -> None:
    layers = linear("ann", 1)
    profile = profile_of(layers)
    session = open_session(profile, layers, uuid.uuid4(), "a", "desk-a", LayerMode.READ_ONLY)
    assert session.mode is LayerMode.READ_ONLY
    assert decide_commit(profile, session) == Discard()
    assert decide_commit(profile, session, check_error="bad") == Discard()


def test_a_layer_that_failed_its_check_is_set_aside() -> None:
    layers = linear("ann", 1)
    profile = profile_of(layers)
    session = open_session(profile, layers, uuid.uuid4(), "a", "desk-a")
    decision = decide_commit(profile, session, check_error="2 leaked clusters")
    assert isinstance(decision, SetAside) and "2 leaked clusters" in decision.reason


def test_orphaned_sessions_are_those_of_desktops_without_a_live_session() -> None:
    layers = linear("ann", 1)
    profile = profile_of(layers)
    live = open_session(profile, layers, uuid.uuid4(), "a", "desk-a")
    dead = open_session(profile, layers, uuid.uuid4(), "b", "desk-b")
    assert orphaned_sessions([*layers, live, dead], ["desk-a"]) == [dead]


def test_chain_runs_from_the_base_and_reports_gaps_and_loops() -> None:
    layers = linear("ann", 3)
    assert [layer.generation for layer in chain(layers, layers[-1].id)] == [1, 2, 3]
    with pytest.raises(NotFound):
        chain(layers[1:], layers[-1].id)
    looped = [Layer(id=layers[0].id, user="ann", generation=1, parent_id=layers[1].id,
                    path="x", state=C), layers[1]]
    with pytest.raises(Conflict):
        chain(looped, layers[1].id)


def test_rollback_goes_only_to_kept_generations() -> None:
    layers = linear("ann", 6)
    profile = profile_of(layers, keep=2)
    assert list(kept_generations(profile)) == [4, 5, 6]
    assert rollback_target(profile, layers, 4) == layers[3]
    with pytest.raises(InvalidInput, match="not kept"):
        rollback_target(profile, layers, 3)
    with pytest.raises(InvalidInput, match="already"):
        rollback_target(profile, layers, 6)


def test_flatten_merges_everything_under_the_oldest_kept_generation() -> None:
    layers = linear("ann", 6)
    plan = flatten_plan(profile_of(layers, keep=2), layers)
    assert plan is not None
    assert plan.target == layers[3] and plan.child == layers[4]
    assert [layer.generation for layer in plan.retired] == [1, 2, 3, 4]


def test_no_flatten_while_a_session_is_open_or_when_nothing_is_below() -> None:
    layers = linear("ann", 6)
    profile = profile_of(layers, keep=2)
    session = open_session(profile, layers, uuid.uuid4(), "s", "desk-a")
    assert flatten_plan(profile, [*layers, session]) is None
    short = linear("bob", 2)
    assert flatten_plan(profile_of(short, keep=3), short) is None


def test_exclusions_always_hold_cache_and_refuse_paths_outside_the_home() -> None:
    assert exclusions() == (".cache",)
    assert exclusions(["~/.local/share/Trash", ".cache", "Videos"]) == (
        ".cache", ".local/share/Trash", "Videos")
    for bad in ("/etc", "../other", "", "a/../../b"):
        with pytest.raises(InvalidInput, match="inside the home"):
            exclusions([bad])


def test_disk_serial_fits_virtio() -> None:
    assert len(disk_serial(uuid.uuid4())) <= 20
