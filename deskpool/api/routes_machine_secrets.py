"""The administrator's routes for each desktop's machine secrets
(``deskpool.services.machine_secrets``): machine credentials by desktop name and guest path,
given as base64 and never shown back (size and sha256 only), and every desktop's SSH host key
as a ``known_hosts`` file."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from deskpool.api.deps import AdminActor, AdminUser, ServicesDep
from deskpool.api.schemas import errors
from deskpool.domain.errors import InvalidInput
from deskpool.domain.machine_secrets import MAX_CREDENTIAL_BYTES
from deskpool.services.audit import audit
from deskpool.services.desktops import DesktopService
from deskpool.services.machine_secrets import CredentialInfo, MachineSecrets, public_host_key

router = APIRouter(prefix="/api/v1/admin", tags=["admin"],
                   responses=errors(400, 401, 403, 413, 422))
DesktopName = Annotated[str, Field(min_length=1, max_length=63,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
GuestPath = Annotated[str, Field(min_length=2, max_length=255)]


class CredentialView(BaseModel):
    desktop: str
    path: str
    size: int
    sha256: str


class CredentialSet(BaseModel):
    desktop: DesktopName
    path: GuestPath
    content_base64: str = Field(min_length=1, max_length=(MAX_CREDENTIAL_BYTES * 4) // 3 + 4)


def _view(info: CredentialInfo) -> CredentialView:
    return CredentialView(desktop=info.desktop, path=info.path, size=info.size,
                          sha256=info.sha256)


@router.get("/machine-credentials", response_model=list[CredentialView])
def machine_credentials(admin: AdminUser, svc: ServicesDep,
                        desktop: Annotated[str | None, Query(max_length=63)] = None
                        ) -> list[CredentialView]:
    """Machine credentials, of one desktop name or all (never their content)."""
    return [_view(c) for c in MachineSecrets(svc.ctx).credentials(desktop)]


@router.put("/machine-credentials", response_model=CredentialView)
def set_machine_credential(body: CredentialSet, actor: AdminActor,
                           svc: ServicesDep) -> CredentialView:
    """Give a desktop name a file it gets at every boot (a keytab...); replaces one at the
    same path. Only ``/etc/krb5.keytab`` or files under ``/etc/deskpool/credentials/`` or
    ``/var/lib/deskpool/credentials/``."""
    try:
        content = base64.b64decode(body.content_base64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("content_base64 is not base64") from None
    info = MachineSecrets(svc.ctx).set_credential(body.desktop, body.path, content)
    audit(svc.ctx, actor, "desktop.credential.set", f"desktop/{body.desktop}",
          f"machine credential {body.path} set for desktop {body.desktop} ({info.size} bytes)")
    return _view(info)


@router.delete("/machine-credentials", status_code=204, responses=errors(404))
def remove_machine_credential(actor: AdminActor, svc: ServicesDep,
                              desktop: Annotated[str, Query(min_length=1, max_length=63)],
                              path: Annotated[str, Query(min_length=2, max_length=255)]
                              ) -> Response:
    """Stop giving a desktop a file (a running one keeps it until its disk is reset)."""
    MachineSecrets(svc.ctx).remove_credential(desktop, path)
    audit(svc.ctx, actor, "desktop.credential.remove", f"desktop/{desktop}",
          f"machine credential {path} of desktop {desktop} removed")
    return Response(status_code=204)


@router.get("/known-hosts", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def known_hosts(admin: AdminUser, svc: ServicesDep) -> Response:
    """Every desktop's SSH host key as ``known_hosts`` lines (its hostname and name): the
    same after every reset, for clients to trust."""
    lines = []
    for d in DesktopService(svc.ctx).list():
        kind, blob = public_host_key(svc.ctx, d.name, d.hostname).decode().split()[:2]
        lines.append(f"{','.join(sorted({d.hostname, d.name}))} {kind} {blob}\n")
    return Response("".join(lines), media_type="text/plain")
