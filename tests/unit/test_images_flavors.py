"""Image flavors: the console recipe (the default, for fast tests) and the desktop recipe
(Xorg, LightDM, Xfce, SPICE agent, xrdp), their hashes, guest files, module pruning and the
memory a VM of each needs."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from deskpool.domain.errors import ImageBuildError, InvalidInput
from deskpool.images import builder, recipe
from deskpool.images.builder import MANIFEST_NAME, build_guest_image
from deskpool.images.recipe import (
    CONSOLE_RECIPE,
    DEFAULT_RECIPE,
    DESKTOP_RECIPE,
    Flavor,
    GuestRecipe,
    recipe_for,
)
from tests.unit.test_images_recipe import FakeSteps

PRUNE = recipe.GUEST_FILES_DIR / "usr/lib/deskpool/prune-modules"
GRAPHICAL = ("xserver-xorg-core", "xserver-xorg-input-libinput", "lightdm",
             "lightdm-gtk-greeter", "xfce4-session", "xfwm4", "xfce4-panel", "xfdesktop4",
             "xfce4-settings", "xfce4-terminal", "thunar", "dbus-x11", "spice-vdagent",
             "fonts-dejavu-core", "adwaita-icon-theme")


def test_console_stays_the_default_and_each_flavor_has_its_own_hash() -> None:
    assert DEFAULT_RECIPE is CONSOLE_RECIPE is recipe_for("console")
    assert recipe_for(Flavor.DESKTOP) is DESKTOP_RECIPE
    assert (CONSOLE_RECIPE.flavor, DESKTOP_RECIPE.flavor) == (Flavor.CONSOLE, Flavor.DESKTOP)
    assert CONSOLE_RECIPE.content_hash() != DESKTOP_RECIPE.content_hash()
    # The flavor alone (same packages, same everything else) changes the hash too: it picks
    # the guest files and image-setup's steps.
    assert replace(CONSOLE_RECIPE, flavor=Flavor.DESKTOP).content_hash() != (
        CONSOLE_RECIPE.content_hash())


def test_desktop_recipe_is_the_console_one_plus_the_graphical_packages() -> None:
    packages = DESKTOP_RECIPE.packages
    assert packages[:len(CONSOLE_RECIPE.packages)] == CONSOLE_RECIPE.packages
    for name in (*GRAPHICAL, "xrdp", "qemu-guest-agent", "linux-image-amd64"):
        assert name in packages, name
    assert len(set(packages)) == len(packages)
    assert not {"lightdm", "xrdp", "spice-vdagent"} & set(CONSOLE_RECIPE.packages)


def test_desktop_recipe_records_the_memory_a_vm_needs() -> None:
    assert DESKTOP_RECIPE.memory_mib == 1536
    assert CONSOLE_RECIPE.memory_mib == 768  # what templates got before flavors existed


def test_unknown_flavor_and_bad_module_names_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown image flavor 'kiosk'"):
        recipe_for("kiosk")
    with pytest.raises(InvalidInput, match="unknown image flavor"):
        GuestRecipe(flavor="kiosk")  # type: ignore[arg-type]
    assert GuestRecipe(flavor="desktop").flavor is Flavor.DESKTOP  # type: ignore[arg-type]
    for bad in ("../../etc", "/drivers/gpu", "drivers gpu"):
        with pytest.raises(InvalidInput, match="kernel module path"):
            GuestRecipe(keep_modules=(bad,))
    with pytest.raises(InvalidInput, match="kernel module name"):
        GuestRecipe(required_modules=("dm crypt",))
    with pytest.raises(InvalidInput, match="memory"):
        GuestRecipe(memory_mib=64)


def test_only_the_desktop_flavor_carries_the_desktop_guest_files() -> None:
    console = dict(CONSOLE_RECIPE.guest_files())
    desktop = dict(DESKTOP_RECIPE.guest_files())
    assert set(console) < set(desktop)
    for rel in ("usr/lib/deskpool/flavor-setup.sh", "etc/lightdm/lightdm.conf.d/50-deskpool.conf",
                "etc/systemd/system/deskpool-xrdp-keys.service", "usr/lib/deskpool/xrdp-keys"):
        assert rel in desktop and rel not in console
    # The hooks every guest has are in both.
    for rel in ("usr/lib/deskpool/deskpool-identity", "usr/lib/deskpool/image-setup.sh",
                "usr/lib/deskpool/prune-modules"):
        assert rel in console and rel in desktop


def test_the_cloudinit_flavor_is_the_console_plus_cloud_init_and_a_disabled_nslcd() -> None:
    cloudinit = recipe_for("cloudinit")
    assert cloudinit.flavor is Flavor.CLOUDINIT and cloudinit.memory_mib == 768
    assert cloudinit.packages[:len(CONSOLE_RECIPE.packages)] == CONSOLE_RECIPE.packages
    assert {"cloud-init", "nslcd", "libnss-ldapd"} <= set(cloudinit.packages)
    assert len({CONSOLE_RECIPE.content_hash(), DESKTOP_RECIPE.content_hash(),
                cloudinit.content_hash()}) == 3
    files = dict(cloudinit.guest_files())
    assert "etc/lightdm/lightdm.conf.d/50-deskpool.conf" not in files
    cfg = files["etc/cloud/cloud.cfg.d/99-deskpool.cfg"].read_text()
    # Read after Debian's 90_dpkg.cfg; ds-identify takes the one-line list.
    assert sorted(["90_dpkg.cfg", "99-deskpool.cfg"])[-1] == "99-deskpool.cfg"
    assert "\ndatasource_list: [ NoCloud, None ]\n" in cfg
    assert "network:\n  config: disabled" in cfg and "\nusers: []\n" in cfg
    setup = files["usr/lib/deskpool/flavor-setup.sh"].read_text()
    assert "systemctl disable nslcd.service" in setup
    # nslcd has only a SysV script, and images run no SysV generator: a native unit.
    unit = files["etc/systemd/system/nslcd.service"].read_text()
    assert "ExecStart=/usr/sbin/nslcd -n" in unit and "\nRuntimeDirectory=" not in unit


def test_desktop_setup_boots_to_lightdm_on_the_graphical_target() -> None:
    setup = (recipe.DESKTOP_FILES_DIR / "usr/lib/deskpool/flavor-setup.sh").read_text()
    assert "systemctl set-default graphical.target" in setup
    assert "systemctl enable lightdm.service" in setup
    conf = (recipe.DESKTOP_FILES_DIR / "etc/lightdm/lightdm.conf.d/50-deskpool.conf").read_text()
    assert "user-session=deskpool-xfce" in conf
    assert "session-wrapper=/usr/lib/deskpool/session-wrapper" in conf


def test_the_lean_xfce_session_is_wired_to_files_the_image_has() -> None:
    """LightDM's session entry and wrapper point at scripts the image carries (executable:
    the builder makes files with a shebang 0755), and Xfce's lean defaults keep the core."""
    files = recipe.DESKTOP_FILES_DIR
    entry = (files / "usr/share/xsessions/deskpool-xfce.desktop").read_text()
    (exec_line,) = [line for line in entry.splitlines() if line.startswith("Exec=")]
    for script in (exec_line.removeprefix("Exec="), "/usr/lib/deskpool/session-wrapper"):
        assert (files / script.lstrip("/")).read_text().startswith("#!/bin/sh"), script
    hook = (files / "usr/lib/deskpool/session-hook").read_text()
    assert "autologin-session=deskpool-xfce" in hook
    session = (files / "etc/xdg/deskpool/xfce4/xfconf/xfce-perchannel-xml/"
               "xfce4-session.xml").read_text()
    for core in ("xfwm4", "xfsettingsd", "xfce4-panel", "xfdesktop"):
        assert f'value="{core}"' in session
    assert "Thunar" not in session
    assert "dbus-user-session" in DESKTOP_RECIPE.packages
    # An RDP session runs the same Xfce on a bus of its own, beside the console session.
    startwm = (files / "etc/xrdp/startwm.sh").read_text()
    assert startwm.startswith("#!/bin/sh")
    assert "exec dbus-run-session -- /usr/lib/deskpool/xfce-session" in startwm


