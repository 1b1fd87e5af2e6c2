"""Every input bounded at the edge: a pool setting that would stop the reconciler or the
session timers for everyone (0, negative, huge, NaN), a name outside its alphabet, an empty
URI, a number no database column holds, are refused with a 422 naming the field, and a
refused request creates and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deskpool.api.limits import MAX_BODY, MAX_CHUNKS_BODY
from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from tests.broker_world import BrokerWorld, make_world

ADMIN = "/api/v1/admin"
HUGE = 10**12  # no int32 column holds it, and no datetime is that many seconds away


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab")
    w.user("root", admin=True)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def raw_json(client: Any, method: str, url: str, text: str) -> Any:
    """NaN and Infinity are not JSON, but Python's parser reads them: send them as text."""
    return client.request(method, url, content=text.encode(),
                          headers={"content-type": "application/json"})


def pool_names(world: BrokerWorld) -> list[str]:
    return sorted(p.name for p in PoolService(world.ctx).list())


@pytest.mark.parametrize(("field", "value"), [
    ("reservation_timeout_s", "0"), ("reservation_timeout_s", "-5"),
    ("reservation_timeout_s", str(HUGE)), ("reservation_timeout_s", "NaN"),
    ("idle_timeout_s", "0"), ("idle_timeout_s", "Infinity"),
    ("disconnect_timeout_s", "-1"), ("session_start_timeout_s", str(HUGE)),
    ("max_age_s", "0"), ("max_size", "-1"), ("max_size", str(HUGE)), ("spare", "1.5"),
    ("canary", "NaN"), ("kind", '"stateles"'), ("power_policy", '"hibernate"'),
    ("placement", '"random"'), ("name", '"Lab Two"'), ("name", '""'), ("name", '"a/b"'),
    ("template", '"../golden"'), ("hosts", '["Not A Host"]'),
])
def test_a_bad_pool_setting_is_a_422_naming_it_and_creates_nothing(
        world: BrokerWorld, field: str, value: str) -> None:
    body = {"name": "lab2", "template": "golden", "naming_pattern": "lab2-{n:02}"}
    text = "{" + ", ".join(f'"{k}": "{v}"' for k, v in body.items() if k != field)
    text += f', "{field}": {value}' + "}"
    answer = raw_json(world.client("root"), "POST", f"{ADMIN}/pools", text)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    assert pool_names(world) == ["lab"]


@pytest.mark.parametrize(("field", "value"), [
    ("reservation_timeout_s", "0"), ("idle_timeout_s", "-1"), ("idle_timeout_s", "NaN"),
    ("disconnect_timeout_s", str(HUGE)), ("session_start_timeout_s", "0"),
    ("max_age_s", "-3600"), ("max_size", str(HUGE)), ("spare", "null"),
    ("reservation_timeout_s", "null"),
])
def test_a_bad_pool_update_is_a_422_naming_it_and_changes_nothing(
        world: BrokerWorld, field: str, value: str) -> None:
    before = PoolService(world.ctx).get("lab")
    # One good setting with the bad one: the request is refused whole.
    text = f'{{"min_size": 1, "{field}": {value}}}'
    answer = raw_json(world.client("root"), "PATCH", f"{ADMIN}/pools/lab", text)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    assert PoolService(world.ctx).get("lab") == before


def test_resizing_beyond_any_bound_is_a_422(world: BrokerWorld) -> None:
    admin = world.client("root")
    for body in ({"max_size": HUGE}, {"spare": -1}, {"min_size": None}, {"size": 3}):
        answer = admin.post(f"{ADMIN}/pools/lab/resize", json=body)
        assert answer.status_code == 422, (body, answer.text)
    assert PoolService(world.ctx).get("lab").max_size == 4


@pytest.mark.parametrize(("field", "value"), [
    ("uri", '""'), ("uri", '"fake"'), ("uri", '"http://example.com"'),
    ("uri", '"qemu:///system extra"'), ("name", '"Bad Host"'),
    ("cpu_overcommit", "NaN"), ("memory_overcommit", "Infinity"), ("cpu_overcommit", "0"),
    ("max_desktops", str(HUGE)), ("max_provisioning", "0"), ("transfer_slots", "-1"),
])
def test_a_bad_host_is_a_422_naming_the_field_and_adds_nothing(
        world: BrokerWorld, field: str, value: str) -> None:
    body = {"name": "h2", "uri": "fake://h2"}
    text = "{" + ", ".join(f'"{k}": "{v}"' for k, v in body.items() if k != field)
    text += f', "{field}": {value}' + "}"
    answer = raw_json(world.client("root"), "POST", f"{ADMIN}/hosts", text)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    assert [h.name for h in HostService(world.ctx).list()] == ["h1"]  # the world's one host


