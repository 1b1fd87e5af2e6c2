"""A cap on request bodies: no route takes more than ``MAX_BODY`` bytes (the largest is a
template's cloud-init user data, 256 KiB, with its join hook), so a bigger body is refused
with a 413 before it is read into memory, whether it declares its length or streams.

One route takes more: a laptop's batch of check-in chunks (``MAX_CHUNKS_BODY``). Each
request costs a plan lookup, a journal write and fsyncs whatever its size, so 1 MiB
batches spent more on requests than on bytes; the transfer slots bound how many run at once."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1024 * 1024
MAX_CHUNKS_BODY = 8 * 1024 * 1024
_CHUNKS = re.compile(r"/api/v1/offline/desktops/[^/]+/transfer/chunks")


def body_limit(method: str, path: str, default: int = MAX_BODY) -> int:
    """The most bytes a request's body may have."""
    if method == "PUT" and _CHUNKS.fullmatch(path):
        return max(default, MAX_CHUNKS_BODY)
    return default


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope.get("method", ""), scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # the server refuses a malformed length itself
            if too_large:
                await self._refuse(send, limit)
                return
        received = 0
        overflow = False

        async def counted() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise BodyTooLarge
            return message

        async def answer(message: Message) -> None:
            # The app turns a failed body read into an error of its own (FastAPI: a 400
            # "error parsing the body"): the 413 says what really happened.
            if not overflow:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send, limit)

        try:
            await self.app(scope, counted, answer)
        except BodyTooLarge:
            await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"the request body is larger than {limit} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
