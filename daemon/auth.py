"""Credentials bound to tenants: bearer tokens and mTLS client-certificate identities (issue 17).

The tokens file (setting `auth_tokens_file`) is YAML written by `flexcache tokens` (docs/security.md):

    tokens:
      - id: 3f2a9c1b7d4e          # sha256[:12]: what `list` shows, what `revoke` takes, the writer identity
        sha256: <64 hex>          # of the token's UTF-8 text; the token itself is never stored
        tenant: acme              # "" only for an admin that is bound to no tenant
        admin: false
        created: "2026-12-01T11:00:00Z"
    certificates:                 # optional: client-certificate subject CNs (mTLS) bound to tenants
      - cn: worker-1.acme
        tenant: acme
        admin: false
        created: "2026-12-01T11:00:00Z"

Contract:
- `Credentials(path)` loads the file or raises AuthConfigError (one sentence naming the file and the
  problem). Afterwards it re-reads the file when its (mtime_ns, size, inode) changes, checked at most
  every `reload_s` seconds when a credential is looked up, so a revoked token stops identifying within
  `reload_s` (plus the time the file takes to be replaced) without a restart. A file that becomes
  unreadable, invalid or empty keeps the last good credentials and logs one warning per change of the
  file, without a traceback.
- `identify_token` / `identify_certificate` answer an `Identity` or None (unknown credential); they
  never raise and are safe to call from many threads at once.
- The file functions (`add_token`, `add_certificate`, `list_entries`, `revoke`) are what the CLI runs:
  every write replaces the file atomically (a temporary file in the same folder, fsync, rename) with
  mode 0600, under an advisory lock so that two concurrent writers do not lose each other's entry.

This module imports only the standard library, yaml and the daemon's request limits (validate.py,
itself numpy and protobuf): `flexcache tokens` never loads RocksDB, Qdrant or Prometheus.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .validate import MAX_NAME_CHARS

log = logging.getLogger(__name__)

TOKEN_PREFIX = "fct_"
"""Every token starts with it (FlexCache token), so a leaked one is recognisable (secret scanners)."""
TOKEN_BYTES = 32
"""Random bytes in a token, urlsafe-base64 encoded after the prefix."""
ID_CHARS = 12
"""A token's id: the first ID_CHARS hex characters of its sha256."""
HEADER = "# written by `flexcache tokens`; only sha256 hashes of tokens are stored (docs/security.md)\n"

_TOKEN_KEYS = frozenset({"id", "sha256", "tenant", "admin", "created"})
_CERT_KEYS = frozenset({"cn", "tenant", "admin", "created"})
_TOP_KEYS = frozenset({"tokens", "certificates"})
_HEX = frozenset("0123456789abcdef")


class AuthConfigError(ValueError):
    """The tokens file cannot be used (unreadable, not valid YAML, a bad entry, a bad tenant name), or
    a file operation's argument is refused; the message is one sentence that names the file."""


def tenant_problem(tenant: str) -> str | None:
    """Why `tenant` cannot be bound to a credential (None: it can). The daemon's rule for
    Namespace.tenant (set, at most validate.MAX_NAME_CHARS characters), so a credential never names a
    tenant no request could carry; and no '/', the separator of namespace names
    ('tenant/model/WxHxF/scheduler/steps'), so that the namespaces of a bound tenant are exactly those
    whose name starts with the tenant and a '/' (what per-tenant Stats filter on)."""
    if not isinstance(tenant, str) or not tenant:
        return "a tenant name must be a non-empty string"
    if len(tenant) > MAX_NAME_CHARS:
        return f"the tenant name has {len(tenant)} characters, above the limit of {MAX_NAME_CHARS}"
    if "/" in tenant:
        return f"the tenant name {tenant[:80]!r} contains '/', the separator of namespace names"
    return None


def token_hash(token: str) -> str:
    """The hex sha256 of a token's UTF-8 text: what the file stores for it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A new random token: TOKEN_PREFIX + 32 random bytes, urlsafe base64 (43 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class Identity:
    """Who a request comes from, once a credential identified it.

    `tenant`: the tenant the credential is bound to; "" only for an admin bound to none. `admin`: may
    use and manage every tenant. `writer`: a stable, non-secret name of the credential ("token:<id>" or
    "cert:<cn>"), the identity recorded as an entry's writer and safe to log."""

    tenant: str
    admin: bool
    writer: str

    def may_use(self, tenant: str) -> bool:
        """True when a request naming `tenant` in its Namespace is allowed: an admin may use any
        tenant, anyone else only its own (never "", which names no tenant)."""
        return self.admin or (bool(self.tenant) and tenant == self.tenant)