def test_bad_names_in_paths_and_numbers_beyond_columns_are_422(world: BrokerWorld) -> None:
    admin = world.client("root")
    for method, url in (("GET", f"{ADMIN}/pools/Lab%20Two"),
                        ("DELETE", f"{ADMIN}/templates/golden/versions/{HUGE}"),
                        ("DELETE", f"{ADMIN}/templates/golden/versions/0"),
                        ("GET", f"{ADMIN}/events?limit={HUGE}"),
                        ("GET", f"{ADMIN}/users/%00root")):
        answer = admin.request(method, url)
        assert answer.status_code == 422, (url, answer.text)
    assert PoolService(world.ctx).get("lab").status == "enabled"


def test_user_and_group_names_and_empty_paths_are_checked_at_the_edge(
        world: BrokerWorld) -> None:
    admin = world.client("root")
    answer = admin.post(f"{ADMIN}/users", json={"name": "bob", "password": "long-enough-1",
                                                "groups": ["staff", "bad group"]})
    assert answer.status_code == 422 and "groups" in answer.json()["detail"]
    assert admin.get(f"{ADMIN}/users/bob").status_code == 404  # nothing created, not even bob
    answer = admin.post(f"{ADMIN}/templates/golden/versions", json={"image": "/x.qcow2",
                                                                    "kernel": ""})
    assert answer.status_code == 422 and "kernel" in answer.json()["detail"]


def test_pool_settings_that_would_stop_the_loops_are_refused_by_the_cli_path_too() -> None:
    """``deskpool pool create/update`` build a PoolSpec: the same bounds, named."""
    for kw, needle in (({"reservation_timeout_s": 0}, "reservation_timeout_s (0)"),
                       ({"idle_timeout_s": HUGE}, "idle_timeout_s"),
                       ({"disconnect_timeout_s": -1}, "disconnect_timeout_s (-1)"),
                       ({"max_size": HUGE}, "max_size"),
                       ({"name": "Lab"}, "pool name 'Lab'"),
                       ({"naming_pattern": "a" * 60 + "{n}"}, "names up to n=999999")):
        spec = PoolSpec(**{"name": "lab", "template": "golden", **kw})  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=needle.replace("(", r"\(").replace(")", r"\)")):
            spec.validate()


@pytest.mark.parametrize(("name", "value"), [
    ("reconcile_interval_s", 0), ("reconcile_interval_s", -1),
    ("reconcile_interval_s", float("nan")), ("timers_interval_s", 0),
    ("timers_interval_s", float("inf")), ("timers_interval_s", 1e9),
    ("ready_timeout_s", 0), ("host_down_after_s", float("nan")), ("lease_s", 0),
])
def test_loop_settings_that_would_stop_the_loops_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=name):
        Settings(**{name: value})  # type: ignore[arg-type]


def test_a_body_past_the_limit_is_refused_whole(world: BrokerWorld) -> None:
    admin = world.client("root")
    huge = {"name": "lab2", "template": "golden", "naming_pattern": "lab2-{n:02}",
            "padding": "x" * (MAX_BODY + 1)}
    answer = admin.post(f"{ADMIN}/pools", json=huge)
    assert answer.status_code == 413 and "larger than" in answer.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"name": "lab2", "template": "golden", "notes": "'
        for _ in range(MAX_BODY // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    answer = admin.post(f"{ADMIN}/pools", content=chunks(),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert pool_names(world) == ["lab"]
    assert admin.get(f"{ADMIN}/pools/lab").status_code == 200  # the app still answers


def test_only_a_batch_of_check_in_chunks_may_be_larger(world: BrokerWorld) -> None:
    """A laptop's chunks may be up to 8 MiB a request; past that, and on every other
    route past 1 MiB, the 413 names the limit that applies."""
    alice = world.client(world.user("alice", entitled_to=("lab",)))
    route = "/api/v1/offline/desktops/lab-01/transfer/chunks?laptop=l1&indexes=0"
    answer = alice.put(route, content=b"x" * (MAX_BODY + 1))
    assert answer.status_code != 413, answer.text  # judged by the offline service instead
    answer = alice.put(route, content=b"x" * (MAX_CHUNKS_BODY + 1))
    assert answer.status_code == 413
    assert answer.json()["detail"] == f"the request body is larger than {MAX_CHUNKS_BODY} bytes"
    answer = alice.put("/api/v1/offline/desktops/lab-01/transfer/chunks/0?laptop=l1",
                       content=b"x" * (MAX_BODY + 1))  # a single chunk keeps the 1 MiB cap
    assert answer.status_code == 413
    assert answer.json()["detail"] == f"the request body is larger than {MAX_BODY} bytes"

