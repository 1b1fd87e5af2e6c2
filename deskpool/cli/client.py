"""``deskpool client ...``: the CLI against a broker's REST API, from any machine.

``client login`` keeps the session token in ``~/.config/deskpool/client.json`` (mode 0600);
the other commands send it as a bearer token. The API's ``detail`` sentence is printed on
failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table
from websockets.exceptions import InvalidHandshake
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as open_websocket

from deskpool.api.routes_user import RDP_PASSWORD_HEADER
from deskpool.cli.common import out
from deskpool.cli.console_tunnel import ConsoleTunnel, console_websocket_url
from deskpool.domain.errors import AuthenticationFailed, DeskpoolError, NotFound

client_app = typer.Typer(help="Use a broker over its REST API (sign in, connect...).",
                         no_args_is_help=True)
CONFIG = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "deskpool"


def _saved() -> dict[str, str]:
    path = CONFIG / "client.json"
    if not path.is_file():
        raise AuthenticationFailed("not signed in: run 'deskpool client login URL USER' first")
    saved: dict[str, str] = json.loads(path.read_text())
    return saved


def signed_in() -> dict[str, str]:
    """The broker's URL and the session token ``client login`` kept (``offline`` uses it)."""
    return _saved()


def _call(method: str, path: str, **kw: Any) -> Any:
    answer = _request(method, path, **kw)
    return answer.json() if answer.content else None


def _request(method: str, path: str, **kw: Any) -> httpx.Response:
    saved = _saved()
    try:
        answer = httpx.request(method, saved["url"].rstrip("/") + path, timeout=120,
                               headers={"authorization": f"Bearer {saved['token']}"}, **kw)
    except httpx.HTTPError as exc:
        raise DeskpoolError(f"broker at {saved['url']} did not answer: {exc}") from exc
    if answer.status_code >= 400:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        raise DeskpoolError(f"{detail} (HTTP {answer.status_code})")
    return answer


@client_app.command("login")
def login(url: str, user: str,
          password: Annotated[str, typer.Option(prompt=True, hide_input=True)]) -> None:
    try:
        answer = httpx.post(url.rstrip("/") + "/api/v1/auth/login", timeout=30,
                            json={"username": user, "password": password})
    except httpx.HTTPError as exc:
        raise DeskpoolError(f"broker at {url} did not answer: {exc}") from exc
    if answer.status_code != 200:
        raise AuthenticationFailed(answer.json().get("detail", "sign-in refused"))
    CONFIG.mkdir(parents=True, exist_ok=True)
    fd = os.open(CONFIG / "client.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": answer.json()["token"]}, f)
    out.print(f"signed in to {url} as {answer.json()['user']['name']}")


@client_app.command("pools")
def pools() -> None:
    table = Table("pool", "template", "kind", "ready", "my desktop")
    for p in _call("GET", "/api/v1/pools"):
        table.add_row(p["name"], p["template"], p["kind"], str(p["ready"]), p["mine"] or "")
    out.print(table)


@client_app.command("connect")
def connect(pool: str) -> None:
    answer = _call("POST", f"/api/v1/pools/{pool}/connect")
    out.print(answer["message"])
    if answer["status"] == "ready":
        phases = ", ".join(f"{k} {v} ms" for k, v in answer["phases_ms"].items())
        out.print(f"desktop {answer['desktop']} (hostname {answer['hostname']}, id "
                  f"{answer['desktop_id']}); {phases}")


@client_app.command("desktops")
def desktops() -> None:
    table = Table("desktop", "id", "pool", "state", "console open")
    for d in _call("GET", "/api/v1/desktops"):
        table.add_row(d["name"], d["id"], d["pool"], d["state"], "yes" if d["connected"] else "")
    out.print(table)


@client_app.command("console")
def console(
    desktop: Annotated[str, typer.Argument(help="your desktop's name or id")],
    port: Annotated[int, typer.Option(help="local port for the viewer (0: any free)")] = 5900,
    listen: Annotated[str, typer.Option(help="local address to listen on")] = "127.0.0.1",
    once: Annotated[bool, typer.Option(help="stop when the first viewer disconnects")] = False,
) -> None:
    """Open a desktop's console to a native VNC viewer (remote-viewer, vncviewer...) on this
    machine, through the broker's console proxy. A private CA for a TLS broker goes in
    SSL_CERT_FILE."""
    saved = _saved()
    desktop_id, name = _my_desktop(desktop)

    def open_console() -> ClientConnection:
        ticket = _call("POST", f"/api/v1/desktops/{desktop_id}/console")
        if ticket["websocket_port"] is None:
            raise DeskpoolError(f"broker at {saved['url']} runs no console proxy")
        url = console_websocket_url(saved["url"], ticket["websocket_port"], ticket["token"])
        try:
            return open_websocket(url, open_timeout=15, max_size=None, compression=None)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise DeskpoolError(f"console proxy at {url.split('?')[0]} did not let the "
                                f"console through: {exc}") from exc

    tunnel = ConsoleTunnel(listen, port, open_console)
    out.print(f"console of {name}: point a VNC viewer at {listen}:{tunnel.port} "
              f"(e.g. remote-viewer vnc://{listen}:{tunnel.port}); Ctrl-C ends it")
    tunnel.serve(once=once, on_closed=lambda why: out.print(f"console of {name} ended: {why}"))


