"""Logs and health: a request id on every request (the caller's ``X-Request-ID`` when it
sends a sane one, else a new one; echoed in the answer), an access line per request, log lines
as text or JSON (``DESKPOOL_LOG_FORMAT=json``) carrying the request id and the signed-in user,
and ``/healthz`` (the process answers) and ``/readyz`` (the database answers and its schema is
at this version's newest migration).

The request's id and user live in one small dict per request, held in a context variable:
work the request hands to a thread pool copies the context and so shares the dict, and the
user, known only once authentication ran, is written into it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deskpool.config import Settings
from deskpool.store import head_revision, schema_revision

access_log = logging.getLogger("deskpool.access")
_REQUEST: contextvars.ContextVar[dict[str, str | None] | None] = contextvars.ContextVar(
    "deskpool_request", default=None)
# A caller's id is kept only if it is short and plain (it goes into every log line).
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_HEADER = "x-request-id"


def note_user(name: str) -> None:
    """The signed-in user of the current request, for its log lines."""
    found = _REQUEST.get()
    if found is not None:
        found["user"] = name


def current_request() -> dict[str, str | None]:
    return dict(_REQUEST.get() or {})


class RequestContext:
    """Gives each HTTP request its id (echoed as ``X-Request-ID``) and logs one access line
    when it ends: method, path, status, milliseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode(
            "latin-1")
        request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
        holder: dict[str, str | None] = {"request_id": request_id, "user": None}
        token = _REQUEST.set(holder)
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info("%s %s %s %d ms", scope.get("method"), scope.get("path"), status,
                            round((time.monotonic() - started) * 1000),
                            extra={"http_status": status})
            _REQUEST.reset(token)


class RequestFields(logging.Filter):
    """Puts ``request_id`` and ``user`` on every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _REQUEST.get() or {}
        record.request_id = found.get("request_id")
        record.user = found.get("user")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request id,
    user, and the exception's trace when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "user": getattr(record, "user", None),
        }
        status = getattr(record, "http_status", None)
        if status is not None:
            line["status"] = status
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_handler(log_format: str, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestFields())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s [%(request_id)s %(user)s] %(message)s"))
    return handler


def configure_logging(settings: Settings, *, level: int = logging.INFO) -> None:
    """The process's log lines, in the format the settings ask for (replaces the handlers
    the root logger had)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(log_handler(settings.log_format))
    root.setLevel(level)


# --- health ------------------------------------------------------------------------------------

health = APIRouter(tags=["health"])


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive and answers HTTP."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"description": "not ready, and why"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready for traffic: the database answers and its schema is at the newest migration
    this version ships."""
    ctx = request.app.state.services.ctx
    head = head_revision()
    try:
        current = await run_in_threadpool(schema_revision, ctx.session_factory)
    except Exception as exc:  # any failure to reach the database means not ready
        return JSONResponse({"status": "unavailable",
                             "detail": f"the database does not answer: "
                                       f"{type(exc).__name__}: {exc}"}, status_code=503)
    if current != head:
        return JSONResponse({"status": "unavailable",
                             "detail": f"the database schema is at migration {current}, "
                                       f"this broker needs {head}"}, status_code=503)
    return JSONResponse({"status": "ok", "migration": current})
