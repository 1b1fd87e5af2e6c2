"""Build the deskpool guest image: Debian rootfs -> ext4 -> qcow2, plus kernel and initrd.

No loop mounts and no running systemd needed: mmdebstrap fills a directory (its customize hooks
copy in ``guest/`` and run ``image-setup.sh`` in the chroot), ``mkfs.ext4 -d`` turns the
directory into a filesystem image and ``qemu-img convert`` into an uncompressed qcow2 (full
clones are plain copies of it). Guests boot the kernel directly with ``KERNEL_CMDLINE``.

Images are cached at ``cache_dir/<recipe hash>/``. ``manifest.json`` is written last, atomically:
a directory without it is a half-built leftover and is removed before the next build. The cache
files are replaced on ``force=True``, so VMs must use copies of them (or overlays on a copy),
never the cache files themselves as backing files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deskpool.domain.errors import ImageBuildError
from deskpool.images.recipe import (
    BUILDER_VERSION,
    DEFAULT_RECIPE,
    KERNEL_CMDLINE,
    Flavor,
    GuestRecipe,
)

ProgressFn = Callable[[str, float], None]

MANIFEST_NAME = "manifest.json"
DISK_NAME = "disk.qcow2"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
_MANIFEST_FORMAT = 1
_REQUIRED_TOOLS = ("mmdebstrap", "mkfs.ext4", "qemu-img")
_SETUP_SCRIPT = "/usr/lib/deskpool/image-setup.sh"
_STEP_TIMEOUT_S = 900
_TAIL_LINES = 6

# Never installed, so never pruned afterwards (mmdebstrap also leaves these rules in the
# guest's dpkg.cfg.d, so packages a template adds later stay lean too).
_DPKG_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
)
_DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)

# mmdebstrap's (and image-setup.sh's) progress lines -> (step shown, overall fraction).
_BOOTSTRAP_STAGES = (
    ("running apt-get update", "fetching Debian package lists", 0.03),
    ("downloading packages", "downloading packages", 0.05),
    ("extracting archives", "extracting essential packages", 0.12),
    ("installing essential", "installing essential packages", 0.32),
    ("installing remaining", "installing the kernel, systemd and the guest agent", 0.45),
    ("image-setup: setting up the", "setting up the display manager", 0.85),
    ("running --customize-hook", "installing the deskpool guest files", 0.84),
    ("image-setup: pruning kernel", "pruning kernel modules", 0.86),
    ("image-setup: building the initramfs", "building the initramfs", 0.88),
    ("image-setup: pruning doc", "pruning documentation", 0.91),
    ("cleaning package lists", "cleaning the package cache", 0.92),
)
# Between these fractions, the packages apt installs after the essential ones ("N newly
# installed"), counted as dpkg sets each up: most of a desktop build's time.
_INSTALL_SPAN = (0.45, 0.83)
_NEWLY_INSTALLED_RE = re.compile(r"^\d+ upgraded, (\d+) newly installed")


@dataclass(frozen=True)
class GuestImage:
    recipe_hash: str
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    disk_sha256: str
    flavor: Flavor = Flavor.CONSOLE
    # What a VM of the image needs (the recipe's memory_mib): templates publish it.
    memory_mib: int = 768


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached_image(cache_dir: Path, recipe: GuestRecipe = DEFAULT_RECIPE) -> GuestImage | None:
    """The finished image for ``recipe`` in ``cache_dir``, or None if there is none."""
    recipe_hash = recipe.content_hash()
    return _read_manifest(cache_dir / recipe_hash, recipe_hash)


def build_guest_image(
    cache_dir: Path,
    recipe: GuestRecipe = DEFAULT_RECIPE,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> GuestImage:
    """Build (or take from the cache) the image for ``recipe``. Needs root; ~1-3 minutes."""
    report = _Progress(progress)
    recipe_hash = recipe.content_hash()
    try:
        return _build_locked(cache_dir, recipe, recipe_hash, force, report)
    except OSError as exc:  # disk full, permissions: still one deskpool error for the caller
        raise ImageBuildError(f"building the guest image in {cache_dir} failed: {exc}") from exc


def _build_locked(
    cache_dir: Path, recipe: GuestRecipe, recipe_hash: str, force: bool, report: _Progress
) -> GuestImage:
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / recipe_hash
    # A second builder of the same recipe waits here, then finds the first one's result.
    with _build_lock(cache_dir / f".{recipe_hash}.lock"):
        if not force and (image := _read_manifest(target, recipe_hash)) is not None:
            report("image already built", 1.0)
            return image
        _check_tools()
        for leftover in [target, *cache_dir.glob(f".work-{recipe_hash[:16]}-*")]:
            _remove_tree(leftover)
        work = Path(tempfile.mkdtemp(prefix=f".work-{recipe_hash[:16]}-", dir=cache_dir))
        try:
            return _build(recipe, recipe_hash, work, target, report)
        except BaseException:
            _remove_tree(target)
            raise
        finally:
            _remove_tree(work)


def _build(
    recipe: GuestRecipe, recipe_hash: str, work: Path, target: Path, report: _Progress
) -> GuestImage:
    started = time.monotonic()
    rootfs = work / "rootfs"
    report("staging the deskpool guest files", 0.01)
    staged = _stage_guest_files(work / "guest", recipe)
    _bootstrap(recipe, rootfs, staged, report)

    report("copying the kernel and initrd", 0.93)
    target.mkdir(parents=True)
    kernel_version = _copy_boot_files(rootfs, target)

    report("creating the ext4 filesystem", 0.94)
    raw = work / "disk.raw"
    _run("mkfs.ext4", _mkfs_command(rootfs, raw, recipe.image_size_mib))
    report("converting to qcow2", 0.96)
    _remove_tree(rootfs)  # frees its space before the qcow2 is written
    _run(
        "qemu-img convert",
        ["qemu-img", "convert", "-O", "qcow2", str(raw), str(target / DISK_NAME)],
    )
    raw.unlink()

    report("computing the disk checksum", 0.99)
    disk_sha256 = sha256_file(target / DISK_NAME)
    for name in (DISK_NAME, KERNEL_NAME, INITRD_NAME):
        fsync_path(target / name)
    manifest: dict[str, Any] = {
        "format": _MANIFEST_FORMAT,
        "recipe_hash": recipe_hash,
        "builder_version": BUILDER_VERSION,
        "recipe": asdict(recipe),
        "disk": DISK_NAME,
        "kernel": KERNEL_NAME,
        "initrd": INITRD_NAME,
        "cmdline": KERNEL_CMDLINE,
        "disk_sha256": disk_sha256,
        "sizes": {
            name: (target / name).stat().st_size for name in (DISK_NAME, KERNEL_NAME, INITRD_NAME)
        },
        "kernel_version": kernel_version,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    _write_manifest(target, manifest)
    image = _read_manifest(target, recipe_hash)
    if image is None:  # only if the files vanished under us
        raise ImageBuildError(f"the image just built in {target} does not read back")
    report("image ready", 1.0)
    return image


# --- build steps (module-level so tests can replace them) ------------------------------------


def _check_tools() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building a guest image needs root (mmdebstrap root mode, mkfs -d)")
    missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageBuildError(f"building a guest image needs {', '.join(missing)} installed")


def _bootstrap(recipe: GuestRecipe, rootfs: Path, staged: Path, report: _Progress) -> None:
    """mmdebstrap into ``rootfs``, with the guest files copied in and image-setup.sh run."""
    quoted = shlex.quote(str(staged))
    # What image-setup.sh does differently per flavor.
    setup_env = shlex.join([
        f"DESKPOOL_FLAVOR={recipe.flavor.value}",
        f"DESKPOOL_KEEP_MODULES={' '.join(recipe.keep_modules)}",
        f"DESKPOOL_REQUIRED_MODULES={' '.join(recipe.required_modules)}",
    ])
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        # apt's and dpkg's own lines (no tty, so no progress bars): what _InstallCounter reads.
        "--verbose",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt=path-exclude={p}" for p in _DPKG_EXCLUDES),
        *(f"--dpkgopt=path-include={p}" for p in _DPKG_INCLUDES),
        '--aptopt=Acquire::Languages "none"',
        # The initramfs settings go in before the kernel package, so its first initramfs is
        # already the small one (MODULES=most takes ~20 s more to build, only to be replaced).
        f'--essential-hook=cp -a {quoted}/etc/initramfs-tools "$1"/etc/',
        f'--customize-hook=cp -a {quoted}/. "$1"/',
        f'--customize-hook=chroot "$1" env {setup_env} /bin/sh {_SETUP_SCRIPT}',
        recipe.suite,
        str(rootfs),
        *recipe.mirrors,
    ]
    what = "Debian with Xorg, LightDM and Xfce" if recipe.flavor is Flavor.DESKTOP else "Debian"
    report(f"bootstrapping {what}", 0.02)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as exc:
        raise ImageBuildError(f"mmdebstrap could not be started: {exc}") from exc
    assert proc.stdout is not None
    counter = _InstallCounter(report)
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
            for needle, step, fraction in _BOOTSTRAP_STAGES:
                if needle in line:
                    report(step, fraction)
            counter.feed(line)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"mmdebstrap {recipe.suite} failed (exit {proc.returncode}): {' | '.join(tail)}"
        )


class _InstallCounter:
    """Progress through apt's install of the remaining (non-essential) packages: each one is
    unpacked, then set up (dpkg's lines), half the span each."""

    def __init__(self, report: _Progress) -> None:
        self._report = report
        self._started = False
        self._total = 0
        self._counts = {"Unpacking ": 0, "Setting up ": 0}

    def feed(self, line: str) -> None:
        if "installing remaining" in line:
            self._started = True
        elif not self._started:
            return
        elif not self._total:
            if match := _NEWLY_INSTALLED_RE.match(line):
                self._total = int(match[1])
        else:
            for prefix, count in self._counts.items():
                if line.startswith(prefix):
                    self._counts[prefix] = min(count + 1, self._total)
                    self._progress(prefix)

    def _progress(self, prefix: str) -> None:
        low, high = _INSTALL_SPAN
        done = sum(self._counts.values()) / (2 * self._total)
        what = "unpacked" if prefix == "Unpacking " else "set up"
        self._report(f"installing packages ({self._counts[prefix]} of {self._total} {what})",
                     low + (high - low) * done)


def _mkfs_command(rootfs: Path, raw: Path, size_mib: int) -> list[str]:
    # Inode tables and journal are written now (zeros, so free in the qcow2) instead of by
    # ext4lazyinit in every clone after boot, which would grow each overlay and burn CPU.
    return [
        "mkfs.ext4", "-q", "-F", "-L", "deskpool-root",
        "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", str(rootfs), str(raw), f"{size_mib}M",
    ]  # fmt: skip


def _stage_guest_files(dest: Path, recipe: GuestRecipe = DEFAULT_RECIPE) -> Path:
    """Copy the recipe's guest files to ``dest`` with root-friendly modes (a checkout's modes
    are not trusted)."""
    dest.mkdir(mode=0o755)
    # cp -a copies this mode onto the guest's /, which must be 0755.
    os.chmod(dest, 0o755)  # nosec B103
    for rel, src in recipe.guest_files():
        out = dest / rel
        for parent in reversed(out.relative_to(dest).parents[:-1]):
            (dest / parent).mkdir(mode=0o755, exist_ok=True)
        data = src.read_bytes()
        out.write_bytes(data)
        os.chmod(out, 0o755 if data.startswith(b"#!") else 0o644)
    return dest


def _copy_boot_files(rootfs: Path, target: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in the image's /boot, found {len(kernels)}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ImageBuildError(f"the image has no initrd for kernel {version}")
    for src, name in ((kernels[0], KERNEL_NAME), (initrd, INITRD_NAME)):
        shutil.copyfile(src, target / name)
        os.chmod(target / name, 0o644)
    return version


def _run(step: str, cmd: Sequence[str]) -> None:
    """Run one build command; on failure raise ImageBuildError naming it, with stderr's tail."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, errors="replace", timeout=_STEP_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{step} failed: {cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{step} did not finish within {_STEP_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = " | ".join(lines[-_TAIL_LINES:]) or "no output"
        raise ImageBuildError(f"{step} failed (exit {proc.returncode}): {detail}")


# --- cache bookkeeping -----------------------------------------------------------------------


def _read_manifest(directory: Path, recipe_hash: str) -> GuestImage | None:
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text())
        if data.get("format") != _MANIFEST_FORMAT or data.get("recipe_hash") != recipe_hash:
            return None
        files = {key: directory / str(data[key]) for key in ("disk", "kernel", "initrd")}
        recipe = data["recipe"]
        sizes = data["sizes"]
        # A size check catches truncated files without hashing 300+ MiB on every lookup.
        for path in files.values():
            if path.stat().st_size != sizes[path.name]:
                return None
        return GuestImage(
            recipe_hash=recipe_hash,
            directory=directory,
            disk=files["disk"],
            kernel=files["kernel"],
            initrd=files["initrd"],
            cmdline=str(data["cmdline"]),
            disk_sha256=str(data["disk_sha256"]),
            flavor=Flavor(recipe.get("flavor", Flavor.CONSOLE)),
            memory_mib=int(recipe.get("memory_mib", 768)),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    with tmp.open("w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    fsync_path(directory)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (making a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/self/mounts") as fh:
            points = [line.split()[1].replace("\\040", " ") for line in fh if line.strip()]
    except OSError:
        return []
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _remove_tree(path: Path) -> None:
    """Delete a build directory, first detaching anything a killed mmdebstrap left mounted in
    it: rmtree through a bind-mounted /dev or /proc would wreck the host."""
    if not path.exists():
        return
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if _mounts_below(path):
        raise ImageBuildError(f"cannot remove {path}: filesystems are still mounted inside it")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class _Progress:
    """Forwards (step, fraction) to the caller's callback, never letting the fraction go back."""

    def __init__(self, callback: ProgressFn | None) -> None:
        self._callback = callback
        self._fraction = 0.0

    def __call__(self, step: str, fraction: float) -> None:
        self._fraction = max(self._fraction, min(fraction, 1.0))
        if self._callback is not None:
            self._callback(step, self._fraction)
