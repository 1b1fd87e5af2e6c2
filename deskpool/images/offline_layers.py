"""The writable layer of an offline desktop on a laptop: an encrypted qcow2 over a plain base.

The layer is qcow2 with LUKS encryption (AES-256-XTS) whose passphrase is the check-out's
random 256-bit data key (``deskpool.domain.offline_keys``), hex-encoded because QEMU wants a
UTF-8 passphrase. The cached base (template) it is backed by stays plain: it holds nothing of
the user's.

Geometry: 128 KiB clusters with ``extended_l2=on``, i.e. 32 subclusters of 4 KiB. A 4 KiB guest
write allocates one 4 KiB subcluster (no copy-on-write from the base), and one 4 KiB page of L2
table maps 32 MiB of disk, so the metadata a check-in must carry besides the data stays small
(with plain 4 KiB clusters a page maps 2 MiB: scattered writes then cost one metadata page
each, measured 1.13-1.45x instead of 1.01-1.04x). The unwritten rest of a cluster is a hole in
the file on the laptop and costs nothing in the delta (see ``layer_delta``).

The key reaches QEMU through a pipe (``--object secret,file=/dev/fd/N``): it is never on a
command line, in the environment, or in a file on disk. PBKDF2 in LUKS is set to its minimum
(``iter-time=10``) because the passphrase is a random key, not a human password; the user's
password is stretched by Argon2id where the data key is wrapped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import InvalidInput, PermanentError
from deskpool.images.builder import fsync_path
from deskpool.images.layer_changes import SYNC_BITMAP

CLUSTER_SIZE = 128 * 1024
SUBCLUSTER_SIZE = CLUSTER_SIZE // 32  # extended L2: 32 subclusters per cluster
_SECRET_ID = "layerkey0"
_MAX_READ = 16 * 1024 * 1024  # qemu-io's hex dump is ~4.5 bytes per byte read
_HEX_LINE = re.compile(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})")


class OfflineLayerError(PermanentError):
    """qemu-img or qemu-io refused the layer (wrong key, corrupt, not an encrypted layer)."""


@dataclass(frozen=True)
class Extent:
    """A guest byte range the layer itself holds (not read through to the base)."""

    start: int
    length: int
    zero: bool  # the layer says "zeros here" (a discard) rather than holding data


@dataclass(frozen=True)
class LayerFacts:
    virtual_size: int
    cluster_size: int
    encrypted: bool
    encrypt_format: str | None
    cipher_alg: str | None
    backing_file: str | None


# Every layer, made empty or from a desktop's disk: LUKS AES-256-XTS, PBKDF2 at its minimum
# (the passphrase is a random key, not a password), and the geometry above.
_LAYER_OPTIONS = ",".join([
    "encrypt.format=luks", f"encrypt.key-secret={_SECRET_ID}", "encrypt.cipher-alg=aes-256",
    "encrypt.cipher-mode=xts", "encrypt.iter-time=10",
    f"cluster_size={CLUSTER_SIZE}", "extended_l2=on",
])


def _passphrase(data_key: bytes) -> bytes:
    if len(data_key) != 32:
        raise InvalidInput("a layer's data key is 32 bytes")
    return data_key.hex().encode("ascii")


@contextmanager
def _key_pipe(data_key: bytes) -> Iterator[tuple[str, int]]:
    """``--object`` text naming a pipe that holds the passphrase, and the fd to pass on.
    64 bytes fit in any pipe buffer, so writing before the reader starts cannot block."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, _passphrase(data_key))
        os.close(write_fd)
        write_fd = -1
        yield f"secret,id={_SECRET_ID},file=/dev/fd/{read_fd}", read_fd
    finally:
        if write_fd != -1:
            os.close(write_fd)
        os.close(read_fd)


def layer_spec(layer: Path, *, with_backing: bool) -> str:
    """The layer as a ``json:`` image spec with its key. Without backing, the layer alone:
    what it holds, not what the guest sees through it."""
    spec: dict[str, object] = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(layer)},
        "encrypt": {"key-secret": _SECRET_ID},
    }
    if not with_backing:
        spec["backing"] = None
    return "json:" + json.dumps(spec, sort_keys=True)


