"""Recipe hashing and the image cache's bookkeeping, with the slow build steps replaced."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from deskpool.domain.errors import ImageBuildError, InvalidInput
from deskpool.images import builder, recipe
from deskpool.images.builder import (
    MANIFEST_NAME,
    GuestImage,
    build_guest_image,
    load_cached_image,
    sha256_file,
)
from deskpool.images.recipe import DEFAULT_RECIPE, KERNEL_CMDLINE, GuestRecipe, iter_guest_files

# --- recipe hash -----------------------------------------------------------------------------


def test_same_recipe_same_hash() -> None:
    assert GuestRecipe().content_hash() == DEFAULT_RECIPE.content_hash()
    assert len(DEFAULT_RECIPE.content_hash()) == 64


@pytest.mark.parametrize(
    "changed",
    [
        GuestRecipe(suite="trixie"),
        GuestRecipe(packages=(*DEFAULT_RECIPE.packages, "openssh-server")),
        GuestRecipe(packages=DEFAULT_RECIPE.packages[::-1]),
        GuestRecipe(image_size_mib=4096),
        GuestRecipe(mirrors=("http://mirror.example/debian",)),
    ],
)
def test_any_field_changes_the_hash(changed: GuestRecipe) -> None:
    assert changed.content_hash() != DEFAULT_RECIPE.content_hash()


@pytest.fixture
def guest_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of guest/ that the hash (and the staging step) read instead."""
    copy = tmp_path / "guest"
    shutil.copytree(recipe.GUEST_FILES_DIR, copy)
    monkeypatch.setattr(recipe, "GUEST_FILES_DIR", copy)
    return copy


def test_hash_covers_guest_file_bytes(guest_copy: Path) -> None:
    before = DEFAULT_RECIPE.content_hash()
    hook = guest_copy / "usr/lib/deskpool/deskpool-identity"
    hook.write_text(hook.read_text() + "# one more line\n")
    assert DEFAULT_RECIPE.content_hash() != before


def test_hash_covers_added_and_renamed_guest_files(guest_copy: Path) -> None:
    before = DEFAULT_RECIPE.content_hash()
    extra = guest_copy / "etc/deskpool-extra.conf"
    extra.write_text("x=1\n")
    with_extra = DEFAULT_RECIPE.content_hash()
    extra.rename(guest_copy / "etc/deskpool-other.conf")
    assert len({before, with_extra, DEFAULT_RECIPE.content_hash()}) == 3


def test_hash_ignores_editor_leftovers(guest_copy: Path) -> None:
    before = DEFAULT_RECIPE.content_hash()
    (guest_copy / "etc/issue~").write_text("backup")
    (guest_copy / "usr/lib/deskpool/.deskpool-identity.swp").write_bytes(b"\0swap")
    assert DEFAULT_RECIPE.content_hash() == before


def test_hash_covers_builder_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = DEFAULT_RECIPE.content_hash()
    monkeypatch.setattr(recipe, "BUILDER_VERSION", recipe.BUILDER_VERSION + 1)
    assert DEFAULT_RECIPE.content_hash() != before


def test_guest_files_include_the_boot_hooks() -> None:
    names = {rel for rel, _ in iter_guest_files()}
    assert "usr/lib/deskpool/deskpool-identity" in names
    assert "etc/systemd/system/deskpool-identity.service" in names
    assert "etc/systemd/system/qemu-guest-agent.service" in names


def test_kernel_cmdline_boots_the_whole_disk_with_consoles() -> None:
    args = KERNEL_CMDLINE.split()
    assert "root=/dev/vda" in args and "rw" in args
    assert "console=tty0" in args and "net.ifnames=0" in args


@pytest.mark.parametrize(
    "kwargs",
    [{"suite": "Bookworm!"}, {"packages": ("ok", "bad name")}, {"image_size_mib": 100}],
)
def test_bad_recipe_fields_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        GuestRecipe(**kwargs)  # type: ignore[arg-type]


# --- cache and manifest, with fake build steps -----------------------------------------------


class FakeSteps:
    """Stands in for mmdebstrap and mkfs/qemu-img; counts builds and can fail on demand."""

    def __init__(self) -> None:
        self.builds = 0
        self.fail_in: str | None = None

    def bootstrap(self, rcp: GuestRecipe, rootfs: Path, staged: Path, report: object) -> None:
        self.builds += 1
        assert (staged / "usr/lib/deskpool/deskpool-identity").stat().st_mode & 0o111
        if self.fail_in == "bootstrap":
            raise ImageBuildError("mmdebstrap bookworm failed (exit 1): E: no network")
        (rootfs / "boot").mkdir(parents=True)
        (rootfs / "boot/vmlinuz-6.1.0-test-amd64").write_bytes(b"kernel" * 100)
        (rootfs / "boot/initrd.img-6.1.0-test-amd64").write_bytes(b"initrd" * 50)

    def run(self, step: str, cmd: list[str]) -> None:
        if self.fail_in == step:
            raise ImageBuildError(f"{step} failed (exit 1): disk full")
        if step == "mkfs.ext4":
            Path(cmd[-2]).write_bytes(b"\0" * 4096)
        elif step == "qemu-img convert":
            Path(cmd[-1]).write_bytes(b"QFI\xfb" + b"\0" * 1020)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeSteps:
    steps = FakeSteps()
    monkeypatch.setattr(builder, "_check_tools", lambda: None)
    monkeypatch.setattr(builder, "_bootstrap", steps.bootstrap)
    monkeypatch.setattr(builder, "_run", steps.run)
    return steps


