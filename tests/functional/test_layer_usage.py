"""How full a desktop's user layer is, as its guest measures it at logoff: stored as the
desktop's layer status, and a nearly full layer told to the administrator (the guest's answer
stubbed: the fake guest runs no ``df``)."""

from __future__ import annotations

import pytest

from deskpool.domain.errors import DriverError
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.events import recent_events
from deskpool.services.layer_usage import measure_layer, parse_usage, try_measure_layer
from deskpool.services.user_layers import UserLayerViews
from tests.functional import test_vm_crash as crash_world
from tests.functional.test_user_layer_pools import layered

ctx, fake, clock, reconciler = (crash_world.ctx, crash_world.fake, crash_world.clock,
                                crash_world.reconciler)
MiB = 2**20


def df_says(monkeypatch: pytest.MonkeyPatch, used_mib: int, files: int) -> None:
    out = (f"/dev/vdb {128 * MiB} {used_mib * MiB} {(128 - used_mib) * MiB} 50% "
           f"/run/deskpool/layer\n{files}\n")
    monkeypatch.setattr(GuestAgent, "exec_capture", lambda self, argv, **kw: (0, out, ""))


def test_the_layer_status_is_stored_and_a_nearly_full_layer_is_told(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    desktop_id = layered(ctx, reconciler)
    df_says(monkeypatch, used_mib=40, files=12)
    usage = measure_layer(ctx, fake, desktop_id, 1)
    assert (usage.used_bytes, usage.changed_files) == (40 * MiB, 12)
    view = UserLayerViews(ctx).desktop_layer(desktop_id)
    assert (view.layer_version, view.layer_bytes, view.changed_files) == (1, 40 * MiB, 12)
    assert not [e for e in recent_events(ctx) if e.kind == "layer-nearly-full"]

    df_says(monkeypatch, used_mib=120, files=900)
    measure_layer(ctx, fake, desktop_id, 1)
    (told,) = [e for e in recent_events(ctx) if e.kind == "layer-nearly-full"]
    assert "94% full (120 of 128 MiB)" in told.message and told.user == "alice"


def test_a_guest_that_cannot_tell_changes_nothing(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    desktop_id = layered(ctx, reconciler)
    monkeypatch.setattr(GuestAgent, "exec_capture",
                        lambda self, argv, **kw: (0, "df: no such mount\n", ""))
    assert try_measure_layer(ctx, fake, desktop_id, 1) is None
    assert UserLayerViews(ctx).desktop_layer(desktop_id).layer_bytes is None


def test_unreadable_measures_are_named() -> None:
    with pytest.raises(DriverError, match="unreadable"):
        parse_usage("/dev/vdb lots\n")
