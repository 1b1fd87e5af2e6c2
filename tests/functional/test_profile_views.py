"""Roaming profiles as the admin and the user see them, through the API and the CLI: size,
generations, the last write-back (bytes and seconds), open sessions, reset and rollback
(audited), and clear errors for a user without a profile or a generation not kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from deskpool.broker.handover import Broker
from tests.broker_world import BrokerWorld
from tests.functional import test_profile_logon as logon_world
from tests.functional.test_profile_logon import ANN, log_off_and_recycle

# The profile-logon tests' fixtures: a roaming pool on the fake host, a scripted hook.
world, hook = logon_world.world, logon_world.hook
DESKPOOL = Path(sys.executable).parent / "deskpool"


def cli(w: BrokerWorld, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(w.ctx.settings.data_dir)}
    return subprocess.run([str(DESKPOOL), *args], capture_output=True, text=True, env=env,
                          check=False, timeout=120)


def test_profiles_are_shown_reset_and_rolled_back_through_api_and_cli(
        world: BrokerWorld, hook: logon_world.Hook) -> None:
    admin = world.client(world.user("root-admin", admin=True))
    ann = world.client(world.user("ann", groups=("staff",)))
    assert ann.get("/api/v1/profile").status_code == 404  # none before the first logon
    assert "ann has no roaming profile yet" in ann.get("/api/v1/profile").text

    handover = Broker(world.ctx).connect(ANN, "lab")
    assert handover.desktop_id is not None
    shown = admin.get("/api/v1/admin/profiles/ann").json()
    assert shown["open_sessions"] == [handover.desktop] and shown["generation"] == 1
    log_off_and_recycle(world, handover.desktop_id)

    mine = ann.get("/api/v1/profile")
    assert mine.status_code == 200, mine.text
    view = mine.json()
    assert (view["generation"], view["generations_kept"], view["open_sessions"]) == (2, 2, [])
    assert view["committed_at"] is not None and view["last_writeback_s"] >= 0
    assert view["last_writeback_bytes"] > 0 and view["rollback_to"] == [1]
    assert [p["user"] for p in admin.get("/api/v1/admin/profiles").json()] == ["ann"]
    assert ann.get("/api/v1/admin/profiles").status_code == 403

    reset = admin.post("/api/v1/admin/profiles/ann/reset")
    assert reset.status_code == 200, reset.text
    assert reset.json()["generation"] == 3 and reset.json()["rollback_to"] == [1, 2]
    bad = admin.post("/api/v1/admin/profiles/ann/rollback", json={"generation": 9})
    assert bad.status_code in (400, 404) and "generation 9" in bad.text
    assert admin.post("/api/v1/admin/profiles/ann/rollback",
                      json={"generation": 0}).status_code == 422
    back = admin.post("/api/v1/admin/profiles/ann/rollback", json={"generation": 2})
    assert back.status_code == 200 and back.json()["generation"] == 4
    audit = admin.get("/api/v1/admin/audit").json()
    assert {"profile.reset", "profile.rollback"} <= {e["action"] for e in audit}

    listed = cli(world, "profile", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ann" in listed.stdout and "4" in listed.stdout
    one = cli(world, "profile", "show", "ann")
    assert one.returncode == 0 and "generation 4" in one.stdout, one.stdout + one.stderr
    missing = cli(world, "profile", "show", "nobody")
    assert missing.returncode != 0 and "nobody has no roaming profile yet" in (
        missing.stdout + missing.stderr)