# LUKS times PBKDF2 on the thread's CPU clock before it writes a header; on a host whose
# clock ticks coarsely (a VM, under load), it can measure 0 ms and give up (2 times in 5 seen
# here). It is a measurement, not a refusal: asked again, it works.
_PBKDF_UNTIMED = "Unable to get accurate CPU usage"
_PBKDF_TRIES = 8


def _run(argv: list[str], data_key: bytes | None, what: str,
         ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    for _ in range(_PBKDF_TRIES - 1):
        result = _run_once(argv, data_key)
        if result.returncode in ok_codes or _PBKDF_UNTIMED not in result.stderr:
            break
    else:
        result = _run_once(argv, data_key)
    if result.returncode not in ok_codes:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise OfflineLayerError(f"{what} failed: {detail[-1] if detail else result.returncode}")
    return result


def _run_once(argv: list[str], data_key: bytes | None) -> subprocess.CompletedProcess[str]:
    if data_key is None:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    else:
        # ``--object`` goes after qemu-img's subcommand, first for qemu-io.
        at = 2 if argv[0] == "qemu-img" else 1
        with _key_pipe(data_key) as (obj, fd):
            result = subprocess.run([*argv[:at], "--object", obj, *argv[at:]],
                                    capture_output=True, text=True, check=False,
                                    pass_fds=(fd,))
    return result


def create_encrypted_layer(layer: Path, base: Path, data_key: bytes, *,
                           base_format: str = "qcow2") -> None:
    """Make ``layer``: empty, encrypted with ``data_key``, backed by ``base``.

    The backing name written into the layer is relative to the layer's directory, so the same
    file (byte for byte) works on the laptop and on the server next to their own copy of the
    base. The file is created 0600 before qemu-img fills it (qemu-img keeps the mode).
    """
    if layer.exists():
        raise InvalidInput(f"{layer} already exists; a layer is never overwritten")
    if not base.is_file():
        raise InvalidInput(f"the base image {base} does not exist")
    backing = os.path.relpath(base.resolve(), layer.parent.resolve())
    fd = os.open(layer, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", _LAYER_OPTIONS, "-b", backing,
            "-F", base_format, str(layer)]
    try:
        _run(argv, data_key, f"creating the offline layer {layer}")  # retried: see _run
        add_sync_bitmap(layer, data_key)
    except BaseException:
        layer.unlink(missing_ok=True)
        raise


def add_sync_bitmap(layer: Path, data_key: bytes) -> None:
    """The persistent dirty bitmap QEMU keeps up to date in the layer on the laptop, so a
    check-in knows what changed without reading the layer (``layer_changes``)."""
    _run(["qemu-img", "bitmap", "--add", "-g", str(SUBCLUSTER_SIZE),
          layer_spec(layer, with_backing=False), SYNC_BITMAP], data_key,
         f"adding the change bitmap to {layer}")


def layer_facts(layer: Path) -> LayerFacts:
    """What ``qemu-img info`` says (needs no key: the qcow2 and LUKS headers are plain)."""
    info = json.loads(_run(["qemu-img", "info", "--output=json", "-U", str(layer)], None,
                           f"reading {layer}").stdout)
    encrypt = info.get("format-specific", {}).get("data", {}).get("encrypt", {})
    return LayerFacts(
        virtual_size=int(info["virtual-size"]),
        cluster_size=int(info.get("cluster-size", 0)),
        encrypted=bool(info.get("encrypted", False)),
        encrypt_format=encrypt.get("format"),
        cipher_alg=encrypt.get("cipher-alg"),
        backing_file=info.get("backing-filename"),
    )


def allocated_extents(layer: Path, data_key: bytes) -> list[Extent]:
    """What the layer itself holds, in guest offsets (``qemu-img map`` of the layer alone):
    the bytes the guest changed since the layer was made."""
    result = _run(["qemu-img", "map", "--output=json", layer_spec(layer, with_backing=False)],
                  data_key, f"mapping {layer}")
    extents = []
    for entry in json.loads(result.stdout):
        if entry.get("present", entry.get("data")):
            extents.append(Extent(start=int(entry["start"]), length=int(entry["length"]),
                                  zero=not entry["data"]))
    return extents


def read_guest_bytes(layer: Path, data_key: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` as the guest sees them (layer over its base), decrypted
    in memory only. For checks and small reads: it parses qemu-io's hex dump."""
    if not 0 < length <= _MAX_READ or offset < 0:
        raise InvalidInput(f"read at most {_MAX_READ} bytes at a non-negative offset")
    result = _run(["qemu-io", "-r", "-c", f"read -v {offset} {length}",
                   layer_spec(layer, with_backing=True)], data_key, f"reading {layer}")
    out = bytearray()
    for line in result.stdout.splitlines():
        match = _HEX_LINE.match(line)
        if match:
            out += bytes.fromhex(match.group(1))
    if len(out) != length:
        raise OfflineLayerError(f"reading {layer} returned {len(out)} of {length} bytes")
    return bytes(out)


def check_layer(layer: Path, data_key: bytes) -> None:
    """The layer is LUKS AES-256 encrypted and ``qemu-img check`` of it alone (its base need
    not be present) passes. Leaked clusters (exit 3, left by a power cut) waste space but lose
    nothing, so they pass; corruption, another key or an unencrypted image do not (qemu opens
    a plain qcow2 even when given a key, hence the explicit look at the header)."""
    facts = layer_facts(layer)
    if not (facts.encrypted and facts.encrypt_format == "luks"
            and facts.cipher_alg == "aes-256"):
        raise OfflineLayerError(f"{layer} is not a LUKS AES-256 encrypted layer")
    _run(["qemu-img", "check", "-q", layer_spec(layer, with_backing=False)], data_key,
         f"checking {layer}", ok_codes=(0, 3))


# --- the desktop's own disk and its layer, both ways, on the host ------------------------
#
# At check-out the desktop's root overlay (plain qcow2 over the template on the host) becomes
# the server's copy of the layer, holding exactly the clusters the overlay holds
# (``qemu-img convert -B``: what the base has is not copied); at check-in the layer becomes
# the desktop's root again, over the host's copy of the template. Both write a new file next
# to the target and rename it over, so a failure leaves the old file as it was.


def _fresh(target: Path) -> Path:
    """A new, empty 0600 file beside ``target`` to write into first."""
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return partial


def layer_from_overlay(overlay: Path, layer: Path, base: Path, data_key: bytes) -> None:
    """Make ``layer`` (replacing any) an encrypted layer over ``base`` with the clusters
    ``overlay`` holds; ``overlay``'s own backing file must hold what ``base`` holds (the
    template on the host, ``base`` its copy by checksum)."""
    for path, what in ((overlay, "the desktop's disk"), (base, "the base image")):
        if not path.is_file():
            raise InvalidInput(f"{what} {path} does not exist")
    layer.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a first check-out's
    partial = _fresh(layer)
    try:
        # The backing name is relative to the layer's directory, as for a layer made empty.
        backing = os.path.relpath(base.resolve(), layer.parent.resolve())
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", "-o", _LAYER_OPTIONS,
              "-B", backing, "-F", "qcow2", str(overlay), str(partial)], data_key,
             f"making the offline layer of {overlay}")
        add_sync_bitmap(partial, data_key)
        check_layer(partial, data_key)
        os.replace(partial, layer)
        fsync_path(layer.parent)
    finally:
        partial.unlink(missing_ok=True)


def overlay_from_layer(layer: Path, data_key: bytes, overlay: Path, base: Path) -> None:
    """Replace ``overlay`` (the desktop's root, its VM off) by a plain qcow2 over ``base`` (the
    template on the host) with the clusters ``layer`` holds; its mode and owner kept."""
    if not base.is_file():
        raise InvalidInput(f"the template {base} is not on the host")
    check_layer(layer, data_key)
    old = overlay.stat() if overlay.exists() else None
    partial = _fresh(overlay)
    try:
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", "-B", str(base), "-F", "qcow2",
              layer_spec(layer, with_backing=True), str(partial)], data_key,
             f"rebuilding {overlay} from its offline layer")
        if old is not None:
            os.chmod(partial, old.st_mode & 0o7777)
            os.chown(partial, old.st_uid, old.st_gid)
        os.replace(partial, overlay)
        fsync_path(overlay.parent)
    finally:
        partial.unlink(missing_ok=True)
