"""The KVM probe (a QEMU booting the guest kernel, up to its timeout) dies with a broker that is
SIGKILLed. Found by bench/r1_kill.py: every broker killed while probing left its QEMU behind,
spinning forever on a host where KVM hangs, until the machine's load was in the thirties."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MARKER = "3000.4242"  # the stand-in QEMU's sleep, told apart from every other process


def _stand_ins() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:1] == [b"sleep"] and MARKER.encode() in argv:
                found.append(int(entry.name))
    return found


def test_a_probe_dies_with_the_broker_that_started_it(tmp_path: Path) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: the probe is never started here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"  # hangs, as a stock kernel under a broken KVM does
    qemu.write_text(f"#!/bin/sh\nexec sleep {MARKER}\n")
    qemu.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    broker = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from deskpool.drivers.libvirt.kvm_probe import kvm_boots_kernel; "
         "kvm_boots_kernel(Path(sys.argv[1]), timeout_s=600)", str(kernel)],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 30
        while not _stand_ins():
            assert broker.poll() is None, "the probe ended before it started its QEMU"
            assert time.monotonic() < deadline, "the probe's QEMU never started"
            time.sleep(0.1)
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _stand_ins() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _stand_ins(), "the probe's QEMU outlived its killed broker"
    finally:
        if broker.poll() is None:
            broker.kill()
        for pid in _stand_ins():  # only this test's stand-in, by its marker
            os.kill(pid, signal.SIGKILL)
