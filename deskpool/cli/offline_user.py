"""``deskpool offline ...`` on the laptop: the user's thin client of the broker's offline API.

``desktops``, ``checkout NAME``, ``start NAME``, ``stop NAME``, ``sync NAME``, ``checkin NAME``,
``rollback NAME``, ``status``. Sign in first with ``deskpool client login URL USER`` (the same
token). ``start`` and ``stop`` need no network: the signed lease, the revoked list heard at
the last contact and the password-wrapped key on the laptop are enough. The laptop's files
are in ``--dir`` (see ``deskpool.cli.laptop.store``); transfers resume where a cut (or
Ctrl-C) left them when the command is run again.
"""

from __future__ import annotations

import base64
import shutil
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.table import Table

from deskpool.cli import client as client_cli
from deskpool.cli.common import out
from deskpool.cli.laptop.broker import Broker, BrokerRefused
from deskpool.cli.laptop.local_domain import (
    LocalBoot,
    Opener,
    is_running,
    open_libvirt,
    start_local,
)
from deskpool.cli.laptop.local_domain import stop_local as stop_domain
from deskpool.cli.laptop.store import DesktopRecord, LaptopDir, default_dir, write_private
from deskpool.cli.laptop.transfers import download, progress_bar, upload
from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.offline import OfflineLease, SignedLease, human_date
from deskpool.domain.offline_keys import KeyBinding, UserWrappedKey, wrap_for_user
from deskpool.images.layer_changes import cluster_map
from deskpool.images.layer_delta import BlockManifest, block_manifest, layer_digest
from deskpool.offline.start import authorize_offline_start

offline_app = typer.Typer(
    help="Offline desktops: take your desktop to a laptop (check out, "
    "start with no network, sync, check in). Administrators: "
    "'deskpool offline admin ...'.",
    no_args_is_help=True,
)
MiB = 2**20
SPACE_MARGIN = 64 * MiB  # room for the journal, the manifest and the layer's first writes


def now() -> datetime:
    """The laptop's clock (tests move it)."""
    return datetime.now(UTC)


