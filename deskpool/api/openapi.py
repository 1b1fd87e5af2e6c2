"""The OpenAPI document as the app really behaves: its two ways to authenticate, and for each
operation the error statuses it answers with the one body every error has (``ErrorBody``,
``{"detail": sentence}``, from the exception handlers in ``deskpool.api.app`` and the CSRF
check), in place of FastAPI's default 422 model, which this app never sends.

What each operation answers follows from what it is, read from its route:
* it needs a caller (depends on ``current_user``): 401, and its ``security`` names the bearer
  token and the session cookie; an administrator's (``admin_user``): 403;
* it changes state (POST, PUT, PATCH, DELETE): 403 (a session cookie from another site's page,
  ``deskpool.api.csrf``); an administrator's change also 409 (refused by the object's state, or
  a concurrent change won);
* it takes input (parameters or a body): 422 (malformed, by the schema) and 400 (well-formed
  but not acceptable, by the service); a path parameter, or an administrator's body (which
  names templates, hosts, users): 404 (none by that name), except the user's desktop routes,
  which answer 403 for a desktop that is not theirs and one that does not exist alike;
* plus what particular operations answer (``EXTRA``): sign-in's 429 with ``Retry-After``,
  a connect's full pool (503 with ``Retry-After``), a hypervisor's failure (502), ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute

from deskpool.api.deps import SESSION_COOKIE, admin_user, current_user

STATE_CHANGING = frozenset({"post", "put", "patch", "delete"})
BEARER, COOKIE = "bearerToken", "sessionCookie"
SECURITY_SCHEMES = {
    BEARER: {"type": "http", "scheme": "bearer",
             "description": "an API token (POST /api/v1/auth/tokens) or the token a sign-in "
                            "returns; exempt from the CSRF check"},
    COOKIE: {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
             "description": "the browser session a sign-in sets; a state-changing request "
                            "made with it must come from the portal's own origin"},
}
RETRY_AFTER = {"Retry-After": {"description": "whole seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 0}}}
Op = tuple[str, str]  # (method, path)


class ErrorBody(BaseModel):
    """Every error the API answers: one sentence saying what was wrong."""

    detail: str


GENERIC = {
    400: "the input is well-formed but not acceptable: ``detail`` says which and why",
    401: "no valid session or token: not signed in, or it expired or was revoked",
    403: "refused: not an administrator, or a request with the session cookie from another "
         "site's page",
    404: "no such object by that name or id",
    409: "refused by the object's state, or a concurrent change won: ``detail`` says why",
    422: "malformed input: ``detail`` names each field and what is wrong with it",
    429: "locked out after too many failed sign-ins: try again after ``Retry-After`` seconds",
    502: "a hypervisor or guest agent failed the step",
    503: "temporarily unavailable (a full pool, a host or service not answering): try again, "
         "after ``Retry-After`` seconds when given",
}
# Operations' statuses beyond the rules above.
EXTRA: dict[Op, tuple[int, ...]] = {
    ("post", "/api/v1/auth/login"): (401, 429, 503),
    ("post", "/api/v1/pools/{pool}/connect"): (403, 409, 502, 503),
    ("post", "/api/v1/desktops/{desktop_id}/console"): (403, 409, 503),
    ("post", "/api/v1/desktops/{desktop_id}/logoff"): (403, 409, 502, 503),
    ("get", "/api/v1/desktops/{desktop_id}/console.vv"): (403, 409, 503),
    ("get", "/api/v1/desktops/{desktop_id}/console.rdp"): (403, 409, 503),
    ("post", "/api/v1/admin/desktops/{desktop_id}/logoff"): (502, 503),
    ("post", "/api/v1/admin/hosts"): (502, 503),
    ("post", "/api/v1/admin/hosts/{name}/drain"): (503,),
    ("post", "/api/v1/admin/hosts/{name}/enable"): (503,),
    ("post", "/api/v1/admin/templates/{name}/versions"): (502, 503),
    ("get", "/metrics"): (503,),
    ("get", "/readyz"): (503,),
}
NO_NOT_FOUND_PREFIX = "/api/v1/desktops/"  # a desktop not yours or none: 403 alike


def routes_of(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, also inside included routers kept whole."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from routes_of(route.original_router.routes)
        else:
            inner = getattr(route, "routes", None)
            if isinstance(inner, list):
                yield from routes_of(inner)


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def statuses(method: str, path: str, operation: dict[str, Any],
             needs: frozenset[Callable[..., Any]]) -> set[int]:
    """The error statuses one operation answers."""
    found: set[int] = set(EXTRA.get((method, path), ()))
    if current_user in needs:
        found.add(401)
    if admin_user in needs:
        found.add(403)
    if method in STATE_CHANGING:
        found.add(403)
        if admin_user in needs:
            found.add(409)
    params = operation.get("parameters") or []
    if params or "requestBody" in operation:
        found |= {400, 422}
    if any(p.get("in") == "path" for p in params) and not path.startswith(NO_NOT_FOUND_PREFIX):
        found.add(404)
    if admin_user in needs and "requestBody" in operation:
        found.add(404)  # the body names a template, host, version or user
    return found


def _error_response(status: int, existing: dict[str, Any] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": ((existing or {}).get("description") if status != 422 else None)
                       or GENERIC[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    if status in (429, 503):
        answer["headers"] = RETRY_AFTER
    return answer


def complete(app: FastAPI, document: dict[str, Any]) -> dict[str, Any]:
    """Add the security schemes and each operation's error answers to ``document``."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    schemas = components.setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    needs: dict[Op, frozenset[Callable[..., Any]]] = {}
    for route in routes_of(app.routes):
        for method in route.methods or ():
            needs[(method.lower(), route.path_format)] = frozenset(_calls(route.dependant))
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in STATE_CHANGING | {"get", "head", "options"}:
                continue
            uses = needs.get((method, path), frozenset())
            if current_user in uses:
                operation["security"] = [{BEARER: []}, {COOKIE: []}]
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses(method, path, operation, uses)):
                responses[str(status)] = _error_response(status, responses.get(str(status)))
    if "/metrics" in document.get("paths", {}):
        # DESKPOOL_METRICS_TOKEN, when set, as a bearer token; otherwise none.
        document["paths"]["/metrics"]["get"]["security"] = [{BEARER: []}, {}]
    # FastAPI's own 422 model is never sent: the handler answers ErrorBody.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) the completed document."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(app, plain())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
