"""Does KVM really boot a guest kernel on this machine?

``/dev/kvm`` opening and libvirt offering ``type='kvm'`` are not enough: under a nested PVM host
kernel (module ``kvm_pvm``) a stock guest kernel hangs with KVM after "Probing EDD". So we boot
the guest kernel itself under KVM with no root disk: a working KVM reaches "VFS: Unable to mount
root fs" and panics within seconds (``panic=-1`` + ``-no-reboot`` makes QEMU exit); a broken one
prints nothing and is killed at the timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import suppress
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
# util-linux's setpriv execs QEMU with a parent-death signal: a probe whose broker is killed
# (SIGKILL: no clean-up runs) dies with it instead of hanging on, a QEMU spinning forever.
SETPRIV = "setpriv"
_BOOTED_MARKERS = ("Kernel panic", "VFS: Unable to mount root")


def kvm_boots_kernel(kernel: Path, *, timeout_s: float = 12.0) -> bool:
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None or not kernel.exists() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="deskpool-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        setpriv = shutil.which(SETPRIV)
        argv = [
            *([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []),
            qemu, "-machine", "accel=kvm", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", f"file:{serial}", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/null",
        ]
        # A hung guest times out: the serial log decides, and it will show no panic.
        with suppress(subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
        text = serial.read_text(errors="replace") if serial.exists() else ""
    return any(marker in text for marker in _BOOTED_MARKERS)
