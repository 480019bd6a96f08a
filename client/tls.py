"""TLS on the client's side: gRPC channel credentials and the data port's SSLContext, from the same
three files as the daemon's settings (issue 17; docs/security.md).

Contract:
- `ClientTLS(ca_file, cert_file, key_file)`: `ca_file` is the CA that signed the daemon's
  certificate ("" trusts the system's CAs); `cert_file` and `key_file`, set together or not at all,
  are the client's own certificate for a daemon that requires one (mTLS). A pair given alone raises
  ClientTLSError at construction; files are read when credentials or a context are asked for.
- `channel_credentials()` reads the files each time it is called: a channel keeps the credentials
  it was made with, so a rotated client certificate takes effect on the next channel.
- `data_port_context()` answers the same context until one of the files changes ((mtime_ns, size,
  inode), checked on each call), then a new one: each new data-port connection uses the files in force.
- Unreadable or unusable files raise ClientTLSError, one sentence naming the file.

Standard library and grpc only: the client never imports the daemon or `cryptography`.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc


class ClientTLSError(ValueError):
    """A TLS file of the client cannot be used; the message says which and why."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClientTLSError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise ClientTLSError(f"the TLS {what} {path} is empty")
    return data


def _stat(path: str) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _no_password() -> bytes:
    raise ClientTLSError("the private key is encrypted; FlexCache reads unencrypted PEM keys only")


@dataclass(frozen=True)
class ClientTLS:
    """The client's TLS files (the module's contract). Immutable; safe to share between threads."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ClientTLSError("tls_cert_file and tls_key_file go together: the client certificate needs its key")

    @property
    def client_certificate(self) -> bool:
        """True when the client presents a certificate of its own (for a daemon that requires mTLS)."""
        return bool(self.cert_file)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the files as they are now (grpc.ssl_channel_credentials)."""
        root = _read(self.ca_file, "CA file") if self.ca_file else None
        key = _read(self.key_file, "key file") if self.key_file else None
        chain = _read(self.cert_file, "certificate file") if self.cert_file else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def data_port_context(self) -> ssl.SSLContext:
        """A client SSLContext for the data port: TLS 1.2 or later, the daemon's certificate verified
        against ca_file (or the system's CAs) with its host name checked (pass server_hostname= to
        wrap_socket: the host the client dials), and the client's certificate when set. The same
        object until one of the files changes."""
        signature = tuple(_stat(p) for p in (self.ca_file, self.cert_file, self.key_file))
        with self._lock:
            cached = self._cache.get("context")
            if cached is not None and cached[0] == signature:
                return cached[1]
            context = self._build_context()
            self._cache["context"] = (signature, context)
            return context

    def _build_context(self) -> ssl.SSLContext:
        if not self.ca_file:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's CAs
        else:
            ca = _read(self.ca_file, "CA file")
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # ca_file alone, not the system's CAs as well
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                raise ClientTLSError(f"the TLS CA file {self.ca_file} holds no usable PEM certificate "
                                     f"({reason})") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            _read(self.cert_file, "certificate file")  # a clear sentence for a missing file
            _read(self.key_file, "key file")
            try:
                context.load_cert_chain(self.cert_file, self.key_file, password=_no_password)
            except ssl.SSLError as exc:
                if exc.reason == "KEY_VALUES_MISMATCH":
                    raise ClientTLSError(f"the TLS key file {self.key_file} does not match the certificate "
                                         f"{self.cert_file}") from None
                raise ClientTLSError(f"the TLS certificate {self.cert_file} or key {self.key_file} is not usable "
                                     f"PEM ({exc.reason or exc})") from None
        return context
