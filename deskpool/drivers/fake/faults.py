"""The fake hypervisor's fault injection: fault points, the gate of every public call, controls."""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol, TypeVar

from deskpool.domain.errors import DriverError, HypervisorUnreachable, InvalidInput

# Fault points: every public driver method (added by @api) and the steps inside create_vm,
# in order; each step runs after the ones before it succeeded. An instant clone has
# root_volume, memory_volume and restore (the VM exists, running), then nic_swap.
FAULT_POINTS = {
    "create_vm.root_volume", "create_vm.seed_volume", "create_vm.define",
    "create_vm.memory_volume", "create_vm.restore", "create_vm.nic_swap",
}


class _Gated(Protocol):
    """What ``api`` needs of the driver (``FakeDriver`` and its mixins)."""

    _lock: threading.RLock

    def _check_usable(self) -> None: ...
    def _maybe_fail(self, point: str) -> None: ...


_S = TypeVar("_S", bound=_Gated)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def api(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Public driver call: under the lock, refused when closed or unreachable, fault-injectable."""
    FAULT_POINTS.add(method.__name__)

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            self._check_usable()
            self._maybe_fail(method.__name__)
            return method(self, *args, **kwargs)

    return wrapper


class FaultInjectionMixin:
    """A mixin of ``FakeDriver``: arms failures and takes the host down or closes it."""

    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _faults: dict[str, deque[Exception]]
        _closed: bool
        _reachable: bool

    def fail_next(self, operation: str, error: Exception | None = None) -> None:
        """Make the next call of ``operation`` (a method name or a ``create_vm.<step>``) raise
        ``error`` (default ``DriverError``). Arming one point twice fails two calls."""
        if operation not in FAULT_POINTS:
            raise InvalidInput(
                f"unknown fault point {operation!r}; known: {', '.join(sorted(FAULT_POINTS))}"
            )
        with self._lock:
            self._faults.setdefault(operation, deque()).append(
                error or DriverError(f"injected failure in {operation}")
            )

    def set_reachable(self, reachable: bool) -> None:
        """Simulate the host going down: every call raises ``HypervisorUnreachable``."""
        with self._lock:
            self._reachable = reachable

    def _check_usable(self) -> None:
        if self._closed:
            raise DriverError(f"the connection to {self.uri} is closed")
        if not self._reachable:
            raise HypervisorUnreachable(f"cannot reach a hypervisor at {self.uri!r}")

    def _maybe_fail(self, point: str) -> None:
        queue = self._faults.get(point)
        if queue:
            raise queue.popleft()