def test_desktop_file_edits_change_only_the_desktop_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "guest-desktop"
    shutil.copytree(recipe.DESKTOP_FILES_DIR, copy)
    monkeypatch.setattr(recipe, "DESKTOP_FILES_DIR", copy)
    console, desktop = CONSOLE_RECIPE.content_hash(), DESKTOP_RECIPE.content_hash()
    (copy / "etc/lightdm/lightdm.conf.d/50-deskpool.conf").write_text("[Seat:*]\n")
    assert CONSOLE_RECIPE.content_hash() == console
    assert DESKTOP_RECIPE.content_hash() != desktop


def test_missing_desktop_files_are_an_error_not_a_different_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipe, "DESKTOP_FILES_DIR", tmp_path / "not-installed")
    with pytest.raises(ImageBuildError, match="desktop flavor's guest files are missing"):
        DESKTOP_RECIPE.content_hash()
    assert CONSOLE_RECIPE.content_hash()  # the console flavor does not need them


# --- module pruning (the script image-setup.sh runs in the chroot) ---------------------------

MODULES = (
    "drivers/gpu/drm/drm.ko", "drivers/gpu/drm/tiny/bochs.ko", "drivers/gpu/drm/qxl/qxl.ko",
    "drivers/video/fbdev/core/fb_sys_fops.ko", "drivers/i2c/algos/i2c-algo-bit.ko",
    "drivers/input/mouse/psmouse.ko", "drivers/input/evdev.ko",
    "fs/smb/client/cifs.ko", "fs/overlayfs/overlay.ko", "drivers/md/dm-crypt.ko",
    "drivers/md/dm-mod.ko", "sound/core/snd.ko", "drivers/net/wireless/ath/ath.ko",
    "drivers/virtio/virtio_pci.ko", "fs/ext4/ext4.ko", "drivers/block/virtio_blk.ko",
)


