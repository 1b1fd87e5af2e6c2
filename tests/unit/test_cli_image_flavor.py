"""``deskpool image build --flavor`` and ``template publish --built --flavor``: the version
gets the memory the built image's recipe records, which placement then counts per desktop."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli import main
from deskpool.config import Settings
from deskpool.images.builder import GuestImage
from deskpool.images.recipe import DEFAULT_RECIPE, Flavor, GuestRecipe
from deskpool.services.context import ServiceContext


def _qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def _published_memory(data_dir: Path, template: str) -> list[int]:
    ctx = ServiceContext(Settings(data_dir=data_dir))
    try:
        with ctx.uow() as uow:
            found = uow.templates.find_by_name(template)
            assert found is not None
            return [v.memory_mib for v in uow.versions.list(found.id)]
    finally:
        ctx.close()


def test_publish_built_desktop_gives_the_version_the_recipes_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[GuestRecipe] = []
    boot = tmp_path / "boot"
    boot.write_bytes(b"kernel")

    def built(cache_dir: Path, rcp: GuestRecipe = DEFAULT_RECIPE) -> GuestImage:
        asked.append(rcp)
        return GuestImage(recipe_hash=rcp.content_hash(), directory=tmp_path,
                          disk=_qcow2(tmp_path / f"{rcp.flavor}.qcow2"), kernel=boot,
                          initrd=boot, cmdline="root=/dev/vda", disk_sha256="0" * 64,
                          flavor=rcp.flavor, memory_mib=rcp.memory_mib)

    monkeypatch.setattr(main, "build_guest_image", built)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    for args in (["--flavor", "desktop"], [], ["--flavor", "desktop", "--memory-mib", "2048"]):
        result = runner.invoke(main.app, ["template", "publish", "lab", "--built", *args])
        assert result.exit_code == 0, result.output
    assert [r.flavor for r in asked] == [Flavor.DESKTOP, Flavor.CONSOLE, Flavor.DESKTOP]
    assert _published_memory(tmp_path / "data", "lab") == [1536, 768, 2048]
    refused = runner.invoke(main.app, ["template", "publish", "lab", "--flavor", "desktop",
                                       "--image", str(tmp_path / "console.qcow2")])
    assert refused.exit_code != 0


def test_image_build_takes_the_flavor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deskpool.cli import progress

    asked: list[GuestRecipe] = []

    def built(cache_dir: Path, rcp: GuestRecipe = DEFAULT_RECIPE, *, force: bool = False,
              progress: object = None) -> GuestImage:
        asked.append(rcp)
        return GuestImage(recipe_hash=rcp.content_hash(), directory=tmp_path, disk=tmp_path,
                          kernel=tmp_path, initrd=tmp_path, cmdline="", disk_sha256="",
                          flavor=rcp.flavor, memory_mib=rcp.memory_mib)

    monkeypatch.setattr(progress, "build_guest_image", built)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(main.app, ["image", "build", "--flavor", "desktop"])
    assert result.exit_code == 0, result.output
    assert [r.flavor for r in asked] == [Flavor.DESKTOP]
    said = " ".join(result.output.split())  # Rich wraps at its own width
    assert "desktop image" in said and "VMs need 1536 MiB" in said
    bad = CliRunner().invoke(main.app, ["image", "build", "--flavor", "kiosk"])
    assert bad.exit_code != 0


def test_publish_built_cloudinit_uses_cloud_init_and_takes_the_hook_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = tmp_path / "boot"
    boot.write_bytes(b"kernel")

    def built(cache_dir: Path, rcp: GuestRecipe = DEFAULT_RECIPE) -> GuestImage:
        return GuestImage(recipe_hash=rcp.content_hash(), directory=tmp_path,
                          disk=_qcow2(tmp_path / f"{rcp.flavor}.qcow2"), kernel=boot,
                          initrd=boot, cmdline="root=/dev/vda", disk_sha256="0" * 64,
                          flavor=rcp.flavor, memory_mib=rcp.memory_mib)

    monkeypatch.setattr(main, "build_guest_image", built)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "corp.yaml").write_text("#cloud-config\nruncmd:\n  - [true]\n")
    (tmp_path / "join.sh").write_text("#!/bin/sh\nrealm join corp.example\n")
    runner = CliRunner()
    result = runner.invoke(main.app, [
        "template", "publish", "corp", "--built", "--flavor", "cloudinit",
        "--user-data", str(tmp_path / "corp.yaml"), "--join-hook", str(tmp_path / "join.sh")])
    assert result.exit_code == 0, result.output
    ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
    try:
        with ctx.uow() as uow:
            template = uow.templates.find_by_name("corp")
            assert template is not None
            (version,) = uow.versions.list(template.id)
            assert version.customization.value == "cloud-init"
            assert version.user_data == "#cloud-config\nruncmd:\n  - [true]\n"
            assert version.join_hook == "#!/bin/sh\nrealm join corp.example\n"
    finally:
        ctx.close()
    listed = runner.invoke(main.app, ["template", "list"]).output
    assert "join hook" in listed  # the table wraps the rest at the terminal's width
    # User data on a console (fwcfg) template: refused, naming why.
    refused = runner.invoke(main.app, [
        "template", "publish", "lab", "--built", "--user-data", str(tmp_path / "corp.yaml")])
    # (main.app raises deskpool's errors; the console script turns them into one line)
    assert "needs the cloud-init customization" in str(refused.exception)
    missing = runner.invoke(main.app, [
        "template", "publish", "lab", "--built", "--join-hook", str(tmp_path / "nope.sh")])
    assert "cannot read the join hook" in str(missing.exception)
