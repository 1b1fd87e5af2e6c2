"""Templates and their versions.

Publishing copies the image (and kernel/initrd for direct boot) into deskpool's data directory,
read-only, checksummed; the version row is written only after the files are in place. A
published version never changes: a new image is always a new version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.identity import validate_hostname
from deskpool.domain.models import Customization
from deskpool.images.builder import GuestImage, sha256_file
from deskpool.images.cloudinit import check_user_data
from deskpool.images.qcow2 import image_file_info
from deskpool.services.audit import Actor, record_audit
from deskpool.services.context import ServiceContext
from deskpool.services.customize import check_join_hook
from deskpool.services.customize import check_user_data as check_user_data_size
from deskpool.services.views import TemplateVersionView
from deskpool.store.models import Template, TemplateVersion


@dataclass(frozen=True)
class ImageFiles:
    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None

    @classmethod
    def from_guest_image(cls, image: GuestImage) -> ImageFiles:
        return cls(disk=image.disk, kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline)


def version_view(version: TemplateVersion, template_name: str) -> TemplateVersionView:
    assert version.published_at is not None
    return TemplateVersionView(
        id=version.id, template=template_name, number=version.number,
        image_path=version.image_path, image_sha256=version.image_sha256,
        image_size_bytes=version.image_size_bytes, customization=version.customization.value,
        published_at=version.published_at, has_user_data=version.user_data is not None,
        has_join_hook=version.join_hook is not None,
    )


def _check_files(files: ImageFiles) -> str:
    """Validate the files; returns the disk's format."""
    info = image_file_info(files.disk)  # NotFound / InvalidInput with the path in the message
    if info.format not in ("qcow2", "raw"):
        raise InvalidInput(f"{files.disk} is a {info.format} image; use qcow2 or raw")
    if info.backing_file:
        raise InvalidInput(
            f"{files.disk} depends on backing file {info.backing_file}; "
            "a template image must stand alone (flatten it with 'qemu-img convert')"
        )
    if (files.kernel is None) != (files.initrd is None):
        raise InvalidInput("direct kernel boot needs both a kernel and an initrd")
    for extra in (files.kernel, files.initrd):
        if extra is not None and not extra.is_file():
            raise NotFound(f"file {extra} does not exist")
    return info.format


def _check_customization(customization: Customization, user_data: str | None,
                         join_hook: str | None) -> None:
    if user_data is not None:
        if customization is not Customization.CLOUD_INIT:
            raise InvalidInput(f"cloud-init user data needs the cloud-init customization; this "
                               f"version uses {customization.value} (publish a cloud-init image, "
                               "e.g. the cloudinit flavor, with --customization cloud-init)")
        check_user_data_size(user_data)
        check_user_data(user_data)
    if join_hook is not None:
        if customization is Customization.NONE:
            raise InvalidInput("a join hook runs through the guest agent, which a template "
                               "with customization none does not have")
        check_join_hook(join_hook)


