"""libvirt QEMU save images (``virDomainSave``): read the header, clone it with new domain XML.

Instant clones restore many VMs from one saved memory state. ``virDomainRestoreFlags`` accepts a
changed disk path but refuses a changed name or UUID, so deskpool writes a copy of the save file
whose *embedded* XML names the new VM, and restores that copy with ``conn.restore(copy)``.

Layout, as libvirt 9.0 writes it (``src/qemu/qemu_saveimage.[ch]``; checked on a real file):

* a 92-byte header: 16-byte magic ``LibvirtQemudSave`` (``LibvirtQemudPart`` while the save is
  still being written), then native-endian uint32 ``version`` (2), ``data_len``,
  ``was_running``, ``compressed`` (0 = raw), ``cookieOffset``, and 14 unused uint32s;
* ``data_len`` bytes: domain XML, NUL, then (at ``cookieOffset``, relative to this area, 0 when
  there is no cookie) the cookie XML, NUL, then zero padding. libvirt sizes the area as the two
  strings plus 64 KiB, so the XML can be edited in place (``virsh save-image-edit``);
* the QEMU migration stream (``QEVM`` magic), up to the end of the file.

Compressed images (``save_image_format`` in qemu.conf) are refused: their header is the same, but
restoring a rewritten compressed image was not verified.
"""

# The XML parsed here (`nosec B314`) is libvirt's own (domain, volume, pool, capabilities
# documents) or deskpool's, never a user's; Python's expat fetches no external entity and
# bounds entity expansion.

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import tempfile
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from deskpool.domain.errors import DriverError
from deskpool.drivers.libvirt.xml import METADATA_NS, METADATA_PREFIX

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
SUPPORTED_VERSION = 2
HEADER = struct.Struct("=16s5I14I")  # native byte order, no padding: 92 bytes
HEADER_SIZE = HEADER.size
PADDING = 64 * 1024  # what libvirt adds to a fresh data area
STREAM_MAGIC = b"QEVM"  # QEMU migration stream (uncompressed)
_FICLONE = 0x40049409  # ioctl: share all extents of one file with another (reflink)


class SaveImageError(DriverError):
    """A save image is malformed, of a kind deskpool does not handle, or could not be written."""


@dataclass(frozen=True)
class SaveImage:
    """The parsed header of a libvirt QEMU save image."""

    version: int
    data_len: int
    was_running: bool
    compressed: int
    cookie_offset: int
    domain_xml: str
    cookie_xml: str | None
    stream_offset: int  # file offset of the migration stream: HEADER_SIZE + data_len


