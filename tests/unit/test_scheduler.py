"""Placement scheduler (pure): each filter, the weighers, spread vs pack, pinning, compatibility,
the "no valid host" message, and determinism."""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from typing import Any

import pytest

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.scheduler.facts import HostFacts, PlacementRequest, Strategy
from deskpool.scheduler.filters import (
    AllowedHostsFilter,
    CompatibilityFilter,
    DesktopCountFilter,
    HostFilter,
    MemoryFilter,
    ReachableFilter,
    StateFilter,
    StorageFilter,
    VcpuFilter,
    format_mib,
)
from deskpool.scheduler.placement import NoValidHost, consume, place, place_many
from deskpool.scheduler.weighers import (
    FreeMemoryWeigher,
    LoadWeigher,
    StrategyWeigher,
    normalize,
    used_fraction,
)

GIB = 1024**3


def host(name: str, **kw: Any) -> HostFacts:
    fields: dict[str, Any] = {
        "id": uuid.uuid5(uuid.NAMESPACE_DNS, name), "name": name, "state": "enabled",
        "reachable": True, "hypervisor": "QEMU", "arch": "x86_64", "cpu_model": "",
        "domain_types": ("qemu",), "vcpus": 16, "memory_mib": 64 * 1024,
        "storage_free_bytes": 1000 * GIB, "cpu_overcommit": 4.0, "memory_overcommit": 1.0,
        "max_desktops": None, "used_vcpus": 0, "used_memory_mib": 0, "desktops": 0,
    }
    fields.update(kw)
    return HostFacts(**fields)


def req(**kw: Any) -> PlacementRequest:
    fields: dict[str, Any] = {"what": "pool 'lab'", "vcpus": 2, "memory_mib": 1024,
                              "storage_bytes": GIB}
    fields.update(kw)
    return PlacementRequest(**fields)


# --- filters ------------------------------------------------------------------------------

FILTER_CASES: list[tuple[HostFilter, dict[str, Any], dict[str, Any], str | None]] = [
    (StateFilter(), {}, {}, None),
    (StateFilter(), {"state": "draining"}, {}, "h is draining"),
    (StateFilter(), {"state": "maintenance"}, {}, "h is maintenance"),
    (ReachableFilter(), {}, {}, None),
    (ReachableFilter(), {"reachable": False}, {}, "h does not answer"),
    (AllowedHostsFilter(), {}, {"allowed_hosts": None}, None),
    (AllowedHostsFilter(), {}, {"allowed_hosts": frozenset({uuid.uuid5(uuid.NAMESPACE_DNS, "h")})},
     None),
    (AllowedHostsFilter(), {}, {"allowed_hosts": frozenset({uuid.uuid4(), uuid.uuid4()})},
     "h is not one of the 2 hosts pool 'lab' is pinned to"),
    (CompatibilityFilter(), {}, {"hypervisors": frozenset({"QEMU"}), "arch": "x86_64"}, None),
    (CompatibilityFilter(), {"hypervisor": "TEST"}, {"hypervisors": frozenset({"QEMU"})},
     "h runs TEST, the template needs QEMU"),
    (CompatibilityFilter(), {"arch": "aarch64"}, {"arch": "x86_64"},
     "h is aarch64, the template needs x86_64"),
    (CompatibilityFilter(), {"cpu_model": "Skylake-Server"},
     {"cpu_models": frozenset({"Icelake-Server", "Cascadelake-Server"})},
     "h has Skylake-Server, the template needs Cascadelake-Server or Icelake-Server"),
    (CompatibilityFilter(), {"cpu_model": "Icelake-Server"},
     {"cpu_models": frozenset({"Icelake-Server"})}, None),
    (CompatibilityFilter(), {"domain_types": ()}, {}, "h offers no domain type"),
    # 16 vCPUs x 4.0 = 64 may be given.
    (VcpuFilter(), {"used_vcpus": 62}, {"vcpus": 2}, None),
    (VcpuFilter(), {"used_vcpus": 63}, {"vcpus": 2}, "h: 63 of 64 vCPUs used, 2 asked"),
    (VcpuFilter(), {"vcpus": 5, "cpu_overcommit": 1.5, "used_vcpus": 6}, {"vcpus": 2},
     "h: 6 of 7.5 vCPUs used, 2 asked"),
    (MemoryFilter(), {"memory_mib": 1024, "used_memory_mib": 512}, {"memory_mib": 512}, None),
    (MemoryFilter(), {"memory_mib": 1024, "used_memory_mib": 900}, {"memory_mib": 512},
     "h: 900 of 1024 MiB used, 512 asked"),
    (MemoryFilter(), {"memory_mib": 1024, "memory_overcommit": 1.5, "used_memory_mib": 900},
     {"memory_mib": 512}, None),
    (DesktopCountFilter(), {"max_desktops": None, "desktops": 500}, {}, None),
    (DesktopCountFilter(), {"max_desktops": 40, "desktops": 39}, {}, None),
    (DesktopCountFilter(), {"max_desktops": 40, "desktops": 40}, {}, "h has 40 of 40 desktops"),
    (StorageFilter(), {"storage_free_bytes": 10 * GIB, "pending_storage_bytes": 8 * GIB},
     {"storage_bytes": 2 * GIB}, None),
    (StorageFilter(), {"storage_free_bytes": 10 * GIB, "pending_storage_bytes": 8 * GIB},
     {"storage_bytes": 4 * GIB}, "h: 10 GiB free, 8 GiB promised, 4 GiB asked"),
]


