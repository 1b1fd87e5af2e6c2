"""What a VM's screen shows, from libvirt's screenshot (``virsh screenshot``): PNG on this
QEMU, PPM on older ones. Decoded with the standard library (Pillow is not a dependency).

A text console, whether VGA text mode (720x400, 640x480) or the kernel's framebuffer console
on the GPU driver (any resolution), draws with at most 16 colours and no anti-aliasing; a
graphical greeter or desktop draws anti-aliased text and icons in many more."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import libvirt

TEXT_MODES = ((720, 400), (640, 480))
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Screen:
    width: int
    height: int
    colours: int  # distinct RGB colours
    top_share: float  # share of the pixels in the most common colour

    def is_graphical(self) -> bool:
        """Something graphical drawn: a graphical resolution and anti-aliased drawing over
        more than a pointer on a blank screen (an X server up before its greeter has drawn:
        ~80 colours, from the pointer's edges, but 99.99 % one colour)."""
        return ((self.width, self.height) not in TEXT_MODES and self.width >= 800
                and self.colours > 64 and self.top_share < 0.98)


def screenshot(dom: libvirt.virDomain) -> tuple[str, bytes]:
    """(MIME type, image bytes) of the domain's first screen."""
    stream = dom.connect().newStream(0)
    try:
        mime = dom.screenshot(stream, 0, 0)
        chunks = []
        while True:
            got = stream.recv(1 << 18)
            if not isinstance(got, bytes):
                raise RuntimeError(f"the screenshot stream answered {got!r}")
            if not got:
                break
            chunks.append(got)
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    return mime, b"".join(chunks)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header, without decoding it."""
    if not data.startswith(_PNG_MAGIC):
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def analyse(mime: str, data: bytes) -> Screen:
    width, height, rgb = decode_ppm(data) if "pixmap" in mime else decode_png(data)
    counts = Counter(rgb[i:i + 3] for i in range(0, len(rgb), 3))
    top = counts.most_common(1)[0][1] if counts else 0
    return Screen(width, height, len(counts), top / max(1, width * height))


def save_png(mime: str, data: bytes, path: Path) -> Path:
    """The screenshot as a PNG file (a PPM is re-encoded)."""
    if "pixmap" in mime:
        width, height, rgb = decode_ppm(data)
        data = encode_png(width, height, rgb)
    path.write_bytes(data)
    return path


def decode_ppm(data: bytes) -> tuple[int, int, bytes]:
    fields, pos = [], 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError(f"unsupported PPM header {fields!r}")
    width, height = int(fields[1]), int(fields[2])
    return width, height, data[pos + 1:pos + 1 + width * height * 3]


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """8-bit RGB or RGBA, non-interlaced (what QEMU writes) -> (width, height, RGB bytes)."""
    width, height = png_size(data)
    depth, colour_type, _, _, interlace = data[24:29]
    bpp = {2: 3, 6: 4}.get(colour_type)
    if depth != 8 or bpp is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}, "
                         f"interlace {interlace}")
    idat, pos = bytearray(), 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    prev = bytearray(stride)
    out = bytearray()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(kind, line, prev, bpp)
        out += line
        prev = line
    if bpp == 4:
        del out[3::4]
    return width, height, bytes(out)


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    if kind == 2:  # Up: the common case for screens, done without a Python loop per byte
        line[:] = bytes(a + b & 0xFF for a, b in zip(line, prev, strict=True))
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = prev[i]
        if kind == 1:
            line[i] = line[i] + left & 0xFF
        elif kind == 3:
            line[i] = line[i] + (left + up) // 2 & 0xFF
        elif kind == 4:
            corner = prev[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = line[i] + pred & 0xFF
        else:
            raise ValueError(f"unknown PNG filter {kind}")


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    stride = width * 3
    raw = b"".join(b"\0" + rgb[r * stride:(r + 1) * stride] for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (_PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))