@client_app.command("rdp")
def rdp(
    desktop: Annotated[str, typer.Argument(help="your desktop's name or id")],
    save: Annotated[Path | None, typer.Option(
        help="write the .rdp file here and print its one-time password, instead of "
             "running the client")] = None,
    client: Annotated[str, typer.Option(help="the RDP client to run")] = "xfreerdp",
    cert_ignore: Annotated[bool, typer.Option(
        help="accept the desktop's own self-signed certificate (each desktop has its own)")
    ] = True,
) -> None:
    """Open a desktop's own session in an RDP client (xfreerdp), through the broker's RDP
    proxy, signed in with a one-time password. The file is good for one connection within
    a minute."""
    desktop_id, name = _my_desktop(desktop)
    answer = _request("GET", f"/api/v1/desktops/{desktop_id}/console.rdp")
    password = answer.headers.get(RDP_PASSWORD_HEADER, "")
    if save is not None:
        _write_private(save, answer.text)
        # One line whatever the terminal's width: a password split by wrapping is unusable.
        out.print(f"{save}: RDP file for {name}, good for one connection within a minute; "
                  f"one-time password: {password}", soft_wrap=True)
        return
    if shutil.which(client) is None:
        raise NotFound(f"{client} is not installed (Debian: apt install freerdp2-x11); "
                       "or use --save and another RDP client")
    with tempfile.TemporaryDirectory(prefix="deskpool-rdp-") as tmp:
        path = Path(tmp) / f"{name}.rdp"
        _write_private(path, answer.text)
        # FreeRDP masks /p: in its own argument list; the password works once anyway.
        argv = [client, str(path), f"/p:{password}", *(["/cert:ignore"] if cert_ignore else [])]
        out.print(f"opening {name} in {client}")
        raise typer.Exit(subprocess.run(argv, check=False).returncode)


@client_app.command("spice")
def spice(
    desktop: Annotated[str, typer.Argument(help="your desktop's name or id")],
    save: Annotated[Path | None, typer.Option(
        help="write the .vv file here instead of running the viewer")] = None,
    viewer: Annotated[str, typer.Option(help="the SPICE client to run")] = "remote-viewer",
) -> None:
    """Open a desktop in a SPICE client (remote-viewer) through the broker's SPICE proxy.
    The file carries a ticket good for one connection within a minute."""
    desktop_id, name = _my_desktop(desktop)
    answer = _request("GET", f"/api/v1/desktops/{desktop_id}/console.vv")
    if save is not None:
        _write_private(save, answer.text)
        out.print(f"{save}: SPICE file for {name}, good for one connection within a minute")
        return
    if shutil.which(viewer) is None:
        raise NotFound(f"{viewer} is not installed (Debian: apt install virt-viewer); "
                       "or use --save and another SPICE client")
    with tempfile.TemporaryDirectory(prefix="deskpool-spice-") as tmp:
        path = Path(tmp) / f"{name}.vv"
        _write_private(path, answer.text)
        out.print(f"opening {name} in {viewer}")
        raise typer.Exit(subprocess.run([viewer, str(path)], check=False).returncode)


def _write_private(path: Path, text: str) -> None:
    """A console file holds a live ticket: readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)


@client_app.command("logoff")
def logoff(desktop: Annotated[str, typer.Argument(help="your desktop's name or id")]) -> None:
    desktop_id, name = _my_desktop(desktop)
    answer = _call("POST", f"/api/v1/desktops/{desktop_id}/logoff")
    out.print(f"logged off {name}; the desktop is now {answer['state']}")


def _my_desktop(desktop: str) -> tuple[str, str]:
    """The id and name of the caller's desktop called ``desktop`` (its name or its id)."""
    found = [d for d in _call("GET", "/api/v1/desktops") if desktop in (d["name"], d["id"])]
    if not found:
        raise NotFound(f"you hold no desktop named {desktop!r}: see 'deskpool client desktops'")
    return found[0]["id"], found[0]["name"]


@client_app.command("logons")
def logons(limit: int = 20) -> None:
    """Logon phase timings (admins)."""
    table = Table("when", "user", "pool", "desktop", "outcome", "queue", "claim", "power on",
                  "ready", "session", "connect")
    for r in _call("GET", "/api/v1/admin/logons", params={"limit": limit}):
        table.add_row(r["requested_at"][:19], r["user"], r["pool"], r["desktop"] or "",
                      r["outcome"], *(str(r[f"{k}_ms"] if r[f"{k}_ms"] is not None else "")
                                      for k in ("queue", "claim", "power_on", "ready",
                                                "session", "connect")))
    out.print(table)
