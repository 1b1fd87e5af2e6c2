"""Routes that serve the portal and admin pages (placeholder until the UI lands)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def portal() -> str:
    return "<!doctype html><title>deskpool</title><p>deskpool portal</p>"
