"""An exception no handler took: a JSON 500 like every other error, not Starlette's plain text.

Starlette answers such an exception from its outermost layer, outside every middleware of the
app: the answer was ``text/plain`` "Internal Server Error", with no security headers and no
request id to find it in the log by. This middleware sits inside them all (added first), so
the 500 it makes gets the same ``{"detail": ...}`` body the OpenAPI document describes, the
security headers and the ``x-request-id`` the log line carries. What the exception says stays
in the log (with its trace); the caller learns only that the broker failed.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

DETAIL = ("internal error: the broker failed on this request; its log has the details under "
          "this answer's x-request-id")


class ServerErrors:
    """ASGI middleware turning an unhandled exception into a logged JSON 500 (when nothing
    of the answer was sent yet; after that, the exception goes on up as before)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method", "?"), scope.get("path", "?"))
            await JSONResponse({"detail": DETAIL}, status_code=500)(scope, receive, send)