def _c_string(path: Path, area: bytes, what: str) -> str:
    end = area.find(b"\0")
    if end < 0:
        raise SaveImageError(f"save image {path}: the {what} has no terminating NUL byte")
    try:
        return area[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaveImageError(f"save image {path}: the {what} is not UTF-8 ({exc})") from exc


def _check_header(path: Path, head: bytes, size: int) -> tuple[int, int, int, int, int]:
    """The header's version, data_len, was_running, compressed, cookieOffset, once checked."""
    if len(head) < HEADER_SIZE:
        raise SaveImageError(
            f"save image {path} is truncated: {size} bytes, the header needs {HEADER_SIZE}"
        )
    magic, version, data_len, was_running, compressed, cookie_offset, *_ = HEADER.unpack(head)
    if magic == PARTIAL_MAGIC:
        raise SaveImageError(
            f"save image {path} is incomplete (magic {PARTIAL_MAGIC.decode()}): "
            "the save was interrupted"
        )
    if magic != MAGIC:
        raise SaveImageError(f"{path} is not a libvirt QEMU save image: bad magic {magic!r}")
    if version != SUPPORTED_VERSION:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big") == SUPPORTED_VERSION
        raise SaveImageError(
            f"save image {path} has unknown version {version}"
            f"{' (other byte order)' if swapped else ''}; "
            f"only version {SUPPORTED_VERSION} is supported"
        )
    if compressed != 0:
        raise SaveImageError(
            f"save image {path} is compressed (format {compressed}); "
            "only raw (0) images are supported"
        )
    if was_running not in (0, 1):
        raise SaveImageError(f"save image {path} has was_running={was_running}, not 0 or 1")
    if data_len == 0:
        raise SaveImageError(f"save image {path} has data_len 0: no domain XML")
    if HEADER_SIZE + data_len + len(STREAM_MAGIC) > size:
        raise SaveImageError(
            f"save image {path}: data_len {data_len} runs past the end of the file "
            f"({size} bytes) or leaves no migration stream"
        )
    if cookie_offset >= data_len:
        raise SaveImageError(
            f"save image {path}: cookieOffset {cookie_offset} is not inside data_len {data_len}"
        )
    return version, data_len, was_running, compressed, cookie_offset


def read_save_image(path: Path) -> SaveImage:
    """Parse and check the header of ``path``; raise :class:`SaveImageError` if it is unusable."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            version, data_len, was_running, compressed, cookie_offset = _check_header(
                path, f.read(HEADER_SIZE), size
            )
            data = f.read(data_len)
            stream_magic = f.read(len(STREAM_MAGIC))
    except OSError as exc:
        raise SaveImageError(f"cannot read save image {path}: {exc}") from exc
    xml_area = data[:cookie_offset] if cookie_offset else data
    domain_xml = _c_string(path, xml_area, "domain XML")
    cookie_xml = _c_string(path, data[cookie_offset:], "cookie XML") if cookie_offset else None
    if stream_magic != STREAM_MAGIC:
        raise SaveImageError(
            f"save image {path}: no QEMU migration stream at offset {HEADER_SIZE + data_len} "
            f"(found {stream_magic!r}, expected {STREAM_MAGIC!r}); data_len is wrong"
        )
    return SaveImage(version, data_len, bool(was_running), compressed, cookie_offset,
                     domain_xml, cookie_xml, HEADER_SIZE + data_len)


def _copy_range(src: int, dst: int, count: int, src_off: int, dst_off: int) -> None:
    """Copy ``count`` bytes in the kernel (copy_file_range), else through a buffer."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
    except OSError:  # EXDEV, ENOSYS, EINVAL on some file systems: fall back to read/write
        pass
    while done < count:
        chunk = os.pread(src, min(8 << 20, count - done), src_off + done)
        if not chunk:
            break
        os.pwrite(dst, chunk, dst_off + done)
        done += len(chunk)
    if done != count:
        raise OSError(f"short copy: {done} of {count} bytes (source shrank?)")


def write_save_image_clone(
    source: Path, target: Path, domain_xml: str, *, durable: bool = False
) -> None:
    """Write ``target``: ``source`` with its embedded domain XML replaced, cookie kept.

    When the new XML and the cookie fit into the source's ``data_len``, the file is copied whole
    (a reflink where the file system supports it, else ``copy_file_range``) and the header and
    data area are patched in place, so the stream keeps its offset. Otherwise ``data_len`` grows
    to the two strings plus 64 KiB, as libvirt sizes it, and the stream is copied after it.

    The copy goes to a temporary file next to ``target`` that is renamed over it at the end: on
    any error no (partial) target is left. ``durable=True`` fsyncs file and directory first.
    """
    image = read_save_image(source)
    if "\0" in domain_xml:
        raise SaveImageError(f"new domain XML for {target} contains a NUL character")
    try:
        ET.fromstring(domain_xml)  # nosec B314
    except ET.ParseError as exc:
        raise SaveImageError(f"new domain XML for {target} is not well-formed: {exc}") from exc
    xml_bytes = domain_xml.encode("utf-8") + b"\0"
    cookie = b"" if image.cookie_xml is None else image.cookie_xml.encode("utf-8") + b"\0"
    needed = len(xml_bytes) + len(cookie)
    in_place = needed <= image.data_len
    data_len = image.data_len if in_place else needed + PADDING
    if data_len > 0xFFFFFFFF:
        raise SaveImageError(f"new domain XML for {target} is too large for a save image")
    cookie_offset = len(xml_bytes) if image.cookie_xml is not None else 0
    area = (xml_bytes + cookie).ljust(data_len, b"\0")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".tmp")
    except OSError as exc:
        raise SaveImageError(f"cannot create save image clone {target}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with open(source, "rb") as src:
            head = bytearray(src.read(HEADER_SIZE))
            fields = HEADER.unpack(head)
            if fields[1:6] != (image.version, image.data_len, int(image.was_running),
                               image.compressed, image.cookie_offset):
                raise SaveImageError(f"save image {source} changed while it was being cloned")
            struct.pack_into("=I", head, 20, data_len)  # the other fields stay as they were
            struct.pack_into("=I", head, 32, cookie_offset)
            stream_len = os.fstat(src.fileno()).st_size - image.stream_offset
            if in_place:
                try:
                    fcntl.ioctl(fd, _FICLONE, src.fileno())
                except OSError:
                    _copy_range(src.fileno(), fd, image.stream_offset + stream_len, 0, 0)
            else:
                _copy_range(src.fileno(), fd, stream_len, image.stream_offset,
                            HEADER_SIZE + data_len)
        os.pwrite(fd, bytes(head) + area, 0)
        os.ftruncate(fd, HEADER_SIZE + data_len + stream_len)
        os.fchmod(fd, 0o600)  # like libvirt's own save files: guest memory is private
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        tmp.replace(target)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise SaveImageError(f"cannot write save image clone {target}: {exc}") from exc
        raise
    if durable:  # the rename itself; the clone is complete either way
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def retarget_domain_xml(
    domain_xml: str,
    *,
    name: str,
    uuid: uuid.UUID,
    disk_path: str,
    disk_target: str = "vda",
) -> str:
    """The saved domain XML made to describe a new VM: new ``<name>``, ``<uuid>`` and the
    ``<source file>`` of the file disk whose ``<target dev>`` is ``disk_target``.

    Also changed, because they belong to those: an SMBIOS ``<sysinfo>`` system ``uuid`` entry
    (libvirt refuses a mismatch), and the retargeted disk's ``<backingStore>`` element, which
    describes the *old* file's chain (an empty one would make QEMU open the new overlay without
    its backing file); libvirt then probes the new file's chain. The disk's ``<driver type>`` is
    kept, so the new file must have the old file's format (qcow2 overlay for a qcow2 disk).

    Everything else is kept as it was, the MAC addresses included: the restored guest keeps
    the MAC it had when it was saved, whatever the XML says. Giving a clone its own MAC is done
    after the restore by detaching the template's NIC and attaching a new one (LIVE), not here.
    Comments are kept; namespace prefixes other than deskpool's may be renamed (same URIs).
    """
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
    parser = ET.XMLParser(target=builder)  # nosec B314
    try:
        root = ET.fromstring(domain_xml, parser=parser)  # nosec B314
    except ET.ParseError as exc:
        raise SaveImageError(f"saved domain XML is not well-formed: {exc}") from exc
    if root.tag != "domain":
        raise SaveImageError(f"saved domain XML has root <{root.tag}>, not <domain>")
    name_el = root.find("name")
    if name_el is None:
        raise SaveImageError("saved domain XML has no <name>")
    old_uuid = root.findtext("uuid")
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.Element("uuid")
        root.insert(list(root).index(name_el) + 1, uuid_el)
    name_el.text = name
    uuid_el.text = str(uuid)
    for entry in root.iterfind("sysinfo[@type='smbios']/system/entry[@name='uuid']"):
        if old_uuid is None or (entry.text or "").strip().lower() == old_uuid.strip().lower():
            entry.text = str(uuid)
    disks = [d for d in root.iterfind("devices/disk")
             if d.find(f"target[@dev='{disk_target}']") is not None]
    if len(disks) != 1:
        raise SaveImageError(f"saved domain XML has {len(disks)} disks with target '{disk_target}'")
    disk = disks[0]
    source = disk.find("source")
    if disk.get("type", "file") != "file" or source is None or source.get("file") is None:
        raise SaveImageError(f"disk '{disk_target}' in the saved domain XML is not a file disk")
    source.set("file", disk_path)
    for backing in disk.findall("backingStore"):
        disk.remove(backing)
    return ET.tostring(root, encoding="unicode")
