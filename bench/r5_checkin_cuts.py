"""R5: check-ins cut at random moments and resumed never leave the server with another image.

Each round checks alice's desktop out to the laptop (the fake driver, no VM), lets the
"guest" write a few seeded scattered and contiguous blocks (``qemu-io``), and checks it in
through the real client (``deskpool offline checkin``) against a real server in this process,
cut at a random moment in one of three ways:

* kill: the client runs as a child process, SIGKILLed a random time after its first request
  (mid-request or between two, the connection drops with it);
* drop-before: the connection fails before the N-th request reaches the server;
* drop-after: the N-th request is served but its answer is lost (the commit's included).

Then the check-in is run again to completion, and the server's layer file is compared with
the laptop's by sha256. Seeded (the seed is printed first). Last line: ``R5 <check-ins whose
final server image differs from the laptop's>`` (target: 0).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MiB = 2**20


def child(laptop_dir: str, kill_after: float) -> None:
    """The client's check-in, killed ``kill_after`` seconds after its first request."""
    from deskpool.cli.laptop import broker
    from deskpool.cli.main import app

    real_call = broker.Broker.call
    armed: list[threading.Timer] = []

    def call(self: broker.Broker, method: str, path: str, **kw: Any) -> Any:
        if not armed:
            armed.append(threading.Timer(kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL)))
            armed[0].start()
        return real_call(self, method, path, **kw)

    broker.Broker.call = call  # type: ignore[method-assign]
    app(
        [
            "offline",
            "checkin",
            "home-01",
            "--dir",
            laptop_dir,
            "--quiet",
            "--libvirt-uri",
            "test:///default",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--writes", type=int, default=40)
    parser.add_argument(
        "--child", nargs=2, metavar=("LAPTOP_DIR", "KILL_AFTER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]))
        return
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"seed {seed}", flush=True)
    rnd = random.Random(seed)

    sys.path.insert(0, str(BENCH))
    from offline_world import LAPTOP, OFFLINE_PASSWORD, offline_bench
    from p4_offline import qemu_io

    from deskpool.cli.laptop import broker
    from deskpool.cli.laptop.store import LaptopDir
    from deskpool.domain.offline_keys import KeyBinding, UserWrappedKey, unwrap_for_user
    from deskpool.images.layer_delta import file_sha256

    differs = killed = 0
    modes: dict[str, int] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="r5-") as tmp, offline_bench(Path(tmp) / "world") as b:
        here = LaptopDir(b.laptop_dir)
        for round_ in range(args.rounds):
            b.offline("checkout", "home-01", "--laptop", LAPTOP, "--quiet", password=True)
            rec = here.load("home-01")
            key = unwrap_for_user(
                UserWrappedKey.from_json(rec.wrapped_key),
                OFFLINE_PASSWORD,
                KeyBinding(rec.user, uuid.UUID(rec.desktop_id), rec.laptop),
            )
            writes = [
                f"write -q -P {rnd.randrange(1, 255)} "
                f"{rnd.randrange(0, 60 * MiB // 4096) * 4096} "
                f"{rnd.choice([4096, 16384, 65536, 262144])}"
                for _ in range(args.writes)
            ]
            qemu_io(here.layer(rec), key, writes)
            laptop_sha = file_sha256(here.layer(rec))
            mode = rnd.choice(["kill", "drop-before", "drop-after"])
            modes[mode] = modes.get(mode, 0) + 1
            if mode == "kill":
                ran = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(b.laptop_dir),
                        f"{rnd.uniform(0.0, 0.8):.3f}",
                    ],
                    capture_output=True,
                    check=False,
                    timeout=300,
                )
                killed += ran.returncode == -signal.SIGKILL
            else:
                cut_at = rnd.randrange(1, 6)  # the plan, the batches, the commit
                real_call = broker.Broker.call
                calls = [0]

                def cut(
                    self: broker.Broker,
                    method: str,
                    path: str,
                    *,
                    calls: list[int] = calls,
                    cut_at: int = cut_at,
                    mode: str = mode,
                    real_call: Any = real_call,
                    **kw: Any,
                ) -> Any:
                    calls[0] += 1
                    if calls[0] == cut_at and mode == "drop-before":
                        raise broker.BrokerUnreachable("connection dropped (R5)")
                    answer = real_call(self, method, path, **kw)
                    if calls[0] == cut_at:
                        raise broker.BrokerUnreachable("answer lost (R5)")
                    return answer

                broker.Broker.call = cut  # type: ignore[method-assign]
                try:
                    b.offline("checkin", "home-01", "--quiet", "--libvirt-uri", "test:///default")
                except RuntimeError:
                    pass  # the cut
                finally:
                    broker.Broker.call = real_call  # type: ignore[method-assign]
            if here.find("home-01") is not None:  # not finished before the cut: resume
                try:
                    b.offline("checkin", "home-01", "--quiet", "--libvirt-uri", "test:///default")
                except RuntimeError as exc:
                    # The commit went through and only its answer was lost: the broker has
                    # no check-out left; the client says so and keeps its copy.
                    if "has no check-out of home-01 any more" not in str(exc):
                        raise
                    here.forget(rec)
            server_sha = file_sha256(b.server_layer())
            state = b.world.client("alice").get("/api/v1/offline/desktops").json()[0]["state"]
            if server_sha != laptop_sha or state != "ready":
                differs += 1
                print(
                    f"round {round_} ({mode}): server {server_sha[:12]} laptop "
                    f"{laptop_sha[:12]}, desktop {state}",
                    flush=True,
                )
            if (round_ + 1) % 10 == 0:
                print(
                    f"{round_ + 1} check-ins, {differs} differ "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    print(
        f"cuts: {', '.join(f'{k} {v}' for k, v in sorted(modes.items()))} "
        f"({killed} clients killed mid-check-in, the other kill rounds finished first)"
    )
    print(f"R5 {differs}")


if __name__ == "__main__":
    main()
