"""``deskpool serve``: one broker process. It runs the HTTP app (uvicorn), the console proxies
(websockify for the browser's VNC, an HTTP CONNECT proxy for remote-viewer's SPICE, a
ticketed RDP proxy for .rdp files; threads),
the reconciler loop and the session timers loop.

Every loop keeps its progress in the database, so a killed broker resumes where it stopped.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

from deskpool.api.app import create_app
from deskpool.api.console_proxy import ConsoleProxyServer
from deskpool.api.observability import configure_logging
from deskpool.api.rdp_proxy import RdpProxyServer
from deskpool.api.spice_proxy import SpiceProxyServer
from deskpool.api.tls import tls_files
from deskpool.broker.console import RdpAdmission, SpiceAdmission
from deskpool.broker.sessions import SessionService
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext

log = logging.getLogger(__name__)


def _timers_forever(ctx: ServiceContext, stop: threading.Event, interval_s: float) -> None:
    sessions = SessionService(ctx, guest_poll_s=15.0)
    while not stop.is_set():
        try:
            report = sessions.run_timers()
            for error in report.errors:
                log.warning("session timers: %s", error)
        except Exception:  # one bad tick must not end the loop
            log.exception("session timers failed")
        stop.wait(interval_s)


def serve(ctx: ServiceContext, *, host: str, port: int, console_port: int,
          spice_port: int | None = None, rdp_port: int | None = None,
          workers: int = 4) -> None:
    configure_logging(ctx.settings)  # text, or JSON lines (DESKPOOL_LOG_FORMAT=json)
    stop = threading.Event()
    settings = ctx.settings
    reconciler = Reconciler(ctx, workers=workers)
    tls = tls_files(settings)  # a wrong file stops the broker here, before anything runs
    log.info("broker %s starting on %s://%s:%s", reconciler.owner,
             "https" if tls else "http", host, port)
    # The console proxy runs in this process (threads), so it shares the drivers: consoles
    # of in-memory fake hosts work too. ``python -m deskpool.api.console_proxy`` runs it alone.
    proxy = ConsoleProxyServer(ctx, host, console_port,
                               tls=tls.server_context() if tls else None)
    spice = SpiceProxyServer(SpiceAdmission(ctx), host, settings.spice_proxy_port
                             if spice_port is None else spice_port)
    rdp_port = settings.rdp_proxy_port if rdp_port is None else rdp_port
    rdp = RdpProxyServer(RdpAdmission(ctx), host, rdp_port) if rdp_port else None
    loops = [
        threading.Thread(target=proxy.serve_forever, name="console-proxy", daemon=True),
        threading.Thread(target=spice.serve_forever, name="spice-proxy", daemon=True),
        threading.Thread(target=reconciler.run_forever,
                         args=(stop, settings.reconcile_interval_s), name="reconciler",
                         daemon=True),
        threading.Thread(target=_timers_forever, args=(ctx, stop, settings.timers_interval_s),
                         name="session-timers", daemon=True),
    ]
    if rdp is not None:
        loops.append(threading.Thread(target=rdp.serve_forever, name="rdp-proxy", daemon=True))
    for loop in loops:
        loop.start()
    try:
        uvicorn.run(create_app(ctx, console_ws_port=console_port,
                               spice_proxy_port=spice.port,
                               rdp_proxy_port=rdp.port if rdp else None),
                    host=host, port=port,
                    log_level="warning", timeout_graceful_shutdown=5,
                    # uvicorn's own lines go through the root handler: one format (JSON too).
                    log_config=None,
                    # The app has no start-up or shut-down hooks; with uvicorn's lifespan
                    # task on, a Ctrl-C could log that task's cancellation as a traceback.
                    lifespan="off",
                    ssl_certfile=str(tls.cert) if tls else None,
                    ssl_keyfile=str(tls.key) if tls else None)
    finally:
        stop.set()
        proxy.stop()
        spice.stop()
        if rdp is not None:
            rdp.stop()
        for loop in loops:
            loop.join(timeout=30)