def test_build_writes_a_manifest_and_is_found_in_the_cache(fake: FakeSteps, tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    image = build_guest_image(tmp_path, progress=lambda step, frac: seen.append((step, frac)))

    assert image.directory == tmp_path / DEFAULT_RECIPE.content_hash()
    assert image.recipe_hash == DEFAULT_RECIPE.content_hash()
    assert image.kernel.read_bytes() == b"kernel" * 100
    assert image.initrd.read_bytes() == b"initrd" * 50
    assert image.disk_sha256 == sha256_file(image.disk)
    assert image.cmdline == KERNEL_CMDLINE
    manifest = json.loads((image.directory / MANIFEST_NAME).read_text())
    assert manifest["kernel_version"] == "6.1.0-test-amd64"
    assert load_cached_image(tmp_path) == image
    # Progress only moves forward and ends at 100 %.
    fractions = [frac for _, frac in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # No work directory is left behind.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".work-")] == []


def test_second_build_uses_the_cache_and_force_rebuilds(fake: FakeSteps, tmp_path: Path) -> None:
    first = build_guest_image(tmp_path)
    assert build_guest_image(tmp_path) == first
    assert fake.builds == 1
    build_guest_image(tmp_path, force=True)
    assert fake.builds == 2


def test_directory_without_manifest_is_not_an_image(fake: FakeSteps, tmp_path: Path) -> None:
    half = tmp_path / DEFAULT_RECIPE.content_hash()
    half.mkdir()
    (half / "disk.qcow2").write_bytes(b"half-written")
    (half / "leftover.tmp").write_text("x")
    assert load_cached_image(tmp_path) is None

    image = build_guest_image(tmp_path)
    assert fake.builds == 1
    assert not (half / "leftover.tmp").exists()
    assert image.disk.read_bytes().startswith(b"QFI\xfb")


def _built(tmp_path: Path) -> GuestImage:
    image = load_cached_image(tmp_path)
    assert image is not None
    return image


def test_truncated_disk_or_other_recipe_manifest_is_not_taken(
    fake: FakeSteps, tmp_path: Path
) -> None:
    build_guest_image(tmp_path)
    image = _built(tmp_path)
    image.disk.write_bytes(b"short")
    assert load_cached_image(tmp_path) is None

    build_guest_image(tmp_path)
    image = _built(tmp_path)
    manifest_path = image.directory / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["recipe_hash"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    assert load_cached_image(tmp_path) is None
    manifest_path.write_text("{not json")
    assert load_cached_image(tmp_path) is None


def test_other_recipes_are_cached_side_by_side(fake: FakeSteps, tmp_path: Path) -> None:
    small = replace(DEFAULT_RECIPE, image_size_mib=1024)
    a = build_guest_image(tmp_path)
    b = build_guest_image(tmp_path, small)
    assert a.directory != b.directory
    assert load_cached_image(tmp_path, small) == b and load_cached_image(tmp_path) == a


@pytest.mark.parametrize(
    ("step", "named"),
    [("bootstrap", "mmdebstrap"), ("mkfs.ext4", "mkfs.ext4"), ("qemu-img convert", "qemu-img")],
)
def test_failed_step_cleans_up_and_names_the_step(
    fake: FakeSteps, tmp_path: Path, step: str, named: str
) -> None:
    fake.fail_in = step
    with pytest.raises(ImageBuildError, match=named):
        build_guest_image(tmp_path)
    assert load_cached_image(tmp_path) is None
    # Neither the half-built image directory nor the work directory is left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_unwritable_cache_is_an_image_build_error(fake: FakeSteps, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageBuildError, match="building the guest image"):
        build_guest_image(blocker / "cache")


def test_run_reports_the_failed_command_and_its_stderr_tail() -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do echo line$i >&2; done; exit 3"
    with pytest.raises(ImageBuildError) as err:
        builder._run("mkfs.ext4", ["sh", "-c", script])
    message = str(err.value)
    assert message.startswith("mkfs.ext4 failed (exit 3)")
    assert "line8" in message and "line1 " not in message


def test_run_names_a_missing_tool() -> None:
    with pytest.raises(ImageBuildError, match="no-such-tool-xyz is not installed"):
        builder._run("qemu-img convert", ["no-such-tool-xyz"])


def test_staged_guest_files_get_root_friendly_modes(tmp_path: Path) -> None:
    staged = builder._stage_guest_files(tmp_path / "guest")
    assert staged.stat().st_mode & 0o777 == 0o755
    assert (staged / "usr/lib/deskpool/qemu-ga-early").stat().st_mode & 0o777 == 0o755
    assert (staged / "etc/network/interfaces").stat().st_mode & 0o777 == 0o644
    assert (staged / "etc/systemd").stat().st_mode & 0o777 == 0o755
