"""CLI for hosts: add one with its limits, list them with capacity and use, put them in host
sets and switch a set's load balancing, drain, enable."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out, services, spinner
from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import DomainType
from deskpool.services.audit import Actor
from deskpool.services.hosts import HostLimits, HostService

host_app = typer.Typer(help="Hypervisor hosts.", no_args_is_help=True)
_DURATION = re.compile(r"^(\d+)([smhd]?)$")


def parse_duration(text: str) -> timedelta:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``."""
    found = _DURATION.match(text.strip())
    if not found:
        raise InvalidInput(f"duration {text!r} is not a number with s, m, h or d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]
    return timedelta(seconds=int(found.group(1)) * unit)


@host_app.command("add")
def host_add(
    name: str,
    uri: Annotated[str, typer.Argument(help="libvirt URI, e.g. qemu:///system")],
    domain_type: Annotated[DomainType, typer.Option(help="auto probes whether KVM boots guests")]
    = DomainType.AUTO,
    storage_dir: Annotated[Path | None, typer.Option(help="deskpool storage on that host")]
    = None,
    cpu_overcommit: Annotated[float, typer.Option(help="vCPUs per physical CPU")] = 4.0,
    memory_overcommit: Annotated[float, typer.Option(help="guest MiB per host MiB")] = 1.0,
    max_desktops: Annotated[int | None, typer.Option(help="at most this many desktops")] = None,
    max_provisioning: Annotated[int, typer.Option(help="desktops made at once")] = 2,
    transfer_slots: Annotated[int, typer.Option(help="image transfers at once")] = 2,
    shared_storage: Annotated[str | None, typer.Option(
        help="name of the shared storage its storage dir is on (HA restart between hosts "
             "of one name)")] = None,
    host_set: Annotated[str | None, typer.Option(
        "--set", help="its host set (default: none, the default set)")] = None,
) -> None:
    """Register a hypervisor host (its URI must answer); its capacity is read from it."""
    limits = HostLimits(cpu_overcommit, memory_overcommit, max_desktops, max_provisioning,
                        transfer_slots)
    with services() as ctx, spinner(f"connecting to {uri}"):
        host = HostService(ctx).add(name, uri, domain_type=domain_type,
                                    storage_dir=storage_dir, limits=limits,
                                    shared_storage=shared_storage, host_set=host_set,
                                    actor=Actor.local())
    out.print(f"host [bold]{host.name}[/] added ({host.uri}: {host.hypervisor}, "
              f"{host.vcpus} CPUs, {host.memory_mib} MiB, storage {host.storage_dir})")


@host_app.command("shared-storage")
def host_shared_storage(
    name: str,
    storage: Annotated[str, typer.Argument(
        help="the shared storage's name, or 'none' for the host's own storage")],
) -> None:
    """Say which shared storage a host's storage directory is on: hosts of one name mount it
    at the same path, and a lost host's stateful desktops restart on the others."""
    with services() as ctx:
        host = HostService(ctx).set_shared_storage(
            name, None if storage == "none" else storage, actor=Actor.local())
    out.print(f"host [bold]{host.name}[/]: storage {host.shared_storage or 'its own'}")


@host_app.command("list")
def host_list() -> None:
    """List hosts with their state, capacity, limits and desktops."""
    with services() as ctx:
        hosts = HostService(ctx).list()
    table = Table("name", "uri", "state", "set", "hypervisor", "CPUs", "memory MiB",
                  "desktops", "limits", "storage", "last error")
    for h in hosts:
        limit = f"cpu x{h.cpu_overcommit:g} mem x{h.memory_overcommit:g}" + (
            f" max {h.max_desktops}" if h.max_desktops is not None else "")
        state = h.state + (f" until {h.drain_deadline:%H:%M}" if h.drain_deadline else "")
        table.add_row(h.name, h.uri, state, set_label(h.host_set, h.set_balances),
                      f"{h.hypervisor} ({h.domain_type})",
                      str(h.vcpus), str(h.memory_mib), str(h.desktops), limit,
                      f"shared: {h.shared_storage}" if h.shared_storage else "own",
                      h.last_error or "")
    out.print(table)


def set_label(host_set: str | None, balances: bool) -> str:
    return (host_set or "(default)") + (", balanced" if balances else "")


@host_app.command("update")
def host_update(
    name: str,
    host_set: Annotated[str | None, typer.Option("--set", help="put it in this host set")]
    = None,
    default_set: Annotated[bool, typer.Option(
        "--default-set", help="take it out of its set, into the default set")] = False,
) -> None:
    """Change a host's host set (balancing moves never leave a set)."""
    if (host_set is None) == (not default_set):
        raise InvalidInput("give one of --set NAME or --default-set")
    with services() as ctx:
        host = HostService(ctx).set_host_set(name, host_set, actor=Actor.local())
    out.print(f"host [bold]{name}[/] is in host set "
              f"{set_label(host.host_set, host.set_balances)}")


@host_app.command("sets")
def host_sets() -> None:
    """List host sets with their balancing switch and hosts."""
    with services() as ctx:
        sets = HostService(ctx).sets()
    table = Table("set", "balancing", "hosts")
    for s in sets:
        table.add_row(s.name, "on" if s.balance else "off", ", ".join(s.hosts))
    out.print(table)


@host_app.command("set-balance")
def host_set_balance(
    host_set: Annotated[str, typer.Argument(metavar="SET", help="the host set's name")],
    on: Annotated[bool, typer.Option("--on/--off", help="balancing on or off")] = True,
) -> None:
    """Let the load balancer move any running desktop on a host set's hosts (within the
    set), whatever its pool says; --off leaves it to the pools' own switches."""
    with services() as ctx:
        found = HostService(ctx).set_balance(host_set, on, actor=Actor.local())
    out.print(f"host set [bold]{found.name}[/] balancing is {'on' if found.balance else 'off'} "
              f"({len(found.hosts)} hosts)")


@host_app.command("drain")
def host_drain(
    name: str,
    grace: Annotated[str, typer.Option(help="users are logged off after this (e.g. 30m)")]
    = "30m",
    wait: Annotated[bool, typer.Option(help="show progress until maintenance")] = False,
) -> None:
    """No new desktops or sessions; free desktops move away; users warned, then logged off."""
    with services() as ctx:
        service = HostService(ctx)
        before = service.get(name)
        host = service.drain(name, grace=parse_duration(grace), actor=Actor.local())
        if before.state == "draining" and before.drain_deadline is not None:
            # A second drain only moves the deadline: the moves under way go on, once each.
            out.print(f"host [bold]{name}[/] was draining already ({before.desktops} "
                      f"desktops left); its deadline moves from "
                      f"{before.drain_deadline:%H:%M:%S} to {host.drain_deadline:%H:%M:%S} "
                      "UTC, the desktops moving now are not moved again")
        else:
            out.print(f"host [bold]{name}[/] is draining; sessions end by "
                      f"{host.drain_deadline:%H:%M:%S} UTC")
        if not wait:
            return
        with out.status("draining") as status:
            while host.state == "draining":
                time.sleep(2)
                host = service.get(name)
                status.update(f"draining {name}: {host.desktops} desktops left")
        out.print(f"host [bold]{name}[/] is {host.state}")


@host_app.command("enable")
def host_enable(name: str) -> None:
    """Back in service: the host takes desktops and sessions again."""
    with services() as ctx:
        HostService(ctx).enable(name, actor=Actor.local())
    out.print(f"host [bold]{name}[/] is enabled")


@host_app.command("remove")
def host_remove(name: str) -> None:
    """Forget an empty host (refused while desktops are on it or pools are pinned to it)."""
    with services() as ctx:
        HostService(ctx).remove(name, actor=Actor.local())
    out.print(f"host [bold]{name}[/] removed")
