"""The reconciler's own measurements, for ``/metrics``: how long each pass took, and the
errors and programming errors its steps met. Kept in this process's registry (the pass runs
here); ``deskpool.api.metrics`` serves it beside the numbers it reads from the database."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

PASS_SECONDS = Histogram(
    "deskpool_reconcile_pass_seconds", "Duration of one reconcile pass",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
PASS_ERRORS = Counter(
    "deskpool_reconcile_errors", "Problems reconcile passes met (a host silent, a step failed)",
    registry=REGISTRY)
PASS_BUGS = Counter(
    "deskpool_reconcile_bugs", "Programming errors reconcile steps hit (see the log)",
    registry=REGISTRY)
PASS_FAILURES = Counter(
    "deskpool_reconcile_pass_failures", "Reconcile passes that ended on an exception",
    registry=REGISTRY)