libvirt_opener: Opener = open_libvirt  # tests hand a stub connection

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="the laptop's offline directory (default: $XDG_DATA_HOME/deskpool/offline)"
    ),
]
LaptopOption = Annotated[
    str | None,
    typer.Option(
        "--laptop", help="this laptop's name (default: the one kept in --dir, first the host name)"
    ),
]
PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="read the password from standard input's first line"),
]
UriOption = Annotated[str, typer.Option("--libvirt-uri", help="the laptop's libvirt")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


def _dir(given: Path | None) -> LaptopDir:
    return LaptopDir(given or default_dir())


def _broker() -> Broker:
    saved = client_cli.signed_in()
    return Broker(saved["url"], saved["token"], notify=lambda text: out.print(text))


def _password(from_stdin: bool, *, confirm: bool = False) -> str:
    """Asked each time, never stored: it unwraps the layer's key on the laptop only."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=confirm)
    if not password:
        raise InvalidInput("the password is empty")
    return password


def _remember_revoked(broker: Broker, laptop: LaptopDir) -> None:
    laptop.save_revoked([str(i) for i in broker.call("GET", "/offline/revoked")])


def _check_space(laptop: LaptopDir, need: int, desktop: str) -> None:
    laptop.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    free = shutil.disk_usage(laptop.root).free
    if free < need + SPACE_MARGIN:
        raise InvalidInput(
            f"{desktop} needs {(need + SPACE_MARGIN) / MiB:.0f} MiB free in {laptop.root} "
            f"and there is {free / MiB:.0f} MiB; free some space (or use --dir elsewhere) and "
            "run the command again: nothing was downloaded"
        )


@offline_app.command("desktops")
def desktops(dir_: DirOption = None) -> None:
    """Your desktops that may go offline, and where each one is."""
    laptop, broker = _dir(dir_), _broker()
    found = broker.call("GET", "/offline/desktops")
    _remember_revoked(broker, laptop)
    table = Table("desktop", "pool", "state", "days offline", "checked out to", "lease until")
    for d in found:
        c = d["checkout"]
        table.add_row(
            d["desktop"],
            d["pool"],
            d["state"],
            str(d["policy"]["max_days_offline"]),
            c["laptop"] if c else "",
            c["lease_expires_at"][:16].replace("T", " ") if c else "",
        )
    out.print(table)


@offline_app.command("checkout")
def checkout(
    desktop: str,
    dir_: DirOption = None,
    laptop_name: LaptopOption = None,
    password_stdin: PasswordStdin = False,
    quiet: QuietOption = False,
) -> None:
    """Check DESKTOP out to this laptop and download it (resumes a cut download)."""
    laptop = _dir(dir_)
    name = laptop.laptop_name(laptop_name)
    broker = _broker()
    record = laptop.find(desktop)
    if record is None:
        offered = {d["desktop"]: d for d in broker.call("GET", "/offline/desktops")}
        if desktop not in offered:
            raise InvalidInput(
                f"{desktop} is not one of your desktops that may go offline; "
                "see 'deskpool offline desktops'"
            )
        wanted = offered[desktop]
        cached = wanted["base_sha256"] and laptop.base(wanted["base_sha256"]).is_file()
        _check_space(laptop, 0 if cached else wanted["base_size"], desktop)
        password = _password(password_stdin, confirm=not password_stdin)
        grant = broker.call("POST", f"/offline/desktops/{desktop}/checkout", json={"laptop": name})
        record = _record_of(grant, name, password)
        laptop.clear_folder(record)  # leftovers of a cut forget: never taken as downloaded
        laptop.save(record)  # the key is handed over once: kept before anything else
        out.print(
            f"checked {desktop} out to {name} until "
            f"{human_date(datetime.fromisoformat(grant['checkout']['lease_expires_at']))}"
        )
    elif record.downloaded:
        out.print(f"{desktop} is already on this laptop; 'deskpool offline start {desktop}'")
        return
    _download_all(broker, laptop, record, quiet)
    out.print(
        f"{desktop} is ready on this laptop: 'deskpool offline start {desktop}' works "
        "with no network"
    )


def _record_of(grant: dict[str, Any], laptop_name: str, password: str) -> DesktopRecord:
    lease = OfflineLease.from_canonical_bytes(SignedLease.from_json(grant["lease"]).lease_bytes)
    binding = KeyBinding(user=lease.user, desktop_id=lease.desktop_id, laptop_id=laptop_name)
    wrapped = wrap_for_user(base64.b64decode(grant["data_key"]), password, binding)
    return DesktopRecord(
        desktop=grant["checkout"]["desktop"],
        desktop_id=str(binding.desktop_id),
        user=binding.user,
        laptop=laptop_name,
        checkout_id=grant["checkout"]["id"],
        lease=grant["lease"],
        wrapped_key=wrapped.to_json(),
        public_key_pem=grant["public_key_pem"],
        base_sha256=grant["base_sha256"],
        base_size=grant["base_size"],
        layer_sha256=grant["layer_sha256"],
        layer_size=grant["layer_size"],
        policy=lease.policy.to_dict(),
    )


def _download_all(broker: Broker, laptop: LaptopDir, record: DesktopRecord, quiet: bool) -> None:
    base, layer = laptop.base(record.base_sha256), laptop.layer(record)
    need = (0 if base.is_file() else record.base_size) + record.layer_size
    _check_space(laptop, need, record.desktop)
    params = {"laptop": record.laptop}
    try:
        with progress_bar(quiet) as progress:
            download(
                broker,
                f"/offline/desktops/{record.desktop}/base",
                base,
                size=record.base_size,
                sha256=record.base_sha256,
                what=f"base {record.base_sha256[:12]}",
                params=params,
                progress=progress,
            )
            download(
                broker,
                f"/offline/desktops/{record.desktop}/layer",
                layer,
                size=record.layer_size,
                sha256=record.layer_sha256,
                what=f"layer of {record.desktop}",
                params=params,
                progress=progress,
                digest=layer_digest,
            )
            _download_machine(broker, laptop, record, progress)
    except KeyboardInterrupt:
        out.print(f"paused: 'deskpool offline checkout {record.desktop}' resumes the download")
        raise typer.Exit(130) from None
    _synced(laptop, record, block_manifest(layer), cluster_map(layer))
    record.downloaded = True
    laptop.save(record)


def _download_machine(broker: Broker, laptop: LaptopDir, record: DesktopRecord,
                      progress: Any) -> None:
    """The machine the desktop runs as, and its kernel and initrd when it boots by direct
    kernel boot (cached by checksum, resumable like the base)."""
    params = {"laptop": record.laptop}
    machine = broker.call("GET", f"/offline/desktops/{record.desktop}/machine", params=params)
    for which in ("kernel", "initrd"):
        found = machine.get(which)
        if found:
            download(broker, f"/offline/desktops/{record.desktop}/boot/{which}",
                     laptop.boot_file(found["sha256"], which), size=found["size"],
                     sha256=found["sha256"], what=f"{which} {found['sha256'][:12]}",
                     params=params, progress=progress)
    record.machine = machine
    laptop.save(record)


@offline_app.command("start")
def start(
    desktop: str,
    dir_: DirOption = None,
    password_stdin: PasswordStdin = False,
    libvirt_uri: UriOption = "qemu:///session",
    memory_mib: Annotated[int | None, typer.Option(
        help="the guest's memory (default: the desktop's own)")] = None,
    vcpus: Annotated[int | None, typer.Option(
        help="the guest's vCPUs (default: the desktop's own)")] = None,
    domain_type: Annotated[str, typer.Option(
        help="kvm, or qemu where the laptop has no usable KVM")] = "kvm",
) -> None:
    """Start DESKTOP on this laptop, with no network: the lease, then your password."""
    laptop = _dir(dir_)
    record = laptop.load(desktop)
    layer = laptop.layer(record)
    if not record.downloaded or not layer.is_file():
        raise Conflict(
            f"{desktop} is not fully downloaded yet; run 'deskpool offline "
            f"checkout {desktop}' while online to finish"
        )
    key = serialization.load_pem_public_key(record.public_key_pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput("the server key kept on this laptop is not an Ed25519 key")
    moment = now()
    password = _password(password_stdin)
    allowed = authorize_offline_start(
        signed_lease=SignedLease.from_json(record.lease),
        server_key=key,
        wrapped_key=UserWrappedKey.from_json(record.wrapped_key),
        password=password,
        user=record.user,
        desktop_id=uuid.UUID(record.desktop_id),
        laptop_id=record.laptop,
        cached_base_sha256=(
            record.base_sha256 if laptop.base(record.base_sha256).is_file() else ""
        ),
        now=moment,
        revoked_checkouts=laptop.revoked(),
        latest_seen=record.latest_seen_at,
    )
    record.latest_seen = max(moment, record.latest_seen_at or moment).isoformat()
    laptop.save(record)
    conn = libvirt_opener(libvirt_uri)
    try:
        machine = dict(record.machine)
        boot = None
        if machine.get("cmdline") is not None and machine.get("kernel"):
            boot = LocalBoot(kernel=laptop.boot_file(machine["kernel"]["sha256"], "kernel"),
                             initrd=laptop.boot_file(machine["initrd"]["sha256"], "initrd"),
                             cmdline=machine["cmdline"])
        name = start_local(
            conn,
            desktop,
            layer,
            allowed.data_key,
            allowed.lease.policy,
            memory_mib=memory_mib or machine.get("memory_mib") or 2048,
            vcpus=vcpus or machine.get("vcpus") or 2,
            domain_type=domain_type,
            boot=boot,
            mac=machine.get("mac"),
            identity_text=machine.get("identity_text"),
        )
    finally:
        conn.close()
    out.print(f"{desktop} is running as {name} on {libvirt_uri}; {allowed.notice}")


@offline_app.command("stop")
def stop(
    desktop: str,
    dir_: DirOption = None,
    libvirt_uri: UriOption = "qemu:///session",
    force: Annotated[bool, typer.Option(help="pull the plug")] = False,
) -> None:
    """Shut DESKTOP down on this laptop (its layer stays, to sync or check in)."""
    _dir(dir_).load(desktop)
    conn = libvirt_opener(libvirt_uri)
    try:
        stop_domain(conn, desktop, force=force)
    finally:
        conn.close()
    out.print(f"{desktop} is shut down")


def _send(
    desktop: str, dir_: Path | None, libvirt_uri: str, kind: str, quiet: bool
) -> tuple[LaptopDir, DesktopRecord, dict[str, Any]]:
    laptop = _dir(dir_)
    record = laptop.load(desktop)
    if not record.downloaded:
        raise Conflict(
            f"{desktop} was never fully downloaded: nothing to send; finish with "
            f"'deskpool offline checkout {desktop}' or give it back with "
            f"'deskpool offline rollback {desktop}'"
        )
    conn = libvirt_opener(libvirt_uri)
    try:
        if is_running(conn, desktop):
            raise Conflict(
                f"{desktop} is running; 'deskpool offline stop {desktop}' first, "
                "so its layer stops changing"
            )
    finally:
        conn.close()
    broker = _broker()
    since = BlockManifest.decode(laptop.manifest(record).read_bytes())
    map_file = laptop.synced_map(record)
    synced_map = map_file.read_bytes() if map_file.is_file() else None
    try:
        with progress_bar(quiet) as progress:
            sent = upload(
                broker,
                desktop,
                record.laptop,
                laptop.layer(record),
                laptop.upload_plan(record),
                since,
                record.base_sha256,
                kind,
                progress,
                synced_map,
            )
    except KeyboardInterrupt:
        out.print(f"paused: 'deskpool offline {kind} {desktop}' resumes the transfer")
        raise typer.Exit(130) from None
    except BrokerRefused as exc:
        if exc.status == 409 and "is not checked out" in str(exc):
            # Most often a commit whose answer was lost: done on the broker. The laptop
            # cannot tell that from an administrator's forced check-in, so it keeps its copy.
            raise Conflict(
                f"the broker has no check-out of {desktop} any more: the last {kind} was "
                "committed before its answer was lost, or an administrator ended the "
                f"check-out; this laptop's copy is kept in {laptop.folder(record)}"
            ) from None
        raise
    _synced(laptop, record, sent.manifest, sent.cluster_map)
    how = ("only the blocks the layer's change bitmap names were read" if sent.incremental
           else "the whole layer was read (its change bitmap was missing or unusable)")
    out.print(f"{kind}: sent {sent.bytes_sent / MiB:.1f} MiB for {desktop}; {how}")
    _remember_revoked(broker, laptop)
    return laptop, record, sent.answer


def _synced(laptop: LaptopDir, record: DesktopRecord, manifest: BlockManifest,
            clusters: bytes | None) -> None:
    """What the server's copy now is: its block manifest, then its cluster map (a cut
    between them leaves an older map, which only makes the next plan read more)."""
    write_private(laptop.manifest(record), manifest.encode())
    map_file = laptop.synced_map(record)
    if clusters is None:
        map_file.unlink(missing_ok=True)
    else:
        write_private(map_file, clusters)


@offline_app.command("sync")
def sync(
    desktop: str,
    dir_: DirOption = None,
    libvirt_uri: UriOption = "qemu:///session",
    quiet: QuietOption = False,
) -> None:
    """Send DESKTOP's changes to the broker and renew its lease; it stays on this laptop."""
    laptop, record, answer = _send(desktop, dir_, libvirt_uri, "sync", quiet)
    lease = answer["lease"]
    record.lease, record.layer_sha256 = lease["lease"], lease["layer_sha256"]
    laptop.save(record)
    until = datetime.fromisoformat(lease["checkout"]["lease_expires_at"])
    out.print(f"synced {desktop}; its lease runs until {human_date(until)}")


