"""Security headers on every response the broker's web server sends.

* ``Content-Security-Policy``: the portal, admin and console pages (and noVNC's files under
  ``/novnc``) get ``deskpool.web.pages.CONTENT_SECURITY_POLICY`` (scripts and styles of this
  site only, no inline script, no framing); everything else (JSON, Prometheus text) gets
  ``default-src 'none'``: nothing in it is meant to run. The API documents (``/docs``,
  ``/redoc``) are FastAPI's pages, which load Swagger UI / ReDoc from their CDN and start them
  with one inline script: theirs allow that CDN and that script by its SHA-256, computed from
  the page itself (FastAPI renders it from the app's settings, never from a request).
* ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` (with ``frame-ancestors
  'none'`` for browsers that read CSP), ``Referrer-Policy: same-origin``: a link to another
  site carries no URL of ours, while requests to this site still carry their ``Origin`` (under
  ``no-referrer`` a browser sends ``Origin: null`` even to its own site, which the CSRF check
  must refuse).
* ``Strict-Transport-Security`` only on a request that came over TLS (the scheme is https:
  uvicorn's own TLS, or a TLS proxy in front whose ``X-Forwarded-Proto`` uvicorn trusts).
* ``Cache-Control: no-store`` on the API's answers that set none (tokens, passwords shown once).

A header the route set itself is kept.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deskpool.web.pages import CONTENT_SECURITY_POLICY as PAGE_POLICY

NOTHING_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HSTS = "max-age=31536000"
DOCS_CDN = "https://cdn.jsdelivr.net"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)

COMMON = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


def docs_policy(html: bytes) -> str:
    """The policy for FastAPI's document pages: their CDN, and their inline scripts by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html))
    return (f"default-src 'none'; script-src {DOCS_CDN} {hashes}; "
            f"style-src {DOCS_CDN} https://fonts.googleapis.com 'unsafe-inline'; "
            "font-src https://fonts.gstatic.com; img-src 'self' data: https:; "
            "connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'none'")


class SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp, docs_paths: tuple[str, ...] = ("/docs", "/redoc")) -> None:
        self.app = app
        self.docs_paths = frozenset(p for p in docs_paths if p)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        tls = scope.get("scheme") == "https"
        if path in self.docs_paths:
            await self._docs(scope, receive, send, tls)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": self._headers(
                    list(message.get("headers") or []), path, tls, None)}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send, tls: bool) -> None:
        """A document page is small: held whole, to hash its inline script."""
        start: Message | None = None
        body = b""

        async def hold(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] == "http.response.body":
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    assert start is not None
                    headers = self._headers(list(start.get("headers") or []), scope["path"],
                                            tls, docs_policy(body))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, hold)

    @staticmethod
    def _headers(headers: list[tuple[bytes, bytes]], path: str, tls: bool,
                 policy: str | None) -> list[tuple[bytes, bytes]]:
        present = {k.lower() for k, _ in headers}
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if policy is None:
            page = content_type.startswith(b"text/html") or path.startswith("/novnc/")
            policy = PAGE_POLICY if page else NOTHING_POLICY
        extra = [*COMMON, (b"content-security-policy", policy.encode())]
        if tls:
            extra.append((b"strict-transport-security", HSTS.encode()))
        if path.startswith("/api/"):
            extra.append((b"cache-control", b"no-store"))
        return headers + [(k, v) for k, v in extra if k not in present]
