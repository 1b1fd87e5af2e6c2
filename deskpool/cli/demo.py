"""``deskpool demo``: the main job. A broker with a demo pool on the embedded database.

Builds the desktop-flavor guest image if missing (so a newcomer's Connect shows a graphical
greeter, not a text console), registers the local libvirt host and the demo template,
creates the ``demo`` pool (one spare desktop kept warm), a user entitled to it and an admin,
then runs the broker (portal, API, console proxy, reconciler, session timers) in the
foreground. Idempotent: a second run reuses everything, including the passwords it made.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.cli.progress import build_with_progress
from deskpool.daemon import serve
from deskpool.domain.errors import Conflict
from deskpool.domain.pools import PoolSpec
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

DEMO_HOST, DEMO_URI = "local", "qemu:///system"
DEMO_TEMPLATE, DEMO_POOL = "demo", "demo"
DEMO_USER, DEMO_ADMIN = "demo", "admin"


def _credentials(ctx: ServiceContext) -> dict[str, str]:
    """The demo users' passwords: made once, kept (mode 0600) in the data directory."""
    path: Path = ctx.settings.data_dir / "demo-credentials"
    if path.is_file():
        return dict(line.split(" ", 1) for line in path.read_text().splitlines() if line)
    made = {DEMO_USER: secrets.token_urlsafe(9), DEMO_ADMIN: secrets.token_urlsafe(12)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{user} {password}\n" for user, password in made.items()))
    return made


def prepare_demo(ctx: ServiceContext, out: Console) -> dict[str, str]:
    image = build_with_progress(out, ctx.settings.image_cache_dir, flavor=Flavor.DESKTOP)
    out.print(f"{image.flavor} guest image {image.recipe_hash[:12]} ready at {image.directory}")
    hosts = HostService(ctx)
    if DEMO_HOST not in {h.name for h in hosts.list()}:
        with out.status(f"connecting to {DEMO_URI}"):
            hosts.add(DEMO_HOST, DEMO_URI)
    templates = TemplateService(ctx)
    if templates.find_published(DEMO_TEMPLATE, image.disk_sha256) is None:
        with out.status("publishing the demo template"):
            templates.publish(DEMO_TEMPLATE, ImageFiles.from_guest_image(image),
                              recipe_hash=image.recipe_hash, arch="x86_64",
                              memory_mib=image.memory_mib)
    pools = PoolService(ctx)
    demo_pool = next((p for p in pools.list() if p.name == DEMO_POOL), None)
    if demo_pool is None:
        pools.create(PoolSpec(name=DEMO_POOL, template=DEMO_TEMPLATE, spare=1, max_size=3,
                              naming_pattern="desk-{n:03}"))
    else:
        # A newer deskpool built a newer image: the demo's desktops move to it (free ones now,
        # held ones as their users leave), as an admin's rollout does.
        latest = max(v.number for v in templates.list_versions() if v.template == DEMO_TEMPLATE)
        if demo_pool.version != latest:
            pools.rollout(DEMO_POOL)
            out.print(f"pool {DEMO_POOL}: rolling out version {latest} of {DEMO_TEMPLATE}")
    credentials = _credentials(ctx)
    accounts = AccountService(ctx)
    known = {u.name for u in accounts.list_users()}
    if DEMO_USER not in known:
        accounts.create_user(DEMO_USER, credentials[DEMO_USER], display_name="Demo User")
    if DEMO_ADMIN not in known:
        accounts.create_user(DEMO_ADMIN, credentials[DEMO_ADMIN], is_admin=True)
    with contextlib.suppress(Conflict):  # granted by an earlier run
        EntitlementService(ctx).grant(DEMO_POOL, "user", DEMO_USER)
    return credentials


def run_demo(ctx: ServiceContext, out: Console) -> None:
    credentials = prepare_demo(ctx, out)
    s = ctx.settings
    memory_mib = recipe_for(Flavor.DESKTOP).memory_mib
    url = f"http://{s.listen_host}:{s.listen_port}/"
    out.print(Panel.fit(
        f"portal:  {url}  sign in as [bold]{DEMO_USER}[/] / {credentials[DEMO_USER]}\n"
        f"admin:   {url}admin  as [bold]{DEMO_ADMIN}[/] / {credentials[DEMO_ADMIN]}\n"
        f"API:     {url}docs (OpenAPI)\n"
        f"pool [bold]{DEMO_POOL}[/]: one Xfce desktop kept ready, {memory_mib} MiB each "
        "(the first boot to the greeter takes a minute or two under TCG)\n"
        f"consoles: noVNC in the browser through websockify on port {s.console_port}; "
        f"remote-viewer with the portal's .vv file, through the SPICE proxy on port "
        f"{s.spice_proxy_port}; xfreerdp with its .rdp file and one-time password, "
        f"through the RDP proxy on port {s.rdp_proxy_port}\n"
        "stop with Ctrl-C; passwords are kept in "
        f"{s.data_dir / 'demo-credentials'}",
        title="deskpool demo broker"))
    serve(ctx, host=s.listen_host, port=s.listen_port, console_port=s.console_port)
