"""The offline admin commands of the CLI (``deskpool offline admin`` and ``pool --offline``), run
in-process with Typer's CliRunner on the broker world's own database and fake host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli.common import out
from deskpool.cli.main import app
from deskpool.domain.errors import DeskpoolError
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.audit import audit_log
from deskpool.services.offline import OfflineService
from deskpool.services.pools import PoolService
from tests.broker_world import BrokerWorld, make_world

API = "/api/v1"


def invoke(*args: str, exit_code: int = 0) -> str:
    """What the command printed; for a refusal, the error it raised (``main`` prints it)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == exit_code, (args, result.output, result.exception)
    if exit_code:
        assert isinstance(result.exception, DeskpoolError), result.exception
        return str(result.exception)
    return result.output


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the CLI's database
    monkeypatch.setattr(out, "width", 300)
    said = invoke("pool", "create", "home", "--template", "golden", "--kind", "stateful",
                  "--assignment", "dedicated", "--on-logout", "recycle-as-is", "--max", "2",
                  "--spare", "1", "--pattern", "home-{n:02}",
                  "--offline", "may_go_offline=yes,max_days_offline=10,sync_every_days=2")
    assert "offline up to 10 days, syncing every 2" in said
    w.user("alice", entitled_to=("home",))
    w.fill()
    got = w.client("alice").post(f"{API}/pools/home/connect").json()
    w.client("alice").post(f"{API}/desktops/{got['desktop_id']}/logoff")
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def test_pool_offline_setting_is_parsed_changed_in_part_and_refused_clearly(
        world: BrokerWorld) -> None:
    invoke("pool", "update", "home", "--offline", "printing=yes")
    policy = PoolService(world.ctx).get("home").offline
    assert (policy.may_go_offline, policy.printing, policy.max_days_offline) == (True, True, 10)
    bad = invoke("pool", "update", "home", "--offline", "printing=maybe", exit_code=1)
    assert "printing is yes or no" in bad
    unknown = invoke("pool", "update", "home", "--offline", "colour=yes", exit_code=1)
    assert "'colour=yes' is not FIELD=VALUE" in unknown
    assert PoolService(world.ctx).get("home").offline == policy


def test_offline_list_revoke_and_force_checkin(world: BrokerWorld) -> None:
    grant = OfflineService(world.ctx).check_out("alice", "home-01", "alice-laptop")
    listed = invoke("offline", "admin", "list")
    assert "home-01" in listed and "alice-laptop" in listed and "never" in listed
    said = invoke("offline", "admin", "revoke", "home-01")
    assert "revoked the check-out of home-01 to alice-laptop (alice)" in said
    assert OfflineService(world.ctx).revoked_checkouts("alice") == [grant.checkout.id]
    assert "yes" in invoke("offline", "admin", "list").split("alice-laptop")[1]
    again = invoke("offline", "admin", "revoke", "home-01", exit_code=1)
    assert "already revoked" in again
    forced = invoke("offline", "admin", "force-checkin", "home-01")
    assert "back online as of its last sync" in forced
    assert "home-01" not in invoke("offline", "admin", "list")
    entries = audit_log(world.ctx, target="desktop/home-01")
    assert [e.action for e in entries] == ["offline.force-checkin", "offline.revoke"]
    assert all(e.actor.startswith("cli:") and e.address == "local" for e in entries)
    not_out = invoke("offline", "admin", "revoke", "home-01", exit_code=1)
    assert "desktop home-01 is not checked out" in not_out
