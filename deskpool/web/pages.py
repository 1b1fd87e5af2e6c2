"""The portal, console and admin pages: server-rendered HTML shells whose scripts call the REST
API (``/api/v1``) with the session cookie the sign-in sets. Nothing here reads the database:
the pages are the same for everyone, the API decides what each caller may see.

Static files (plain JavaScript modules and one stylesheet, no build step) are served from a
fixed list read at start-up, so no request path can reach a file outside ``static/``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
STATIC_FILES = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml"}

# The console's WebSocket goes to the console proxy's own port, hence ws: and wss:. noVNC
# styles its canvas through the CSSOM (allowed) and draws its cursor from data: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
PAGE_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: under it a browser sends "Origin: null" even to this site, which the
    # API's CSRF check refuses.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


def _page(request: Request, name: str, **context: object) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, headers=PAGE_HEADERS)
    assert isinstance(response, HTMLResponse)
    return response


@router.get("/", response_class=HTMLResponse)
def portal(request: Request) -> HTMLResponse:
    """Sign in, my pools (Connect), my desktops (console, disconnect, log off)."""
    return _page(request, "portal.html", title="deskpool")


@router.get("/console/{desktop_id}", response_class=HTMLResponse)
def console(request: Request, desktop_id: uuid.UUID) -> HTMLResponse:
    """One desktop's console in the whole window."""
    return _page(request, "console.html", title="deskpool console", desktop_id=str(desktop_id))


@router.get("/admin", response_class=HTMLResponse)
def admin(request: Request) -> HTMLResponse:
    """Hosts, templates, pools, desktops, sessions, events and logon timings, kept fresh."""
    return _page(request, "admin.html", title="deskpool admin")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(status_code=404, detail=f"no static file named {name!r}")
    path = STATIC_DIR / name
    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix),
                        headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"})