class TemplateService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def publish(
        self, template_name: str, files: ImageFiles, *,
        customization: Customization = Customization.FWCFG, vcpus: int = 1,
        memory_mib: int = 768, recipe_hash: str | None = None, notes: str = "",
        description: str = "", runs_on: str = "", arch: str = "",
        user_data: str | None = None, join_hook: str | None = None,
    ) -> TemplateVersionView:
        """Publish ``files`` as the next version of ``template_name`` (created if new).

        ``user_data``: the administrator's cloud-init user data, merged into each desktop's
        NoCloud seed (``cloud-init`` customization only). ``join_hook``: a script run once on
        each desktop through the guest agent before it is ready (see
        ``deskpool.services.customize``; not with customization ``none``, which has no agent).
        """
        validate_hostname(template_name)  # template names follow the same safe alphabet
        if vcpus < 1 or memory_mib < 128:
            raise InvalidInput(f"a template needs at least 1 vCPU and 128 MiB (got {vcpus}, "
                               f"{memory_mib} MiB)")
        _check_customization(customization, user_data, join_hook)
        disk_format = _check_files(files)
        with self.ctx.uow() as uow:
            template = uow.templates.find_by_name(template_name)
            number = uow.versions.next_number(template.id) if template else 1
        target = self.ctx.settings.templates_dir / template_name / f"v{number}"
        staged = self._stage_files(files, target, disk_name=f"disk.{disk_format}")
        try:
            with self.ctx.uow() as uow:
                template = uow.templates.find_by_name(template_name)
                if template is None:
                    template = Template(name=template_name, description=description)
                    uow.templates.add(template)
                version = TemplateVersion(
                    template=template, number=number,
                    image_path=str(staged.disk), image_sha256=sha256_file(staged.disk),
                    image_size_bytes=staged.disk.stat().st_size,
                    kernel_path=str(staged.kernel) if staged.kernel else None,
                    initrd_path=str(staged.initrd) if staged.initrd else None,
                    kernel_cmdline=files.cmdline, customization=customization,
                    vcpus=vcpus, memory_mib=memory_mib, recipe_hash=recipe_hash, notes=notes,
                    runs_on=",".join(t.strip().upper() for t in runs_on.split(",")
                                     if t.strip()),
                    arch=arch, published_at=datetime.now(UTC), user_data=user_data,
                    join_hook=join_hook,
                )
                uow.versions.add(version)
                uow.commit()
                return version_view(version, template_name)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    @staticmethod
    def _stage_files(files: ImageFiles, target: Path, *, disk_name: str) -> ImageFiles:
        """Copy into a temp dir beside ``target``, then rename: ``target`` is whole or absent."""
        if target.exists():
            # Left by a publish that crashed before its row was written: no row points here.
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            copied: dict[str, Path] = {}
            for key, src, name in (("disk", files.disk, disk_name),
                                   ("kernel", files.kernel, "vmlinuz"),
                                   ("initrd", files.initrd, "initrd.img")):
                if src is None:
                    continue
                shutil.copyfile(src, tmp / name)
                os.chmod(tmp / name, 0o444)
                copied[key] = target / name
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return ImageFiles(disk=copied["disk"], kernel=copied.get("kernel"),
                          initrd=copied.get("initrd"), cmdline=files.cmdline)

    def find_published(self, template_name: str, sha256: str) -> TemplateVersionView | None:
        """An existing version of the template holding exactly this image, if any."""
        with self.ctx.uow() as uow:
            template = uow.templates.find_by_name(template_name)
            if template is None:
                return None
            for version in uow.versions.list(template.id):
                if version.image_sha256 == sha256:
                    return version_view(version, template_name)
        return None

    def list_versions(self) -> list[TemplateVersionView]:
        with self.ctx.uow() as uow:
            return [version_view(v, name) for v, name in uow.versions.list_all()]



def delete_version(ctx: ServiceContext, template_name: str, number: int, *,
                   actor: Actor | None = None) -> None:
    """Delete one version of a template, and its files, when nothing uses it. Refused
    (``Conflict`` naming what) while a desktop is made from it or a pool makes desktops from it
    (current) or may roll back to it (previous). The template itself goes with its last
    version when no pool names it."""
    with ctx.uow() as uow:
        template = uow.templates.get_by_name(template_name)
        version = uow.versions.get_by_number(template.id, number)
        desktops = uow.admin.desktops_of_version(version.id)
        pools = uow.admin.pools_using_version(version.id)
        if desktops or pools:
            uses = [f"pool {p} ({role} version)" for p, role in pools]
            if desktops:
                shown = ", ".join(desktops[:5]) + (", ..." if len(desktops) > 5 else "")
                uses.append(f"{len(desktops)} desktop(s): {shown}")
            raise Conflict(f"version {number} of template {template_name!r} is in use by "
                           + "; ".join(uses) + "; roll those pools to another version and "
                           "let the desktops be replaced first")
        before = {"number": version.number, "image_sha256": version.image_sha256,
                  "image_path": version.image_path}
        folder = Path(version.image_path).parent
        uow.admin.forget_version(version.id)
        uow.versions.delete(version)
        uow.flush()
        template_gone = not uow.versions.list(template.id) and not any(
            p.template_id == template.id for p in uow.pools.list())
        if template_gone:
            uow.templates.delete(template)
        record_audit(uow, actor, "template.delete-version", f"template/{template_name}",
                     f"deleted version {number} of template {template_name}"
                     + (" (its last: the template is gone)" if template_gone else ""),
                     old=before)
        uow.commit()
    # The files go once the row has: a crash between leaves files no row points to, which
    # the next publish of that number replaces.
    root = ctx.settings.templates_dir.resolve()
    if folder.resolve().is_relative_to(root) and folder.resolve() != root:
        shutil.rmtree(folder, ignore_errors=True)