@offline_app.command("checkin")
def checkin(
    desktop: str,
    dir_: DirOption = None,
    libvirt_uri: UriOption = "qemu:///session",
    quiet: QuietOption = False,
) -> None:
    """Send DESKTOP's changes back and release it: it is online again, off this laptop."""
    laptop, record, _ = _send(desktop, dir_, libvirt_uri, "checkin", quiet)
    laptop.forget(record)
    out.print(f"checked {desktop} in; it is back online (the cached base stays here)")


@offline_app.command("rollback")
def rollback(desktop: str, dir_: DirOption = None) -> None:
    """Give DESKTOP back without this laptop's changes since its last sync (if allowed)."""
    laptop = _dir(dir_)
    record = laptop.load(desktop)
    _broker().call("POST", f"/offline/desktops/{desktop}/rollback")
    laptop.forget(record)
    out.print(f"rolled {desktop} back to its last sync; it is back online")


@offline_app.command("status")
def status(dir_: DirOption = None) -> None:
    """What is on this laptop: each desktop's lease, download and transfer in flight."""
    laptop = _dir(dir_)
    revoked = {str(i) for i in laptop.revoked()}
    table = Table("desktop", "laptop", "lease until", "downloaded", "transfer paused", "revoked")
    for r in laptop.records():
        lease = OfflineLease.from_canonical_bytes(SignedLease.from_json(r.lease).lease_bytes)
        table.add_row(
            r.desktop,
            r.laptop,
            human_date(lease.expires_at),
            "yes" if r.downloaded else "no",
            "yes" if laptop.upload_plan(r).is_file() else "",
            "yes" if r.checkout_id in revoked else "",
        )
    out.print(table)
