"""The HTTP edge answers each deskpool error with the status that says what the caller should
do: a temporary error is a 503 (with ``Retry-After`` when it knows how long), a permanent
one keeps its own status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.domain import errors
from deskpool.domain.users import Identity
from deskpool.drivers.registry import forget_fake_hosts
from tests.broker_world import BrokerWorld, make_world


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    w.pool("lab", spare=0)
    w.user("alice", entitled_to=("lab",))
    yield w
    w.ctx.close()
    forget_fake_hosts()


Answer = tuple[int, dict[str, str], str]  # status, headers, detail


def connect_raising(world: BrokerWorld, error: errors.DeskpoolError) -> Answer:
    """Alice's connect to pool ``lab`` when the broker raises ``error``."""
    client = world.client("alice")

    def raising(user: Identity, pool: str, **_kw: object) -> None:
        raise error

    client.app.state.services.broker.connect = raising  # type: ignore[attr-defined]
    answer = client.post("/api/v1/pools/lab/connect")
    return answer.status_code, dict(answer.headers), answer.json()["detail"]


@pytest.mark.parametrize(("delay", "retry_after"), [(30.0, "30"), (2.2, "3"), (0.0, "0")])
def test_a_temporary_error_that_knows_its_delay_says_when_to_retry(
        world: BrokerWorld, delay: float, retry_after: str) -> None:
    status, headers, detail = connect_raising(
        world, errors.TemporaryError("pool 'lab' is being rolled out", delay=delay))
    assert (status, headers.get("retry-after")) == (503, retry_after)
    assert detail == "pool 'lab' is being rolled out"


def test_an_exhausted_pool_is_a_503_with_retry_after_only_when_known(
        world: BrokerWorld) -> None:
    status, headers, detail = connect_raising(world, errors.PoolExhausted("pool 'lab' is full"))
    assert (status, detail) == (503, "pool 'lab' is full") and "retry-after" not in headers
    status, headers, _ = connect_raising(
        world, errors.PoolExhausted("pool 'lab' is full", delay=60))
    assert (status, headers.get("retry-after")) == (503, "60")


@pytest.mark.parametrize(("error", "status"), [
    (errors.Unavailable("the directory did not answer"), 503),
    (errors.HypervisorUnreachable("cannot reach the host"), 503),
    (errors.AgentUnavailable("the guest agent is silent"), 502),  # a DriverError first
    (errors.DriverError("the hypervisor refused"), 502),
    (errors.NotFound("no such pool"), 404),
    (errors.Forbidden("not yours"), 403),
    (errors.AuthenticationFailed("who are you"), 401),
    (errors.Conflict("name in use"), 409),
    (errors.LostRace("someone else was first"), 409),
    (errors.InvalidInput("bad name"), 400),
    (errors.PermanentError("cannot be done"), 500),
    (errors.DeskpoolError("something of ours"), 500),
])
def test_every_other_error_keeps_its_status_and_has_no_retry_after(
        world: BrokerWorld, error: errors.DeskpoolError, status: int) -> None:
    answered, headers, detail = connect_raising(world, error)
    assert (answered, detail) == (status, str(error)) and "retry-after" not in headers