@dataclass(frozen=True)
class TokenEntry:
    """One token in the file: its id (sha256[:12]), its hash, and what it is bound to."""

    id: str
    sha256: str
    tenant: str
    admin: bool
    created: str

    kind = "token"

    @property
    def key(self) -> str:
        """What `list` shows and `revoke` takes: the id."""
        return self.id

    @property
    def identity(self) -> Identity:
        return Identity(tenant=self.tenant, admin=self.admin, writer=f"token:{self.id}")

    def to_yaml(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.sha256, "tenant": self.tenant, "admin": self.admin,
                "created": self.created}


@dataclass(frozen=True)
class CertificateEntry:
    """One client-certificate identity: a subject CN (of a certificate the client CA signed) bound to a
    tenant."""

    cn: str
    tenant: str
    admin: bool
    created: str

    kind = "cert"

    @property
    def key(self) -> str:
        """What `list` shows and `revoke` takes: the CN."""
        return self.cn

    @property
    def identity(self) -> Identity:
        return Identity(tenant=self.tenant, admin=self.admin, writer=f"cert:{self.cn}")

    def to_yaml(self) -> dict[str, Any]:
        return {"cn": self.cn, "tenant": self.tenant, "admin": self.admin, "created": self.created}


@dataclass(frozen=True)
class TokensFile:
    """A parsed, checked tokens file: no two tokens share a hash or an id, no two certificates a CN."""

    tokens: tuple[TokenEntry, ...] = ()
    certificates: tuple[CertificateEntry, ...] = ()

    def to_text(self) -> str:
        body = {"tokens": [t.to_yaml() for t in self.tokens],
                "certificates": [c.to_yaml() for c in self.certificates]}
        return HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ---- reading ----

def parse(text: str, source: str) -> TokensFile:
    """The tokens file in `text`, checked; AuthConfigError names `source` and the first problem.

    An empty document is refused (a file cut short to nothing must not revoke every credential at
    once): a file with no credentials says so with `tokens: []`, as the CLI writes it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise AuthConfigError(f"tokens file {source} is not valid YAML: {reason}") from None
    if data is None:
        raise AuthConfigError(f"tokens file {source} is empty (a file without credentials has 'tokens: []')")
    if not isinstance(data, dict):
        raise AuthConfigError(f"tokens file {source} must be a mapping with 'tokens' and 'certificates' lists")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise AuthConfigError(f"tokens file {source}: unknown key {unknown[0]!r} (expected tokens, certificates)")
    tokens = tuple(_token(item, f"{source}: tokens[{i}]") for i, item in enumerate(_list(data, "tokens", source)))
    certificates = tuple(_certificate(item, f"{source}: certificates[{i}]")
                         for i, item in enumerate(_list(data, "certificates", source)))
    seen: set[str] = set()
    for entry in tokens:
        if entry.sha256 in seen or entry.id in seen:
            raise AuthConfigError(f"tokens file {source}: token {entry.id} appears twice")
        seen.update((entry.sha256, entry.id))
    names: set[str] = set()
    for cert in certificates:
        if cert.cn in names:
            raise AuthConfigError(f"tokens file {source}: certificate CN {cert.cn!r} appears twice")
        names.add(cert.cn)
    return TokensFile(tokens, certificates)


def _list(data: dict, key: str, source: str) -> list:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise AuthConfigError(f"tokens file {source}: {key} must be a list")
    return value


def _fields(item: Any, where: str, allowed: frozenset[str]) -> dict:
    if not isinstance(item, dict):
        raise AuthConfigError(f"tokens file {where} must be a mapping")
    unknown = sorted(str(k) for k in item if k not in allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise AuthConfigError(f"tokens file {where}: unknown key {unknown[0]!r} (expected {expected})")
    return item


def _binding(item: dict, where: str) -> tuple[str, bool, str]:
    """(tenant, admin, created) of an entry, checked."""
    admin = item.get("admin", False)
    if not isinstance(admin, bool):
        raise AuthConfigError(f"tokens file {where}: admin must be true or false, not {admin!r}")
    tenant = item.get("tenant", "")
    if tenant is None:
        tenant = ""
    if not (admin and tenant == ""):
        problem = tenant_problem(tenant)
        if problem:
            raise AuthConfigError(f"tokens file {where}: {problem} (only an admin may have none)")
    created = item.get("created", "")
    if isinstance(created, datetime.datetime | datetime.date):  # an unquoted YAML timestamp
        created = created.isoformat()
    if not isinstance(created, str):
        raise AuthConfigError(f"tokens file {where}: created must be a timestamp string")
    return tenant, admin, created


def _token(item: Any, where: str) -> TokenEntry:
    item = _fields(item, where, _TOKEN_KEYS)
    digest = item.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest.lower()) <= _HEX:
        raise AuthConfigError(f"tokens file {where}: sha256 must be 64 hex characters")
    digest = digest.lower()
    token_id = item.get("id", digest[:ID_CHARS])
    if token_id != digest[:ID_CHARS]:
        raise AuthConfigError(f"tokens file {where}: id {token_id!r} is not the first {ID_CHARS} characters "
                              "of its sha256")
    tenant, admin, created = _binding(item, where)
    return TokenEntry(id=token_id, sha256=digest, tenant=tenant, admin=admin, created=created)


def _certificate(item: Any, where: str) -> CertificateEntry:
    item = _fields(item, where, _CERT_KEYS)
    cn = item.get("cn")
    if not isinstance(cn, str) or not cn:
        raise AuthConfigError(f"tokens file {where}: cn must be a non-empty string (the certificate's subject CN)")
    tenant, admin, created = _binding(item, where)
    return CertificateEntry(cn=cn, tenant=tenant, admin=admin, created=created)


def load(path: str | os.PathLike[str]) -> TokensFile:
    """The tokens file at `path`, checked; AuthConfigError if it cannot be read or used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AuthConfigError(f"tokens file {path} is not UTF-8 text") from None
    return parse(text, str(path))