def _prune(tmp_path: Path, keep: tuple[str, ...]) -> set[str]:
    kdir = tmp_path / "lib/modules/6.1.0-test-amd64"
    for rel in MODULES:
        (kdir / "kernel" / rel).parent.mkdir(parents=True, exist_ok=True)
        (kdir / "kernel" / rel).write_bytes(b"\x7fELF")
    subprocess.run(["sh", str(PRUNE), str(kdir), *keep], check=True)
    kept = {p.relative_to(kdir / "kernel").as_posix() for p in kdir.rglob("*.ko")}
    # Emptied directories go too.
    assert not (kdir / "kernel/sound").exists()
    return kept


def test_console_pruning_still_removes_gpu_sound_and_the_later_filesystems(
    tmp_path: Path,
) -> None:
    kept = _prune(tmp_path, CONSOLE_RECIPE.keep_modules)
    # overlay in every flavor: a stateful desktop's user layer is laid over its root.
    assert kept == {"drivers/input/evdev.ko", "drivers/virtio/virtio_pci.ko",
                    "fs/ext4/ext4.ko", "drivers/block/virtio_blk.ko",
                    "fs/overlayfs/overlay.ko"}


def test_desktop_pruning_keeps_gpu_video_i2c_input_cifs_overlay_and_dm_crypt(
    tmp_path: Path,
) -> None:
    kept = _prune(tmp_path, DESKTOP_RECIPE.keep_modules)
    assert kept == set(MODULES) - {"sound/core/snd.ko", "drivers/net/wireless/ath/ath.ko"}


def test_a_kept_module_file_is_kept_alone(tmp_path: Path) -> None:
    kept = _prune(tmp_path, ("drivers/md/dm-crypt", "fs/overlayfs"))
    assert "drivers/md/dm-crypt.ko" in kept and "fs/overlayfs/overlay.ko" in kept
    assert "drivers/md/dm-mod.ko" not in kept and "drivers/gpu/drm/drm.ko" not in kept


def test_desktop_requires_its_modules_to_survive_pruning() -> None:
    for module in ("bochs", "cifs", "overlay", "dm_crypt"):
        assert module in DESKTOP_RECIPE.required_modules
    assert CONSOLE_RECIPE.required_modules == ()


# --- the build passes the flavor on; the manifest and publish carry it -------------------------


