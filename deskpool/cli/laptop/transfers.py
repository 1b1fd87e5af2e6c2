"""Resumable transfers between the laptop and the broker, with progress bars.

Download (the base, then the layer): the file grows as ``.<name>.partial`` beside its final
name, in chunks of ``DOWNLOAD_CHUNK``; a chunk is recorded in the journal
(``.<name>.journal``) only once its bytes are on disk, so a cut (a dropped connection, a
killed process, Ctrl-C) resumes from the first chunk not recorded, with an HTTP Range. The
whole file's sha256 is then checked against the one the lease names (and the server's
header) before the file takes its final name: a half or damaged download is never used.

Upload (check-in, sync): the plan of changed blocks (``images.layer_delta``, reading only
the blocks ``images.layer_changes`` says may have changed) is kept in ``upload.plan`` until
the server commits it; the server journals each chunk it applied and
every answer lists what it still lacks, so a re-run sends only the rest. Each chunk's bytes
are checked against the plan as they are read (the laptop's end of the checksums) and again
by the server (its end), which also checks the whole file before its one atomic rename.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from deskpool.cli.laptop.broker import Broker, BrokerRefused
from deskpool.cli.laptop.store import write_private
from deskpool.domain.errors import DeskpoolError
from deskpool.images.layer_changes import changed_ranges, clear_sync_bitmap, cluster_map
from deskpool.images.layer_delta import (
    BlockManifest,
    LayerDelta,
    file_sha256,
    plan_with_manifest,
    read_chunk,
)

DOWNLOAD_CHUNK = 4 * 1024 * 1024
MAX_RESENDS = 3
BATCH_BYTES = 8 * 1024 * 1024 - 4096  # under the broker's 8 MiB cap on a batch of chunks
BATCH_CHUNKS = 4096  # the API's limit on indexes in one request
# The indexes travel in the query string: kept well under the server's 16 KiB request head.
BATCH_INDEX_TEXT = 8192
SHA256_HEADER = "x-deskpool-sha256"


class TransferDamaged(DeskpoolError):
    """A file arrived whole but its checksum is wrong: it was discarded, nothing used."""


def progress_bar(quiet: bool = False) -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    )


@dataclass
class DownloadJournal:
    """Which chunks of a download are on disk (``done``), for one size and checksum."""

    path: Path
    size: int
    sha256: str
    done: set[int]

    @classmethod
    def open(cls, path: Path, size: int, sha256: str) -> DownloadJournal:
        if path.is_file():
            kept = json.loads(path.read_text())
            if (
                kept.get("size") == size
                and kept.get("sha256") == sha256
                and kept.get("chunk") == DOWNLOAD_CHUNK
            ):
                return cls(path, size, sha256, set(kept["done"]))
        return cls(path, size, sha256, set())

    def record(self, index: int) -> None:
        self.done.add(index)
        write_private(
            self.path,
            json.dumps(
                {
                    "size": self.size,
                    "sha256": self.sha256,
                    "chunk": DOWNLOAD_CHUNK,
                    "done": sorted(self.done),
                }
            ).encode(),
        )

    def first_missing(self) -> int | None:
        chunks = -(-self.size // DOWNLOAD_CHUNK)
        return next((i for i in range(chunks) if i not in self.done), None)


def download(
    broker: Broker,
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    what: str,
    params: dict[str, str],
    progress: Progress,
    digest: Callable[[Path], str] = file_sha256,
) -> int:
    """``dest`` downloaded (resumed where a cut left it) and verified; the bytes fetched."""
    if dest.is_file():
        return 0
    partial = dest.with_name(f".{dest.name}.partial")
    journal = DownloadJournal.open(dest.with_name(f".{dest.name}.journal"), size, sha256)
    if not partial.exists():
        journal.done.clear()
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fetched = 0
    task = progress.add_task(
        what, total=size, completed=min(size, len(journal.done) * DOWNLOAD_CHUNK)
    )
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while (start := journal.first_missing()) is not None:
            offset = start * DOWNLOAD_CHUNK
            with broker.stream(url, params=params, headers={"range": f"bytes={offset}-"}) as answer:
                announced = answer.headers.get(SHA256_HEADER)
                if announced and announced != sha256:
                    raise TransferDamaged(
                        f"the server offers {what} with checksum "
                        f"{announced}, not the {sha256} the lease names; "
                        "nothing was kept"
                    )
                index, pending = start, bytearray()
                if answer.status_code != 206 and offset:  # Range ignored: from the start
                    journal.done.clear()
                    index = offset = 0
                for data in answer.iter_bytes(1024 * 1024):
                    pending += data
                    fetched += len(data)
                    progress.advance(task, len(data))
                    while len(pending) >= DOWNLOAD_CHUNK or (
                        pending and offset + len(pending) >= size
                    ):
                        piece = bytes(pending[:DOWNLOAD_CHUNK])
                        del pending[:DOWNLOAD_CHUNK]
                        os.pwrite(fd, piece, offset)
                        os.fsync(fd)  # on disk before the journal says so
                        journal.record(index)
                        index, offset = index + 1, offset + len(piece)
            if journal.first_missing() == start:
                raise TransferDamaged(
                    f"the server sent nothing of {what} from byte {offset}; run the command again"
                )
    finally:
        os.close(fd)
    os.truncate(partial, size)
    if digest(partial) != sha256:
        partial.unlink()
        journal.path.unlink(missing_ok=True)
        raise TransferDamaged(
            f"{what} arrived damaged (its sha256 is not {sha256}); it was "
            "discarded: run the command again to download it afresh"
        )
    os.replace(partial, dest)
    journal.path.unlink(missing_ok=True)
    return fetched


@dataclass
class UploadResult:
    answer: dict[str, object]  # the commit's answer (TransferDone)
    bytes_sent: int  # the plan and the chunks' bytes, resends included
    payload_bytes: int  # the chunks' bytes of the whole plan, as planned
    manifest: BlockManifest  # the layer as the server now has it
    cluster_map: bytes | None  # where its guest clusters lie in the file (``layer_changes``)
    incremental: bool  # planned from the change bitmap, not a whole read


def layer_stamp(layer: Path) -> list[int]:
    st = os.stat(layer)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def planned(
    layer: Path, plan_file: Path, since: BlockManifest, base_sha256: str,
    synced_map: bytes | None = None, clear_bitmap: bool = True,
) -> tuple[LayerDelta, BlockManifest, bytes | None, bool]:
    """The plan in flight if the layer is still as it was planned (same file, size and
    modification time), else a new one (kept first, with the manifest and the cluster map
    the server's copy will have once it is committed).

    Only the blocks that may differ are read (``layer_changes``), or all when that cannot
    be told. For a sync (``clear_bitmap``) the change bitmap is cleared *before* the read,
    once what it said is kept in ``upload.pending`` (until a commit): a cut anywhere loses
    no change, and the bitmap the server receives is the laptop's, so both files stay byte
    for byte the same. A check-in leaves the layer as it is (the laptop forgets it)."""
    manifest_file = plan_file.with_suffix(".manifest")
    map_file = plan_file.with_suffix(".map")
    stamp_file = plan_file.with_suffix(".stamp")
    pending_file = plan_file.with_suffix(".pending")
    if plan_file.is_file() and manifest_file.is_file() and stamp_file.is_file():
        kept = LayerDelta.decode(plan_file.read_bytes())
        if (
            kept.since_sha256 == since.digest
            and kept.base_sha256 == base_sha256
            and json.loads(stamp_file.read_text()) == layer_stamp(layer)
        ):
            return (kept, BlockManifest.decode(manifest_file.read_bytes()),
                    map_file.read_bytes() if map_file.is_file() else None, True)
    clusters = cluster_map(layer)
    fresh = changed_ranges(layer, synced_map, since.file_size, clusters)
    pending: list[list[int]] | None = []
    if pending_file.is_file():
        pending = json.loads(pending_file.read_text())
    candidates = None if fresh is None or pending is None else merge_ranges(
        [*((a, n) for a, n in pending), *fresh])
    write_private(pending_file, json.dumps(candidates).encode())
    if clear_bitmap:  # in place: no cluster moves
        clear_sync_bitmap(layer)
    stamp = layer_stamp(layer)
    delta, manifest = plan_with_manifest(layer, since, base_sha256, candidates)
    now_map = clusters
    write_private(manifest_file, manifest.encode())
    if now_map is not None:
        write_private(map_file, now_map)
    else:
        map_file.unlink(missing_ok=True)
    write_private(stamp_file, json.dumps(stamp).encode())
    write_private(plan_file, delta.encode())  # last: with it, the set is complete
    return delta, manifest, now_map, candidates is not None


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, n in sorted(ranges):
        if merged and first <= merged[-1][0] + merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], first + n - merged[-1][0]))
        else:
            merged.append((first, n))
    return merged


def upload(
    broker: Broker,
    desktop: str,
    laptop: str,
    layer: Path,
    plan_file: Path,
    since: BlockManifest,
    base_sha256: str,
    kind: str,
    progress: Progress,
    synced_map: bytes | None = None,
) -> UploadResult:
    """Send the layer's changes since ``since`` (a check-in or a sync); resumable."""
    delta, manifest, now_map, incremental = planned(layer, plan_file, since, base_sha256,
                                                    synced_map, clear_bitmap=kind == "sync")
    plan = delta.encode()
    params = {"laptop": laptop}
    base = f"/offline/desktops/{desktop}/transfer"
    answer = broker.call(
        "POST",
        base,
        params={**params, "kind": kind},
        content=plan,
        headers={"content-type": "application/octet-stream"},
    )
    sent = len(plan)
    missing: list[int] = list(answer["missing"])
    task = progress.add_task(
        f"{kind} {desktop}",
        total=delta.payload_bytes(),
        completed=delta.payload_bytes() - int(answer["bytes_pending"]),
    )

    def payload(batch: list[int]) -> bytes:
        return b"".join(read_chunk(layer, delta.chunks[i]) for i in batch)

    in_batches = batches(delta, missing)
    # The next batch is read and checked while the broker applies this one.
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = [reader.submit(payload, in_batches[0])] if in_batches else []
        for number, batch in enumerate(in_batches):
            data = ahead.pop().result()
            if number + 1 < len(in_batches):
                ahead.append(reader.submit(payload, in_batches[number + 1]))
            sent += _send_batch(broker, f"{base}/chunks", params, batch, data,
                                partial(payload, batch))
            progress.advance(task, sum(delta.chunks[i].wire_length for i in batch))
    done = broker.call("POST", f"{base}/commit", json={"laptop": laptop})
    plan_file.unlink(missing_ok=True)
    for suffix in (".manifest", ".map", ".stamp", ".pending"):
        plan_file.with_suffix(suffix).unlink(missing_ok=True)
    return UploadResult(
        answer=done, bytes_sent=sent, payload_bytes=delta.payload_bytes(), manifest=manifest,
        cluster_map=now_map, incremental=incremental,
    )


def _send_batch(broker: Broker, route: str, params: dict[str, str], batch: list[int],
                data: bytes, reread: Callable[[], bytes]) -> int:
    """One batch of chunks, sent again (read anew) when it was damaged on the way; the
    bytes sent."""
    sent = 0
    for attempt in range(MAX_RESENDS + 1):
        if attempt:
            data = reread()
        sent += len(data)
        try:
            broker.call("PUT", route, params={**params, "indexes": ",".join(map(str, batch))},
                        content=data, headers={"content-type": "application/octet-stream"})
            return sent
        except BrokerRefused as exc:  # 503 without Retry-After: damaged on the way
            if exc.status != 503 or attempt == MAX_RESENDS:
                raise
    return sent


def batches(delta: LayerDelta, missing: list[int]) -> list[list[int]]:
    """The missing chunks in requests of at most ``BATCH_BYTES`` (a bigger chunk alone):
    a round trip per 4 KiB chunk would cost more than the bytes."""
    found: list[list[int]] = []
    size = text = 0
    for index in missing:
        wire, digits = delta.chunks[index].wire_length, len(str(index)) + 1
        if (not found or size + wire > BATCH_BYTES or len(found[-1]) >= BATCH_CHUNKS
                or text + digits > BATCH_INDEX_TEXT):
            found.append([])
            size = text = 0
        found[-1].append(index)
        size += wire
        text += digits
    return found