# ---- the daemon's view: identify credentials, re-read on change ----

_Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: the file cannot be stat'ed
_NOTHING = object()  # no change refused


def _signature(path: Path) -> _Signature:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes Secret volume swaps its ..data link
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class _Snapshot:
    by_hash: dict[str, Identity]
    by_cn: dict[str, Identity]
    tenants: frozenset[str]

    @classmethod
    def of(cls, parsed: TokensFile) -> _Snapshot:
        tenants = {e.tenant for e in (*parsed.tokens, *parsed.certificates) if e.tenant}
        return cls(by_hash={t.sha256: t.identity for t in parsed.tokens},
                   by_cn={c.cn: c.identity for c in parsed.certificates}, tenants=frozenset(tenants))


class Credentials:
    """The daemon's credentials, from the tokens file, kept current.

    Construct with the file's path: it is read now, and a problem raises AuthConfigError (a daemon
    must not start with credentials it cannot read). Then every lookup first checks, at most every
    `reload_s` seconds (on `clock`, time.monotonic by default), whether the file's (mtime_ns, size,
    inode) changed, and re-reads it if so. A change that cannot be used (unreadable, missing, invalid)
    leaves the last good credentials in force and logs one warning for that change; the next change
    is tried again. Lookups take no lock while no check is due, and at most one thread re-reads the file
    while the others keep answering from the credentials in force."""

    def __init__(self, path: str | os.PathLike[str], *, reload_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._path = Path(path)
        self._reload_s = reload_s
        self._clock = clock
        self._lock = threading.Lock()
        signature = _signature(self._path)
        self._snapshot = _Snapshot.of(load(self._path))
        self._signature: _Signature = signature
        self._refused: _Signature | object = _NOTHING  # the change that was refused (and warned about)
        self._next_check = clock() + reload_s

    @property
    def path(self) -> Path:
        return self._path

    def identify_token(self, token: str) -> Identity | None:
        """The identity of a bearer token (the text after 'Bearer '), or None when the file holds no
        such token (never issued, or revoked). The token is hashed and looked up by its hash."""
        self._maybe_reload()
        if not isinstance(token, str) or not token:
            return None
        return self._snapshot.by_hash.get(token_hash(token))

    def identify_certificate(self, cn: str) -> Identity | None:
        """The identity bound to a verified client certificate's subject CN, or None when the file
        binds none (a certificate the CA signed but nobody registered identifies no tenant)."""
        self._maybe_reload()
        if not isinstance(cn, str) or not cn:
            return None
        return self._snapshot.by_cn.get(cn)

    def tenants(self) -> frozenset[str]:
        """The tenants some credential is bound to (e.g. the tenants metrics may name)."""
        self._maybe_reload()
        return self._snapshot.tenants

    def check_now(self) -> bool:
        """Check the file at once, whatever `reload_s` says; True when new credentials took effect."""
        with self._lock:
            return self._check()

    def _maybe_reload(self) -> None:
        if self._clock() < self._next_check:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking: answer from the credentials in force
        try:
            if self._clock() >= self._next_check:
                self._check()
        finally:
            self._lock.release()

    def _check(self) -> bool:
        self._next_check = self._clock() + self._reload_s
        signature = _signature(self._path)
        if signature in (self._signature, self._refused):
            return False
        if signature is None:
            self._refused = None
            log.warning("tokens file %s cannot be read any more; keeping the %d tokens and %d certificates "
                        "read before", self._path, len(self._snapshot.by_hash), len(self._snapshot.by_cn))
            return False
        try:
            parsed = load(self._path)
        except AuthConfigError as exc:
            self._refused = signature
            log.warning("%s; keeping the credentials read before", exc)
            return False
        self._snapshot = _Snapshot.of(parsed)
        self._signature, self._refused = signature, _NOTHING
        log.info("tokens file %s re-read: %d tokens, %d certificates", self._path, len(parsed.tokens),
                 len(parsed.certificates))
        return True


# ---- the CLI's view: change the file ----

def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An advisory lock on a sibling '.<name>.lock' file for a read-modify-write of `path` (POSIX);
    without fcntl, no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the operator's business
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuthConfigError(f"cannot lock tokens file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_for_update(path: Path) -> TokensFile:
    if not path.exists():
        return TokensFile()
    return load(path)


def write(path: str | os.PathLike[str], contents: TokensFile) -> None:
    """Replace the file at `path` with `contents`, atomically: a temporary file in the same folder,
    mode 0600, fsync'ed, renamed over it, then the folder fsync'ed. AuthConfigError if it fails."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise AuthConfigError(f"cannot write tokens file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(contents.to_text())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AuthConfigError(f"cannot write tokens file {path}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _check_binding(path: Path, tenant: str, admin: bool) -> None:
    if admin and tenant == "":
        return
    problem = tenant_problem(tenant)
    if problem:
        raise AuthConfigError(f"cannot add to tokens file {path}: {problem}" +
                              ("" if tenant else " (only an admin may have none)"))


def add_token(path: str | os.PathLike[str], tenant: str, admin: bool = False) -> tuple[str, TokenEntry]:
    """Create a new random token bound to `tenant` ("" only with `admin`), store its hash in the file at
    `path` (created if missing) and return (the token, its entry). The token is not stored anywhere:
    this is the one time it exists in clear. AuthConfigError for a bad tenant name or an unusable file."""
    path = Path(path)
    _check_binding(path, tenant, admin)
    with _locked(path):
        current = _read_for_update(path)
        taken = {t.id for t in current.tokens}
        while True:  # an id clash (48 bits) is never expected; a new token is cheaper than an exception
            token = new_token()
            digest = token_hash(token)
            if digest[:ID_CHARS] not in taken:
                break
        entry = TokenEntry(id=digest[:ID_CHARS], sha256=digest, tenant=tenant, admin=admin, created=_now())
        write(path, TokensFile((*current.tokens, entry), current.certificates))
    return token, entry


def add_certificate(path: str | os.PathLike[str], cn: str, tenant: str, admin: bool = False) -> CertificateEntry:
    """Bind the client-certificate subject CN `cn` to `tenant` ("" only with `admin`) in the file at
    `path` (created if missing) and return the entry. AuthConfigError when the CN is already bound
    (revoke it first), or for a bad CN, tenant name or file."""
    path = Path(path)
    if not isinstance(cn, str) or not cn:
        raise AuthConfigError(f"cannot add to tokens file {path}: a certificate CN must be a non-empty string")
    _check_binding(path, tenant, admin)
    with _locked(path):
        current = _read_for_update(path)
        if any(c.cn == cn for c in current.certificates):
            raise AuthConfigError(f"tokens file {path} already binds certificate CN {cn!r}; revoke it first")
        entry = CertificateEntry(cn=cn, tenant=tenant, admin=admin, created=_now())
        write(path, TokensFile(current.tokens, (*current.certificates, entry)))
    return entry


Entry = TokenEntry | CertificateEntry


def list_entries(path: str | os.PathLike[str]) -> list[Entry]:
    """Every entry of the file at `path`: tokens first, then certificates, each in file order.
    AuthConfigError if the file cannot be read or used."""
    parsed = load(path)
    return [*parsed.tokens, *parsed.certificates]


def revoke(path: str | os.PathLike[str], key: str) -> bool:
    """Remove the token whose id is `key`, and the certificate identity whose CN is `key`, from the
    file at `path`; False (the file unchanged) when none matches. A running daemon stops accepting
    the credential within its reload_s. AuthConfigError if the file cannot be read or written."""
    path = Path(path)
    with _locked(path):
        current = load(path)
        tokens = tuple(t for t in current.tokens if t.id != key)
        certificates = tuple(c for c in current.certificates if c.cn != key)
        if len(tokens) == len(current.tokens) and len(certificates) == len(current.certificates):
            return False
        write(path, TokensFile(tokens, certificates))
    return True
