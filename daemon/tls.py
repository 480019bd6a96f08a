"""The daemon's TLS certificates, re-read when their files change (cert-manager rotates them in a
Kubernetes Secret volume), for the gRPC port and the data port alike (issue 17).

Contract:
- `ServerCertificates(cert_file, key_file, client_ca_file)` reads the three files now; a pair that
  cannot be used (unreadable, not PEM, a key that does not match the certificate, a CA file with no
  certificate) raises TLSConfigError, one sentence naming the file. With `client_ca_file` set, clients
  must present a certificate that CA signed (mTLS) on both ports.
- Afterwards `current()` checks the files' (mtime_ns, size, inode) at most every `reload_s` seconds
  and, when any changed, reads and checks them again: a usable set becomes the new `TLSMaterial`
  (its `generation` one higher); an unusable one (a pair half written, a file missing) keeps the
  old material and logs one warning per change, without a traceback.
- `grpc_credentials()`: `grpc.ServerCredentials` whose fetcher gRPC calls before the handshake of
  every new connection (measured: tests/test_tls.py); it answers the new certificate configuration
  after a change and None otherwise, so connections made after a rotation get the new certificate
  and the ones already open keep theirs.
- `ssl_context()`: the `ssl.SSLContext` for the plain-TCP data port, a new one per change (wrap each
  accepted socket with the context `ssl_context()` returns then).
- `peer_common_name(ssl_socket)` and `grpc_peer_common_name(servicer_context)`: the subject CN of the
  client's verified certificate, or None.

Standard library and grpc only: the certificate and its key are checked with `ssl` itself, from the
very bytes handed to gRPC, so what gRPC serves is always what was checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""The oldest TLS the data port accepts (gRPC's own minimum is TLS 1.2 too)."""


class TLSConfigError(ValueError):
    """The TLS files cannot be used; the message is one sentence that names the file and the problem."""


