"""The broker's HTTP API as the laptop uses it: the signed-in token of ``deskpool client
login``, the API's ``detail`` sentence on refusals, and patience with a busy host: a 503
with ``Retry-After`` (no transfer slot free on the desktop's host) is waited out, saying so,
and asked again."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from deskpool.domain.errors import DeskpoolError, TemporaryError

MAX_BUSY_WAITS = 120  # a host busy for longer than ~10 minutes of 5 s waits: give up, resumable


class BrokerUnreachable(TemporaryError):
    """The connection failed or was cut: nothing half-done is used; run the command again."""


class BrokerRefused(DeskpoolError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _detail(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text or answer.reason_phrase
    detail = body.get("detail", answer.text) if isinstance(body, dict) else answer.text
    return detail if isinstance(detail, str) else str(detail)


class Broker:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        notify: Callable[[str], None] = print,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.notify, self.sleep = notify, sleep
        self.http = httpx.Client(
            base_url=self.url + "/api/v1",
            timeout=120,
            headers={"authorization": f"Bearer {token}"},
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, exc: Exception) -> BrokerUnreachable:
        return BrokerUnreachable(
            f"broker at {self.url} did not answer ({exc}); what is done "
            "is kept: run the command again to resume"
        )

    def _busy_wait(self, answer: httpx.Response, attempt: int) -> bool:
        """True after waiting out a busy host's 503; False when it is a plain failure."""
        retry_after = answer.headers.get("retry-after")
        if answer.status_code != 503 or retry_after is None or attempt >= MAX_BUSY_WAITS:
            return False
        seconds = float(retry_after) if retry_after.isdigit() else 5.0
        self.notify(f"{_detail(answer)}: waiting {seconds:.0f} s and trying again")
        self.sleep(seconds)
        return True

    @staticmethod
    def _raise_for(answer: httpx.Response) -> None:
        if answer.status_code >= 400:
            raise BrokerRefused(
                f"{_detail(answer)} (HTTP {answer.status_code})", answer.status_code
            )

    def call(self, method: str, path: str, **kw: Any) -> Any:
        answer = self.request(method, path, **kw)
        return answer.json() if answer.content else None

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(MAX_BUSY_WAITS + 1):
            try:
                answer = self.http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            if not self._busy_wait(answer, attempt):
                break
        self._raise_for(answer)
        return answer

    @contextmanager
    def stream(self, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed GET (a download), a busy host waited out first."""
        for attempt in range(MAX_BUSY_WAITS + 1):
            try:
                with self.http.stream("GET", path, **kw) as answer:
                    if answer.status_code >= 400:
                        answer.read()
                        if self._busy_wait(answer, attempt):
                            continue
                        self._raise_for(answer)
                    yield answer
                    return
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
        raise BrokerUnreachable(f"broker at {self.url} stayed busy; run the command again")
