"""``Allow`` on a 405 that lists every method the path answers. Starlette names only the
methods of the first route whose path matched, so a path served by two routes (``GET`` and
``DELETE /api/v1/admin/users/{name}``, in two routers) answered a wrong ``Allow``."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def methods_for(routes: Iterable[BaseRoute], path: str) -> set[str]:
    found: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found |= methods_for(inner.routes, path)
        elif isinstance(route, Route) and route.methods and route.path_regex.match(path):
            found |= route.methods
    return found


class AllowHeader:
    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = methods_for(self.routes, scope.get("path", ""))
                if methods:
                    headers = [(k, v) for k, v in message.get("headers") or []
                               if k.lower() != b"allow"]
                    headers.append((b"allow", ", ".join(sorted(methods)).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_allow)