@dataclass(frozen=True)
class TLSMaterial:
    """One checked set of TLS files: the PEM bytes as read, and the data port's context built from them.

    `generation` counts the sets a ServerCertificates has taken into use (the first is 1)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None
    context: ssl.SSLContext
    generation: int


_Signature = tuple[tuple[int, int, int] | None, ...]
_NOTHING = object()  # no change refused


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a Secret volume swaps its ..data link
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TLSConfigError(f"the {what} {path} is empty")
    return data


@contextlib.contextmanager
def pem_paths(*contents: bytes) -> Iterator[list[str]]:
    """Paths from which OpenSSL can read `contents` (ssl.SSLContext.load_cert_chain takes paths only):
    anonymous in-memory files on Linux, so a private key never lands on a disk; elsewhere files in a
    private temporary folder, removed on exit."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        try:
            for data in contents:
                fd = os.memfd_create("flexcache-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="flexcache-tls-") as folder:
        paths = []
        for i, data in enumerate(contents):
            path = os.path.join(folder, f"{i}.pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(data)
            paths.append(path)
        yield paths


def _no_password() -> bytes:
    raise TLSConfigError("the private key is encrypted; FlexCache reads unencrypted PEM keys only")


def server_context(cert_chain: bytes, private_key: bytes, client_ca: bytes | None,
                   files: tuple[str, str, str] = ("certificate", "key", "client CA")) -> ssl.SSLContext:
    """A server-side SSLContext from PEM bytes: TLS 1.2 or later, the certificate chain and its key, and
    with `client_ca` CERT_REQUIRED against it. TLSConfigError (naming `files`: cert, key and CA file
    names) when the chain, the key or the CA cannot be used or the key does not match the certificate."""
    cert_file, key_file, ca_file = files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    with pem_paths(cert_chain, private_key) as (cert_path, key_path):
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except TLSConfigError as exc:
            raise TLSConfigError(f"{key_file}: {exc}") from None
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if reason == "KEY_VALUES_MISMATCH":
                raise TLSConfigError(f"the key {key_file} does not match the certificate {cert_file}") from None
            raise TLSConfigError(f"the certificate {cert_file} or the key {key_file} is not usable PEM "
                                 f"({reason})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise TLSConfigError(f"the client CA {ca_file} holds no usable PEM certificate ({reason})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class ServerCertificates:
    """The daemon's certificate chain, key and optional client CA, kept current (the module's contract).

    Thread-safe: `current()` takes no lock while no check is due, and at most one thread re-reads the
    files while the others go on with the material in force."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "", *, reload_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not cert_file or not key_file:
            raise TLSConfigError("TLS needs both tls_cert_file and tls_key_file")
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._reload_s = reload_s
        self._clock = clock
        self._lock = threading.Lock()
        signature = self._signature()
        self._material = self._load(generation=1)
        self._seen: _Signature = signature
        self._refused: _Signature | object = _NOTHING
        self._next_check = clock() + reload_s
        self._grpc_generation = self._material.generation
        self._grpc_lock = threading.Lock()

    @property
    def client_auth(self) -> bool:
        """True when clients must present a certificate the client CA signed (mTLS)."""
        return bool(self.client_ca_file)

    def _paths(self) -> tuple[str, ...]:
        return (self.cert_file, self.key_file, *((self.client_ca_file,) if self.client_ca_file else ()))

    def _signature(self) -> _Signature:
        return tuple(_stat(p) for p in self._paths())

    def _load(self, generation: int) -> TLSMaterial:
        cert = _read(self.cert_file, "certificate")
        key = _read(self.key_file, "key")
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        context = server_context(cert, key, ca, (self.cert_file, self.key_file, self.client_ca_file))
        return TLSMaterial(cert_chain=cert, private_key=key, client_ca=ca, context=context, generation=generation)

    def current(self) -> TLSMaterial:
        """The material in force, after re-reading the files if one changed (checked at most every
        reload_s). Never raises: an unusable change keeps the previous material."""
        if self._clock() >= self._next_check and self._lock.acquire(blocking=False):
            try:
                if self._clock() >= self._next_check:
                    self._check()
            finally:
                self._lock.release()
        return self._material

    def check_now(self) -> bool:
        """Check the files at once, whatever reload_s says; True when new material took effect."""
        with self._lock:
            return self._check()

    def _check(self) -> bool:
        self._next_check = self._clock() + self._reload_s
        signature = self._signature()
        if signature in (self._seen, self._refused):
            return False
        try:
            material = self._load(self._material.generation + 1)
        except Exception as exc:  # TLSConfigError, or anything else: a reload never takes the port down
            self._refused = signature
            log.warning("TLS files changed but cannot be used: %s; still serving the previous certificate", exc)
            return False
        self._material, self._seen, self._refused = material, signature, _NOTHING
        log.info("TLS certificate %s re-read (generation %d)", self.cert_file, material.generation)
        return True

    def ssl_context(self) -> ssl.SSLContext:
        """The data port's server context in force (a new object after each accepted change)."""
        return self.current().context

    def grpc_configuration(self, material: TLSMaterial | None = None) -> grpc.ServerCertificateConfiguration:
        """gRPC's certificate configuration of `material` (the one in force by default)."""
        material = material or self.current()
        return grpc.ssl_server_certificate_configuration([(material.private_key, material.cert_chain)],
                                                         root_certificates=material.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: called before each new connection's handshake. A new configuration once per
        accepted change, else None (keep the one gRPC holds)."""
        try:
            material = self.current()
            with self._grpc_lock:
                if material.generation == self._grpc_generation:
                    return None
                self._grpc_generation = material.generation
            return self.grpc_configuration(material)
        except Exception as exc:  # an exception here would fail the handshake; keep what gRPC has
            log.warning("TLS certificate fetch failed: %s; keeping the previous certificate", exc)
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials for `server.add_secure_port`, following this object's files: built with
        grpc.dynamic_ssl_server_credentials, requiring a client certificate when client_auth."""
        material = self.current()
        with self._grpc_lock:
            self._grpc_generation = material.generation
        return grpc.dynamic_ssl_server_credentials(self.grpc_configuration(material), self._fetch,
                                                   require_client_authentication=self.client_auth)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "", *,
                       reload_s: float = 1.0) -> tuple[grpc.ServerCredentials, ServerCertificates]:
    """gRPC server credentials that follow the files, and the ServerCertificates behind them (share it
    with the data port: `certificates.ssl_context()`). TLSConfigError if the files cannot be used now."""
    certificates = ServerCertificates(cert_file, key_file, client_ca_file, reload_s=reload_s)
    return certificates.grpc_credentials(), certificates


# ---- who is on the other end ----

def peer_common_name(sock: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The subject CN of the peer's certificate on a TLS socket after its handshake, or None when the
    peer presented none or it was not verified (the context did not require one). With several CNs,
    the first, as gRPC reads it (x509_common_name)."""
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):  # no handshake yet, or the connection is gone
        return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None


def grpc_peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The subject CN of the client's certificate on a gRPC call (its auth context's x509_common_name),
    or None when the call is not over TLS or the client presented no certificate. gRPC puts a client
    certificate in the auth context only when it verified it against the client CA."""
    try:
        auth = context.auth_context()
    except Exception:  # a context without a transport (a test double, a closed call)
        return None
    if auth.get("transport_security_type", [b""])[0] != b"ssl":
        return None
    values = auth.get("x509_common_name") or []
    if not values or not values[0]:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
