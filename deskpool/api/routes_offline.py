"""The offline desktops' API (issue 15): a user checks their desktop out to a laptop, renews
its lease, sends its changes back (check-in, sync) and rolls back; an administrator lists
check-outs, revokes one, rolls one back or forces it back in from its last sync (audited).

Transfers travel as raw bytes (``application/octet-stream``): first the plan (an encoded
``LayerDelta``), then each chunk by its index, then a commit. Any step may be repeated after a
cut; the answer always says which chunks the server still lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Path, Query
from fastapi.responses import StreamingResponse

from deskpool.api.deps import AdminActor, AdminUser, CurrentUser, ServicesDep
from deskpool.api.schemas import errors
from deskpool.api.schemas_offline import (
    CheckoutOut,
    CheckoutRequest,
    LeaseOut,
    OfflineDesktopOut,
    OfflineMachineOut,
    PublicKeyOut,
    SyncRequest,
    TransferDone,
    TransferOut,
)
from deskpool.domain.errors import InvalidInput
from deskpool.services.offline import Download, OfflineService
from deskpool.services.offline_machine import offline_machine, open_boot_file
from deskpool.services.offline_views import CheckoutView, LeaseGrant, TransferView

router = APIRouter(prefix="/api/v1", tags=["offline"], responses=errors(401, 413, 422))
DesktopName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]
Laptop = Annotated[str, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
# Raw bytes; empty is a valid chunk (a run of zeros carries none).
Raw = Annotated[bytes, Body(media_type="application/octet-stream")]
USER_REFUSALS = errors(400, 403, 404, 409)
SHA256_HEADER = "X-Deskpool-SHA256"  # the whole file's checksum, for the laptop to verify
STREAM_BLOCK = 1024 * 1024
RangeHeader = Annotated[str | None, Header(alias="range", description=(
    "bytes=START- or bytes=START-END: resume a cut download"))]
FILE_ANSWER: dict[int | str, dict[str, Any]] = {200: {"content": {"application/octet-stream": {}},
                     "description": "the file (206 with Content-Range for a range)"}}


def _lease(grant: LeaseGrant) -> LeaseOut:
    return LeaseOut.model_validate(asdict(grant))


def _checkout(view: CheckoutView) -> CheckoutOut:
    return CheckoutOut.model_validate(asdict(view))


def _transfer(view: TransferView) -> TransferOut:
    return TransferOut.model_validate(asdict(view))


# --- the user's laptop ------------------------------------------------------------------


@router.get("/offline/desktops", response_model=list[OfflineDesktopOut])
def offline_desktops(user: CurrentUser, svc: ServicesDep) -> list[dict[str, Any]]:
    """My desktops in pools that let them go offline, and their check-out if any."""
    return [asdict(d) for d in OfflineService(svc.ctx).offline_desktops(user.name)]


@router.get("/offline/public-key", response_model=PublicKeyOut)
def public_key(user: CurrentUser, svc: ServicesDep) -> PublicKeyOut:
    """The key laptops check leases against."""
    return PublicKeyOut(public_key_pem=OfflineService(svc.ctx).secrets.public_key_pem())


@router.get("/offline/revoked", response_model=list[str])
def revoked(user: CurrentUser, svc: ServicesDep) -> list[str]:
    """My revoked check-outs: the laptop refuses to start them."""
    return [str(i) for i in OfflineService(svc.ctx).revoked_checkouts(user.name)]


@router.post("/offline/desktops/{desktop}/checkout", response_model=LeaseOut,
             responses=USER_REFUSALS | errors(502, 503))
def check_out(desktop: DesktopName, body: CheckoutRequest, user: CurrentUser,
              svc: ServicesDep) -> LeaseOut:
    """Lock my desktop for this laptop: its VM is stopped, a lease issued, and the layer's
    data key handed over once."""
    return _lease(OfflineService(svc.ctx).check_out(user.name, desktop, body.laptop))


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)``, both included, of a ``bytes=START-[END]`` header; None: the whole."""
    if header is None:
        return None
    unit, _, span = header.partition("=")
    first, dash, last = (part.strip() for part in span.partition("-"))
    if unit.strip() != "bytes" or not dash or not first.isdigit() \
            or (last and not last.isdigit()):
        raise InvalidInput(f"Range {header!r} is not bytes=START- or bytes=START-END")
    start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end:
        raise InvalidInput(f"Range {header!r} lies outside the file's {size} bytes")
    return start, end


