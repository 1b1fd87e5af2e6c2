"""``GET /metrics``: Prometheus's text format, by ``prometheus-client``.

What the database knows is read from it at scrape time, through the store (one grouped query
each), so every broker of a deployment serves the same numbers for the whole fleet and a
restart loses nothing:

* ``deskpool_desktops{pool,state,host}`` and ``deskpool_console_connections{pool,host}``;
* each host's capacity (vCPUs and memory, times its overcommit; its desktop limit), what its
  live desktops take of it, and its state;
* ``deskpool_logon_phase_seconds{phase}``, a histogram of every logon recorded: computed at
  scrape from the logons table (a SUM(CASE ...) per bucket), rather than observed in the
  process as logons complete, because logons are handed over by any of several brokers, a
  phase (``connect``) often ends in another request than the one that started the logon, and a
  broker's restart would reset in-process counts; the table is the one record all share.

What only this process sees, its reconcile passes (duration, errors), comes from
``deskpool.reconciler.metrics``. When ``DESKPOOL_METRICS_TOKEN`` is set, a scrape must send it
as a bearer token.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from deskpool.api.deps import token_of
from deskpool.domain.errors import AuthenticationFailed
from deskpool.domain.models import HostState
from deskpool.reconciler import metrics as reconciler_metrics
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import LIVE_STATES
from deskpool.store.models import Host

PHASES = ("queue", "claim", "power_on", "ready", "session", "connect")
# Logon phases run from milliseconds (a claim) to minutes (a cold boot under TCG).
BOUNDS_MS = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000,
             300_000)

router = APIRouter(tags=["metrics"])
log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """The fleet as the database has it, read at each scrape."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        desktops = GaugeMetricFamily("deskpool_desktops", "Desktops by pool, state and host",
                                     labels=["pool", "state", "host"])
        consoles = GaugeMetricFamily("deskpool_console_connections",
                                     "Open console connections by pool and host",
                                     labels=["pool", "host"])
        with self.ctx.uow(read_only=True) as uow:
            fleet = uow.admin.fleet()
            # Read while the session is open: the metrics are built after it closes.
            host_metrics = list(self._hosts(uow.hosts.list(),
                                            uow.host_usage.usage(LIVE_STATES)))
            phases = uow.admin.logon_phases(PHASES, BOUNDS_MS)
            pools = [(p.name, p.status.value) for p in uow.pools.list()]
        per_console: dict[tuple[str, str], int] = {}
        for row in fleet:
            desktops.add_metric([row.pool or "", row.state, row.host], row.desktops)
            key = (row.pool or "", row.host)
            per_console[key] = per_console.get(key, 0) + row.console_connections
        for (pool, host), n in sorted(per_console.items()):
            consoles.add_metric([pool, host], n)
        yield desktops
        yield consoles
        yield from host_metrics
        status = GaugeMetricFamily("deskpool_pool_status", "1 for each pool's status",
                                   labels=["pool", "status"])
        for name, value in pools:
            status.add_metric([name, value], 1)
        yield status
        histogram = HistogramMetricFamily("deskpool_logon_phase_seconds",
                                          "Logon phase durations, every logon recorded",
                                          labels=["phase"])
        for phase in PHASES:
            found = phases[phase]
            buckets = [(_seconds(b), float(n)) for b, n in zip(BOUNDS_MS, found.cumulative,
                                                                strict=True)]
            buckets.append(("+Inf", float(found.count)))
            histogram.add_metric([phase], buckets, sum_value=found.sum_ms / 1000)
        yield histogram

    @staticmethod
    def _hosts(hosts: Sequence[Host],
               usage: Mapping[uuid.UUID, tuple[int, int, int]]) -> Iterator[Metric]:
        labels = ["host"]
        vcpus = GaugeMetricFamily("deskpool_host_vcpus", "vCPUs desktops may take "
                                  "(physical times the CPU overcommit)", labels=labels)
        memory = GaugeMetricFamily("deskpool_host_memory_mib", "Memory desktops may take, MiB "
                                   "(physical times the memory overcommit)", labels=labels)
        limit = GaugeMetricFamily("deskpool_host_max_desktops",
                                  "The host's desktop limit (absent: none)", labels=labels)
        used_vcpus = GaugeMetricFamily("deskpool_host_used_vcpus",
                                       "vCPUs of the host's live desktops", labels=labels)
        used_memory = GaugeMetricFamily("deskpool_host_used_memory_mib",
                                        "Memory of the host's live desktops, MiB",
                                        labels=labels)
        live = GaugeMetricFamily("deskpool_host_desktops", "Live desktops on the host",
                                 labels=labels)
        storage = GaugeMetricFamily("deskpool_host_storage_free_bytes",
                                    "Free space in the host's storage when last read",
                                    labels=labels)
        state = GaugeMetricFamily("deskpool_host_state", "1 for each host's state",
                                  labels=["host", "state"])
        for host in hosts:
            name = [host.name]
            vcpus.add_metric(name, host.vcpus * host.cpu_overcommit)
            memory.add_metric(name, host.memory_mib * host.memory_overcommit)
            if host.max_desktops is not None:
                limit.add_metric(name, host.max_desktops)
            cpu_used, memory_used, count = usage.get(host.id, (0, 0, 0))
            used_vcpus.add_metric(name, cpu_used)
            used_memory.add_metric(name, memory_used)
            live.add_metric(name, count)
            storage.add_metric(name, host.storage_free_bytes)
            for value in HostState:
                state.add_metric([host.name, value.value], 1 if host.state is value else 0)
        yield from (vcpus, memory, limit, used_vcpus, used_memory, live, storage, state)


class _Reconciler(Collector):
    """This process's reconcile pass metrics, served from their own registry."""

    def collect(self) -> Iterator[Metric]:
        yield from reconciler_metrics.REGISTRY.collect()


def _seconds(ms: int) -> str:
    return repr(ms / 1000)


def registry_for(ctx: ServiceContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(ctx))
    registry.register(_Reconciler())
    return registry


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                             "description": "Prometheus text format"},
                       401: {"description": "DESKPOOL_METRICS_TOKEN is set and was not sent"},
                       503: {"description": "the database does not answer"}})
async def metrics(request: Request) -> Response:
    ctx: ServiceContext = request.app.state.services.ctx
    wanted = ctx.settings.metrics_token
    if wanted and not hmac.compare_digest((token_of(request) or "").encode(),
                                          wanted.encode()):
        raise AuthenticationFailed("send the metrics token as a bearer token")
    registry: CollectorRegistry = request.app.state.metrics_registry
    try:
        body = await run_in_threadpool(generate_latest, registry)
    except Exception as exc:  # nearly all of it is read from the database: it did not answer
        log.warning("metrics could not be read: %s", exc, exc_info=True)
        return JSONResponse({"detail": "the metrics could not be read: the database does not "
                                       f"answer ({type(exc).__name__}); see the server log"},
                            status_code=503, headers={"Retry-After": "10"})
    return Response(body, media_type=CONTENT_TYPE_LATEST)