def test_bootstrap_hands_the_flavor_to_image_setup(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    seen: list[list[str]] = []

    class Done(Exception):
        pass

    def fake_popen(cmd: list[str], **kwargs: object) -> None:
        seen.append(cmd)
        raise Done

    monkeypatch.setattr(builder.subprocess, "Popen", fake_popen)
    for rcp in (CONSOLE_RECIPE, DESKTOP_RECIPE):
        with pytest.raises(Done):
            builder._bootstrap(rcp, tmp_path / "rootfs", tmp_path / "staged",
                               builder._Progress(None))
    console_hook, desktop_hook = (next(a for a in cmd if "image-setup.sh" in a) for cmd in seen)
    assert "DESKPOOL_FLAVOR=console" in console_hook
    assert "DESKPOOL_KEEP_MODULES= " in console_hook
    assert "DESKPOOL_FLAVOR=desktop" in desktop_hook
    assert "drivers/gpu" in desktop_hook and "dm_crypt" in desktop_hook
    assert any(a.startswith("--include=") and "lightdm" in a for a in seen[1])
    assert not any(a.startswith("--include=") and "lightdm" in a for a in seen[0])


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSteps:
    steps = FakeSteps()
    monkeypatch.setattr(builder, "_check_tools", lambda: None)
    monkeypatch.setattr(builder, "_bootstrap", steps.bootstrap)
    monkeypatch.setattr(builder, "_run", steps.run)
    return steps


def test_flavors_are_cached_side_by_side_with_their_memory(
    fake: FakeSteps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged: list[set[str]] = []
    stage = builder._stage_guest_files

    def spy(dest: Path, rcp: GuestRecipe = DEFAULT_RECIPE) -> Path:
        out = stage(dest, rcp)
        staged.append({p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()})
        return out

    monkeypatch.setattr(builder, "_stage_guest_files", spy)
    console = build_guest_image(tmp_path)
    desktop = build_guest_image(tmp_path, DESKTOP_RECIPE)
    assert fake.builds == 2 and console.directory != desktop.directory
    assert (console.flavor, console.memory_mib) == (Flavor.CONSOLE, 768)
    assert (desktop.flavor, desktop.memory_mib) == (Flavor.DESKTOP, 1536)
    assert builder.load_cached_image(tmp_path, DESKTOP_RECIPE) == desktop
    manifest = json.loads((desktop.directory / MANIFEST_NAME).read_text())
    assert manifest["recipe"]["flavor"] == "desktop"
    assert "usr/lib/deskpool/flavor-setup.sh" in staged[1] - staged[0]


class _FakeMmdebstrap:
    """Plays mmdebstrap --verbose's output: stages, then apt's count and dpkg's set-ups."""

    LINES = (
        "I: running apt-get update...", "I: downloading packages with apt...",
        "I: extracting archives...", "I: installing essential packages...",
        "Setting up base-files (12.4) ...",  # essential: before apt's count, not counted
        "I: installing remaining packages inside the chroot...",
        "The following NEW packages will be installed:", "  lightdm xfwm4 xrdp xorgxrdp",
        "0 upgraded, 4 newly installed, 0 to remove and 0 not upgraded.",
        "Unpacking lightdm (1.26.0-8) ...", "Unpacking xfwm4 (4.18.0-1) ...",
        "Unpacking xrdp (0.9.21.1-1) ...", "Unpacking xorgxrdp (1:0.9.19-1) ...",
        "Setting up lightdm (1.26.0-8) ...", "Setting up xfwm4 (4.18.0-1) ...",
        "Setting up xrdp (0.9.21.1-1) ...", "Setting up xorgxrdp (1:0.9.19-1) ...",
        "I: running --customize-hook in shell: sh -c 'cp -a ...'",
    )

    def __init__(self, cmd: list[str], **kwargs: object) -> None:
        assert "--verbose" in cmd
        self.stdout = iter(f"{line}\n" for line in self.LINES)
        self.returncode = 0

    def __enter__(self) -> _FakeMmdebstrap:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_desktop_build_progress_moves_while_apt_installs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[str, float]] = []
    monkeypatch.setattr(builder.subprocess, "Popen", _FakeMmdebstrap)
    builder._bootstrap(DESKTOP_RECIPE, tmp_path / "rootfs", tmp_path / "staged",
                       builder._Progress(lambda step, frac: seen.append((step, frac))))
    steps = [step for step, _ in seen]
    counted = [(step, frac) for step, frac in seen if step.startswith("installing packages")]
    assert [step for step, _ in counted] == [
        *(f"installing packages ({n} of 4 unpacked)" for n in (1, 2, 3, 4)),
        *(f"installing packages ({n} of 4 set up)" for n in (1, 2, 3, 4))]
    fractions = [frac for _, frac in counted]
    assert fractions == sorted(fractions) and fractions[0] > 0.45 and fractions[-1] == 0.83
    assert steps[0] == "bootstrapping Debian with Xorg, LightDM and Xfce"
    assert steps[-1] == "installing the deskpool guest files"
