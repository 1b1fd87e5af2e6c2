"""The broker over TLS: ``deskpool serve`` with a certificate answers HTTPS only, marks its
session cookie Secure, and its console proxy speaks wss://; wrong TLS settings stop it with one
line naming what is wrong."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as open_websocket

from deskpool.api.tls import tls_files
from deskpool.broker.accounts import AccountService
from deskpool.cli.console_tunnel import console_websocket_url
from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.services.context import ServiceContext
from tests.functional.test_console_proxy import Browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@dataclass
class TlsBroker:
    url: str
    console_port: int
    client_tls: ssl.SSLContext
    cert: Path


def serve_command(env: dict[str, str], port: int, console_port: int,
                  log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from deskpool.cli.main import run; run()", "serve",
         "--port", str(port), "--console-port", str(console_port), "--spice-port", "0",
         "--rdp-port", "0"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[TlsBroker]:
    cert, key = make_certificate(tmp_path)
    data = tmp_path / "data"
    ctx = ServiceContext(Settings(data_dir=data))
    AccountService(ctx).create_user("alice", "password-123")
    ctx.close()
    port, console_port = free_port(), free_port()
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(data), "DESKPOOL_TLS_CERT_FILE": str(cert),
           "DESKPOOL_TLS_KEY_FILE": str(key), "DESKPOOL_RECONCILE_INTERVAL_S": "1"}
    process = serve_command(env, port, console_port, tmp_path / "broker.log")
    client_tls = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"https://127.0.0.1:{port}/login", verify=client_tls, timeout=2)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the broker did not come up over HTTPS: "
                                         + (tmp_path / "broker.log").read_text()[-3000:]
                                         ) from None
                time.sleep(0.2)
        yield TlsBroker(f"https://127.0.0.1:{port}", console_port, client_tls, cert)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_broker_answers_https_with_a_secure_session_cookie(broker: TlsBroker) -> None:
    answer = httpx.post(f"{broker.url}/api/v1/auth/login", verify=broker.client_tls,
                        json={"username": "alice", "password": "password-123"})
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert answer.headers["strict-transport-security"] == "max-age=31536000"  # TLS only
    me = httpx.get(f"{broker.url}/api/v1/me", verify=broker.client_tls,
                   headers={"Authorization": f"Bearer {answer.json()['token']}"})
    assert me.json()["name"] == "alice"
    # No plain HTTP on the same port, and no client that does not trust the certificate.
    with pytest.raises(httpx.HTTPError):
        httpx.get(broker.url.replace("https:", "http:") + "/login", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{broker.url}/login", timeout=5)


def test_the_console_proxy_speaks_wss(broker: TlsBroker) -> None:
    browser = Browser(broker.console_port, "token=not-a-ticket", tls=broker.client_tls)
    assert browser.receive() is None  # the WebSocket opened over TLS; the ticket is refused
    assert (browser.close_code, browser.close_reason) == (1008, "console ticket refused")
    browser.sock.close()
    # The native client's tunnel (websockets) gets there by wss:// too, from the API's URL.
    url = console_websocket_url(broker.url, broker.console_port, "not-a-ticket")
    assert url.startswith(f"wss://127.0.0.1:{broker.console_port}/?token=")
    with open_websocket(url, ssl=broker.client_tls, open_timeout=10) as console:
        with pytest.raises(ConnectionClosed):
            console.recv(timeout=10)
        assert (console.close_code, console.close_reason) == (1008, "console ticket refused")
    with socket.create_connection(("127.0.0.1", broker.console_port), timeout=5) as plain:
        plain.sendall(b"GET /?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"101" not in plain.recv(1024)  # plain text is no TLS handshake: no console


def test_wrong_tls_settings_are_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    assert tls_files(Settings(data_dir=tmp_path)) is None
    cases = [
        ({"tls_cert_file": cert}, "DESKPOOL_TLS_KEY_FILE is not set"),
        ({"tls_key_file": key}, "DESKPOOL_TLS_CERT_FILE is not set"),
        ({"tls_cert_file": tmp_path / "nope.pem", "tls_key_file": key},
         f"certificate file {tmp_path / 'nope.pem'} does not exist"),
        ({"tls_cert_file": cert, "tls_key_file": garbage}, "do not load"),
    ]
    for fields, message in cases:
        with pytest.raises(InvalidInput, match=message):
            tls_files(Settings(data_dir=tmp_path, **fields))  # type: ignore[arg-type]

    env = {**os.environ, "DESKPOOL_DATA_DIR": str(tmp_path / "data"),
           "DESKPOOL_TLS_CERT_FILE": str(cert)}
    process = serve_command(env, free_port(), free_port(), tmp_path / "broker.log")
    assert process.wait(timeout=60) != 0
    output = (tmp_path / "broker.log").read_text()
    assert "DESKPOOL_TLS_KEY_FILE is not set" in output
    assert "Traceback" not in output