@pytest.mark.parametrize(("flt", "host_kw", "req_kw", "reason"), FILTER_CASES,
                         ids=lambda v: getattr(v, "name", None))
def test_filter(flt: HostFilter, host_kw: dict[str, Any], req_kw: dict[str, Any],
                reason: str | None) -> None:
    assert flt.reject(host("h", **host_kw), req(**req_kw)) == reason


def test_placement_honours_every_filter() -> None:
    hosts = [
        host("a-draining", state="draining"),
        host("b-down", reachable=False),
        host("c-test", hypervisor="TEST"),
        host("d-busy", used_vcpus=64),
        host("e-full", max_desktops=3, desktops=3),
        host("f-nodisk", storage_free_bytes=0),
        host("g-small", memory_mib=512),
        host("h-ok", vcpus=1, memory_mib=2048),
    ]
    assert place(req(hypervisors=frozenset({"QEMU"})), hosts).host == "h-ok"


# --- weighers -----------------------------------------------------------------------------

def test_normalize_is_novas() -> None:
    assert normalize([]) == []
    assert normalize([3.0, 3.0]) == [0.0, 0.0]
    assert normalize([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]


def test_weighers_raw_order() -> None:
    r = req()
    big, small = host("big", memory_mib=128 * 1024), host("small", memory_mib=16 * 1024)
    assert FreeMemoryWeigher().raw(big, r) > FreeMemoryWeigher().raw(small, r)
    quiet = host("quiet", max_desktops=40, desktops=5)
    busy = host("busy", max_desktops=10, desktops=5)
    assert LoadWeigher().raw(quiet, r) > LoadWeigher().raw(busy, r)
    # Without max_desktops the limit is what the host holds: 16 vCPU x 4 / 2 = 32 desktops.
    assert LoadWeigher().raw(host("x", desktops=8, used_vcpus=16, used_memory_mib=8192), r) \
        == -0.25
    emptier = host("e", used_vcpus=8)  # 8/64 of vCPUs
    fuller = host("f", used_memory_mib=32 * 1024)  # half the memory
    assert used_fraction(emptier, r) == 0.125
    assert used_fraction(fuller, r) == 0.5
    spread, pack = StrategyWeigher(), StrategyWeigher()
    assert spread.raw(emptier, r) > spread.raw(fuller, r)
    assert pack.raw(fuller, req(strategy=Strategy.PACK)) > \
        pack.raw(emptier, req(strategy=Strategy.PACK))


def test_empty_hosts_start_with_the_most_free_memory() -> None:
    hosts = [host("a", memory_mib=16 * 1024), host("b", memory_mib=256 * 1024),
             host("c", memory_mib=64 * 1024)]
    assert place(req(), hosts).host == "b"
    assert place(req(strategy=Strategy.PACK), hosts).host == "b"


def test_spread_picks_the_least_used_fraction_pack_the_most() -> None:
    hosts = [
        host("a", used_vcpus=32, used_memory_mib=16 * 1024, desktops=16),  # half the vCPUs
        host("b", used_vcpus=8, used_memory_mib=4 * 1024, desktops=4),  # an eighth
        host("c", used_vcpus=16, used_memory_mib=8 * 1024, desktops=8),  # a quarter
    ]
    assert place(req(strategy=Strategy.SPREAD), hosts).host == "b"
    assert place(req(strategy=Strategy.PACK), hosts).host == "a"
    # PACK skips the fullest host once it no longer fits.
    hosts[0] = replace(hosts[0], used_vcpus=63)
    assert place(req(strategy=Strategy.PACK), hosts).host == "c"


def test_spread_is_proportional_to_capacity() -> None:
    hosts = [host("small", vcpus=4, memory_mib=16 * 1024),  # holds 8 (vCPUs: 4 x 4 / 2)
             host("large", vcpus=16, memory_mib=64 * 1024)]  # holds 32
    placed = place_many(req(), hosts, 20)
    on_large = sum(p.host == "large" for p in placed)
    assert on_large == 16  # 4 : 1, like their sizes


def test_pack_fills_one_host_before_the_next() -> None:
    hosts = [host(f"h{i}", vcpus=4, memory_mib=16 * 1024) for i in range(3)]  # 8 each
    placed = place_many(req(strategy=Strategy.PACK), hosts, 20)
    assert [p.host for p in placed] == ["h0"] * 8 + ["h1"] * 8 + ["h2"] * 4


def test_reason_is_one_readable_sentence() -> None:
    hosts = [
        host("h1", memory_mib=64 * 1024, used_memory_mib=40 * 1024, used_vcpus=40,
             max_desktops=40, desktops=20),
        host("h3", memory_mib=64 * 1024, used_memory_mib=16 * 1024, used_vcpus=10,
             max_desktops=40, desktops=5),
    ]
    p = place(req(), hosts)
    assert p.host == "h3"
    assert p.host_id == hosts[1].id
    assert p.reason == ("host h3: most free memory (48 GiB of 64 GiB), 5 of 40 desktops, "
                        "spread (25% used), 2 of 2 hosts fit")
    only = place(req(), [host("solo", memory_mib=8192)])
    assert only.reason == ("host solo: most free memory (8 GiB of 8 GiB), 0 desktops, "
                           "room for 8 more, spread (0% used), the only host that fits")


def test_format_mib() -> None:
    assert format_mib(512) == "512 MiB"
    assert format_mib(48 * 1024) == "48 GiB"
    assert format_mib(1536) == "1.5 GiB"


# --- pinning and compatibility ------------------------------------------------------------

def test_pinned_pool_only_uses_its_hosts() -> None:
    hosts = [host(f"h{i}", memory_mib=(i + 1) * 16 * 1024) for i in range(4)]
    pinned = frozenset({hosts[0].id, hosts[1].id})
    placed = place_many(req(allowed_hosts=pinned), hosts, 10)
    assert {p.host for p in placed} == {"h0", "h1"}
    with pytest.raises(NoValidHost) as err:
        place(req(allowed_hosts=frozenset()), hosts)
    assert str(err.value) == ("no host can take a desktop for pool 'lab': 4 hosts are not among "
                              "the pinned hosts (pool 'lab' is pinned to no host)")


def test_incompatible_template_finds_no_host() -> None:
    hosts = [host("t1", hypervisor="TEST"), host("t2", hypervisor="TEST")]
    with pytest.raises(NoValidHost) as err:
        place(req(hypervisors=frozenset({"QEMU"})), hosts)
    assert isinstance(err.value, Conflict)
    assert err.value.rejected == {"compatibility": 2}
    assert str(err.value) == ("no host can take a desktop for pool 'lab': 2 hosts are "
                              "incompatible (t1 runs TEST, the template needs QEMU)")
    # A template that does not say what it needs runs anywhere.
    assert place(req(), hosts).host == "t1"


# --- no valid host ------------------------------------------------------------------------

def test_no_valid_host_names_each_filter_with_an_example() -> None:
    hosts = [
        host("h1", state="draining"),
        host("h2", state="maintenance"),
        host("h3", state="down", reachable=False),
        host("h4", memory_mib=1024, used_memory_mib=900),
        host("h5", memory_mib=1024, used_memory_mib=1000),
        host("h6", max_desktops=2, desktops=2),
    ]
    with pytest.raises(NoValidHost) as err:
        place(req(memory_mib=512), hosts)
    assert str(err.value) == (
        "no host can take a desktop for pool 'lab': 3 hosts are not enabled (h1 is draining), "
        "2 lack memory (h4: 900 of 1024 MiB used, 512 asked), 1 is full (h6 has 2 of 2 desktops)"
    )
    assert err.value.rejected == {"state": 3, "memory": 2, "desktops": 1}
    assert err.value.placed == ()


def test_no_hosts_at_all() -> None:
    with pytest.raises(NoValidHost) as err:
        place(req(), [])
    assert str(err.value) == "no host can take a desktop for pool 'lab': there are no hosts"


def test_place_many_reports_what_it_placed_before_running_out() -> None:
    hosts = [host("a", vcpus=1, memory_mib=2048), host("b", vcpus=1, memory_mib=2048)]
    with pytest.raises(NoValidHost) as err:
        place_many(req(), hosts, 5)  # each holds 2 (vCPUs: 1 x 4 / 2)
    assert len(err.value.placed) == 4
    assert str(err.value) == ("no host can take a desktop for pool 'lab': 2 hosts lack vCPUs "
                              "(a: 4 of 4 vCPUs used, 2 asked) (after placing 4 of 5 desktops)")


def test_place_many_edge_counts() -> None:
    assert place_many(req(), [], 0) == []
    with pytest.raises(InvalidInput):
        place_many(req(), [host("a")], -1)


# --- determinism --------------------------------------------------------------------------

def test_ties_go_to_the_first_host_by_name_whatever_the_input_order() -> None:
    hosts = [host(n) for n in ("delta", "alpha", "charlie", "bravo")]
    for seed in range(5):
        random.Random(seed).shuffle(hosts)
        assert place(req(), hosts).host == "alpha"
        assert [p.host for p in place_many(req(), hosts, 4)] == \
            ["alpha", "bravo", "charlie", "delta"]


def test_place_many_equals_repeated_place() -> None:
    rng = random.Random(7)
    hosts = [host(f"h{i:02}", vcpus=rng.choice([4, 8, 16]),
                  memory_mib=rng.choice([8, 16, 32]) * 1024,
                  max_desktops=rng.choice([None, 5, 12]), desktops=rng.randint(0, 3))
             for i in range(12)]
    for strategy in Strategy:
        r = req(strategy=strategy)
        many = place_many(r, hosts, 40)
        state = {h.id: h for h in hosts}
        for p in many:
            one = place(r, list(state.values()))
            assert one == p
            state[p.host_id] = consume(state[p.host_id], r)


# --- the profile holder (roaming profiles across hosts) ----------------------------------


def test_among_equal_hosts_the_one_holding_the_users_profile_wins() -> None:
    a, b, c = host("a"), host("b"), host("c")
    plain = place(req(), [a, b, c])
    assert plain.host == "a"  # ties go to the first by name
    chosen = place(req(preferred_hosts=frozenset({c.id})), [a, b, c])
    assert chosen.host == "c" and "holds the user's profile" in chosen.reason


def test_the_profile_holder_does_not_outweigh_the_strategy() -> None:
    """A full holder loses to an empty host under SPREAD: copying a few layers is cheaper
    than an overloaded host."""
    empty, busy = host("empty"), host("busy", used_vcpus=40, used_memory_mib=40 * 1024,
                                        desktops=20)
    chosen = place(req(preferred_hosts=frozenset({busy.id})), [busy, empty])
    assert chosen.host == "empty" and "would copy the user's profile" in chosen.reason