def _stream(download: Download, range_header: str | None, filename: str) -> StreamingResponse:
    """The file, or the range asked for; the transfer slot is given back when the stream
    ends, completed or cut."""
    try:
        span = _byte_range(range_header, download.size)
    except BaseException:
        download.close()
        raise
    start, end = span or (0, download.size - 1)

    def chunks() -> Iterator[bytes]:
        try:
            with download.path.open("rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    data = f.read(min(STREAM_BLOCK, left))
                    if not data:
                        return
                    left -= len(data)
                    yield data
        finally:
            download.close()

    headers = {"Content-Length": str(end - start + 1), "Accept-Ranges": "bytes",
               SHA256_HEADER: download.sha256,
               "Content-Disposition": f'attachment; filename="{filename}"'}
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{download.size}"
    return StreamingResponse(chunks(), status_code=206 if span else 200, headers=headers,
                             media_type="application/octet-stream")


@router.get("/offline/desktops/{desktop}/layer", response_class=StreamingResponse,
            responses=USER_REFUSALS | errors(503) | FILE_ANSWER)
def download_layer(desktop: DesktopName, laptop: Laptop, user: CurrentUser,
                   svc: ServicesDep, range_header: RangeHeader = None) -> StreamingResponse:
    """The desktop's encrypted layer as the server has it (download after check-out);
    resumable with Range. Holds a transfer slot of the desktop's host (503 when busy)."""
    found = OfflineService(svc.ctx).open_download(user.name, desktop, laptop, "layer")
    return _stream(found, range_header, f"{desktop}.qcow2")


@router.get("/offline/desktops/{desktop}/base", response_class=StreamingResponse,
            responses=USER_REFUSALS | errors(503) | FILE_ANSWER)
def download_base(desktop: DesktopName, laptop: Laptop, user: CurrentUser,
                  svc: ServicesDep, range_header: RangeHeader = None) -> StreamingResponse:
    """The template image under the check-out's layer (the laptop caches it by sha256);
    resumable with Range. Holds a transfer slot of the desktop's host (503 when busy)."""
    found = OfflineService(svc.ctx).open_download(user.name, desktop, laptop, "base")
    return _stream(found, range_header, f"{found.sha256}.qcow2")


@router.get("/offline/desktops/{desktop}/machine", response_model=OfflineMachineOut,
            responses=USER_REFUSALS)
def machine(desktop: DesktopName, laptop: Laptop, user: CurrentUser,
            svc: ServicesDep) -> dict[str, Any]:
    """The machine the checked-out desktop runs as on the laptop: size, MAC, and its boot
    (kernel command line and identity; the boot files download from ``.../boot/{file}``)."""
    return asdict(offline_machine(OfflineService(svc.ctx), user.name, desktop, laptop))


@router.get("/offline/desktops/{desktop}/boot/{which}", response_class=StreamingResponse,
            responses=USER_REFUSALS | errors(503) | FILE_ANSWER)
def download_boot_file(desktop: DesktopName, which: Literal["kernel", "initrd"],
                       laptop: Laptop, user: CurrentUser, svc: ServicesDep,
                       range_header: RangeHeader = None) -> StreamingResponse:
    """The template's kernel or initrd, for a desktop booted by direct kernel boot;
    resumable with Range. Holds a transfer slot of the desktop's host (503 when busy)."""
    found = open_boot_file(OfflineService(svc.ctx), user.name, desktop, laptop, which)
    return _stream(found, range_header, f"{found.sha256}.{which}")


@router.post("/offline/desktops/{desktop}/sync", response_model=LeaseOut,
             responses=USER_REFUSALS)
def renew(desktop: DesktopName, body: SyncRequest, user: CurrentUser,
          svc: ServicesDep) -> LeaseOut:
    """Renew the lease (changed blocks travel through a ``sync`` transfer)."""
    return _lease(OfflineService(svc.ctx).renew(user.name, desktop, body.laptop,
                                                bytes_pending=body.bytes_pending))


@router.post("/offline/desktops/{desktop}/transfer", response_model=TransferOut,
             responses=USER_REFUSALS | errors(503))
def begin_transfer(desktop: DesktopName, laptop: Laptop, user: CurrentUser,
                   svc: ServicesDep, plan: Raw = b"",
                   kind: Annotated[Literal["checkin", "sync"], Query()] = "checkin",
                   ) -> TransferOut:
    """Start or resume a check-in (or sync) of this plan; answers the chunks still missing."""
    return _transfer(OfflineService(svc.ctx).begin_transfer(user.name, desktop, laptop, plan,
                                                            kind))


@router.put("/offline/desktops/{desktop}/transfer/chunks/{index}", response_model=TransferOut,
            responses=USER_REFUSALS | errors(503))
def put_chunk(desktop: DesktopName, index: Annotated[int, Path(ge=0, le=10_000_000)],
              laptop: Laptop, user: CurrentUser, svc: ServicesDep,
              data: Raw = b"") -> TransferOut:
    """One chunk's bytes; a damaged one is refused (503: send it again), nothing written."""
    return _transfer(OfflineService(svc.ctx).put_chunk(user.name, desktop, laptop, index,
                                                       data))


@router.put("/offline/desktops/{desktop}/transfer/chunks", response_model=TransferOut,
            responses=USER_REFUSALS | errors(503))
def put_chunks(desktop: DesktopName,
               indexes: Annotated[str, Query(pattern=r"^[0-9]{1,8}(,[0-9]{1,8}){0,4095}$",
                                             description="the chunks, in the body's order")],
               laptop: Laptop, user: CurrentUser, svc: ServicesDep,
               data: Raw = b"") -> TransferOut:
    """Several chunks' bytes end to end (one round trip for many small chunks); each is
    checked and journalled as if sent alone (503 on a damaged one: send the batch again)."""
    wanted = [int(i) for i in indexes.split(",")]
    return _transfer(OfflineService(svc.ctx).put_chunks(user.name, desktop, laptop, wanted,
                                                        data))


@router.post("/offline/desktops/{desktop}/transfer/commit", response_model=TransferDone,
             responses=USER_REFUSALS | errors(503))
def commit_transfer(desktop: DesktopName, body: CheckoutRequest, user: CurrentUser,
                    svc: ServicesDep) -> TransferDone:
    """Verify and commit: a check-in brings the desktop back online, a sync renews the lease.
    A refusal leaves the server's copy and the lock as they were."""
    done = OfflineService(svc.ctx).finish_transfer(user.name, desktop, body.laptop)
    if isinstance(done, LeaseGrant):
        return TransferDone(checkout=_checkout(done.checkout), lease=_lease(done))
    return TransferDone(checkout=_checkout(done))


@router.post("/offline/desktops/{desktop}/rollback", response_model=CheckoutOut,
             responses=USER_REFUSALS)
def roll_back(desktop: DesktopName, user: CurrentUser, svc: ServicesDep) -> CheckoutOut:
    """Discard the laptop's changes since its last sync and bring the desktop back online
    (if the pool's policy lets users roll back)."""
    return _checkout(OfflineService(svc.ctx).roll_back(user.name, desktop))


# --- the administrator ------------------------------------------------------------------


@router.get("/admin/offline/checkouts", response_model=list[CheckoutOut], tags=["admin"],
            responses=errors(403))
def checkouts(admin: AdminUser, svc: ServicesDep) -> list[CheckoutOut]:
    """Who has what checked out: since when, lease expiry, last sync, bytes pending."""
    return [_checkout(c) for c in OfflineService(svc.ctx).checkouts()]


@router.post("/admin/offline/checkouts/{desktop}/revoke", response_model=CheckoutOut,
             tags=["admin"], responses=errors(403, 404, 409))
def revoke(desktop: DesktopName, actor: AdminActor, svc: ServicesDep) -> CheckoutOut:
    """The laptop may no longer start it; the desktop stays locked until checked in."""
    return _checkout(OfflineService(svc.ctx, actor).revoke(desktop))


@router.post("/admin/offline/checkouts/{desktop}/force-checkin", response_model=CheckoutOut,
             tags=["admin"], responses=errors(403, 404, 409))
def force_check_in(desktop: DesktopName, actor: AdminActor, svc: ServicesDep) -> CheckoutOut:
    """Bring it back online as of its last sync (a lost laptop); the laptop's copy is
    revoked."""
    return _checkout(OfflineService(svc.ctx, actor).force_check_in(desktop))


@router.post("/admin/offline/checkouts/{desktop}/rollback", response_model=CheckoutOut,
             tags=["admin"], responses=errors(403, 404, 409))
def admin_roll_back(desktop: DesktopName, actor: AdminActor, svc: ServicesDep) -> CheckoutOut:
    """Discard the laptop's changes since its last sync, whatever the pool's policy."""
    return _checkout(OfflineService(svc.ctx, actor).admin_roll_back(desktop))
