"""Cross-site request forgery: a state-changing request (POST, PUT, PATCH, DELETE, bodiless
ones too) that the browser authenticates with the session cookie must come from a page of this
site. The browser says where the page is in ``Origin`` (or, when it sends none, ``Referer``);
either must name this server's own origin (the request's scheme and ``Host``), or a host name of
``DESKPOOL_CONSOLE_ALLOWED_ORIGINS`` (the portal behind a reverse proxy under another name).
Otherwise: 403 with a sentence saying why, before any route runs.

Exempt: requests that carry a bearer token (a script chose to send it; a browser never adds one
on its own) and requests without the session cookie (nothing of the user's to abuse). A sign-in
from another site's page is refused too, so no page can sign a visitor in as someone else.

The cookie is ``SameSite=Strict`` as well; this check does not rely on it (older browsers,
same-site but cross-origin pages on a sibling host).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from deskpool.api.deps import SESSION_COOKIE

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
SIGN_IN_PATH = "/api/v1/auth/login"
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL; None for anything else ("null")."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host, port or DEFAULT_PORTS[scheme]


def _own_origin(scheme: str, host_header: str) -> tuple[str, str, int] | None:
    return _origin_of(f"{scheme}://{host_header}") if host_header else None


def _cookie_names(header: str) -> Iterable[str]:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if value.strip():
            yield name.strip()


def refusal(method: str, path: str, headers: dict[str, str], scheme: str,
            allowed_hosts: frozenset[str]) -> str | None:
    """Why this request must be refused as a possible forgery; None when it may go on."""
    if method.upper() in SAFE_METHODS:
        return None
    if headers.get("authorization", "").lower().startswith("bearer "):
        return None  # authenticated by a token the caller sent on purpose
    has_cookie = SESSION_COOKIE in _cookie_names(headers.get("cookie", ""))
    origin_header, referer = headers.get("origin"), headers.get("referer")
    if not has_cookie and not (path == SIGN_IN_PATH and origin_header):
        return None
    given = origin_header if origin_header is not None else referer
    if given is None:
        return ("refused: a request made with the session cookie must say where it comes "
                "from (an Origin or Referer header), and this one sends neither")
    found = _origin_of(given)
    own = _own_origin(scheme, headers.get("host", ""))
    if found is not None and (found == own or found[1] in allowed_hosts):
        return None
    what = "Origin" if origin_header is not None else "Referer"
    return (f"refused: this request comes from another site's page ({what} {given[:200]!r}"
            f" is not this server's own origin); use the portal's own pages, or an API "
            "token as a bearer token")


class CsrfGuard:
    """ASGI middleware applying :func:`refusal` to every HTTP request."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers") or []:
            name, text = key.decode("latin-1").lower(), value.decode("latin-1")
            # Several Cookie headers (HTTP/2) make one list; of others the first counts.
            if name == "cookie" and name in headers:
                headers[name] += "; " + text
            else:
                headers.setdefault(name, text)
        why = refusal(scope.get("method", "GET"), scope.get("path", ""), headers,
                      scope.get("scheme", "http"), self.allowed_hosts)
        if why is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": why}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
