"""``deskpool demo``: the main job for now. Idempotent: a second run reuses what the first made."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel

from deskpool.cli.progress import build_with_progress
from deskpool.domain.errors import NotFound
from deskpool.lifecycle.context import ServiceContext
from deskpool.lifecycle.desktops import DesktopService
from deskpool.lifecycle.hosts import HostService
from deskpool.lifecycle.states import DesktopState
from deskpool.lifecycle.templates import ImageFiles, TemplateService

DEMO_HOST, DEMO_URI = "local", "qemu:///system"
DEMO_TEMPLATE, DEMO_DESKTOP = "demo", "demo-001"


def run_demo(ctx: ServiceContext, out: Console) -> None:
    image = build_with_progress(out, ctx.settings.image_cache_dir)
    out.print(f"guest image {image.recipe_hash[:12]} ready at {image.directory}")

    hosts = HostService(ctx)
    if DEMO_HOST not in {h.name for h in hosts.list()}:
        with out.status(f"connecting to {DEMO_URI}"):
            hosts.add(DEMO_HOST, DEMO_URI)
    templates = TemplateService(ctx)
    version = templates.find_published(DEMO_TEMPLATE, image.disk_sha256)
    if version is None:
        with out.status("publishing the demo template"):
            version = templates.publish(DEMO_TEMPLATE, ImageFiles.from_guest_image(image),
                                        recipe_hash=image.recipe_hash)
    desktops = DesktopService(ctx)
    try:
        desktop = desktops.get(DEMO_DESKTOP)
        if desktop.state != DesktopState.READY.value:
            desktops.delete(DEMO_DESKTOP)  # a leftover from an interrupted run: start over
            raise NotFound(DEMO_DESKTOP)
    except NotFound:
        with out.status("creating the demo desktop") as status:
            desktop = desktops.create(DEMO_TEMPLATE, name=DEMO_DESKTOP,
                                      progress=lambda step: status.update(step))
    console = desktops.console(DEMO_DESKTOP)
    out.print(Panel.fit(
        f"desktop [bold]{desktop.name}[/] is {desktop.state} on host {desktop.host}\n"
        f"hostname {desktop.hostname}, MAC {desktop.mac}, machine-id {desktop.machine_id}\n"
        f"console: VNC at {console.host}:{console.port} "
        f"(e.g. 'vncviewer {console.host}::{console.port}')\n"
        f"list desktops: .venv/bin/deskpool desktop list\n"
        f"remove it:     .venv/bin/deskpool desktop delete {desktop.name}",
        title="deskpool demo",
    ))
