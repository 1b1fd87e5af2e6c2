"""TLS for the broker's two listeners (uvicorn's HTTPS, the console proxy's wss://), from one
certificate and key in PEM files (``DESKPOOL_TLS_CERT_FILE``, ``DESKPOOL_TLS_KEY_FILE``)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


def tls_files(settings: Settings) -> TlsFiles | None:
    """The configured certificate and key, checked to load; None when TLS is off.

    Raises ``InvalidInput`` naming the setting or file that is wrong."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "DESKPOOL_TLS_CERT_FILE" if cert is None else "DESKPOOL_TLS_KEY_FILE"
        raise InvalidInput(f"TLS needs a certificate and its key: {missing} is not set")
    for what, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise InvalidInput(f"TLS {what} file {path} does not exist")
    files = TlsFiles(cert, key)
    try:
        files.server_context()
    except (ssl.SSLError, OSError) as exc:
        raise InvalidInput(f"TLS certificate {cert} and key {key} do not load: {exc}") from exc
    return files
