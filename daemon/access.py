"""Who a call comes from, and what it may touch: the one place the daemon turns a credential into a
tenant (auth.Identity) and checks a request's namespace against it.

Without `auth_tokens_file` every caller is OPEN: an admin of no tenant, the daemon of before auth
existed, for loopback and private networks. With it, a call identifies by its bearer token
(`authorization: Bearer <token>` metadata) or, failing that, by its verified mTLS client
certificate's subject CN, as the tokens file binds them; anything else is UNAUTHENTICATED. A known
caller may then name only its own tenant in a Namespace (PERMISSION_DENIED otherwise), unless it is an
admin. Both the gRPC service and the data port identify through this class, so a ticket issued to a
caller is redeemed only by the same caller (`Identity.writer`).
"""

from __future__ import annotations

from collections.abc import Iterable

from .auth import Credentials, Identity
from .errors import PermissionDenied, Unauthenticated

OPEN = Identity(tenant="", admin=True, writer="")  # every caller while auth is off
BEARER = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata, None when it has none."""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value[:len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip()
    return None


class Access:
    """`credentials`: the tokens file (None: auth off, everyone is OPEN)."""

    def __init__(self, credentials: Credentials | None):
        self.credentials = credentials

    @property
    def on(self) -> bool:
        return self.credentials is not None

    def identify(self, token: str | None, certificate_cn: str | None) -> Identity:
        """The caller, from its bearer token or else its verified certificate's CN; Unauthenticated when
        auth is on and neither identifies anyone. A token that is sent but unknown is refused even if
        a certificate would identify the caller: a revoked token must stop working."""
        if self.credentials is None:
            return OPEN
        if token is not None:
            who = self.credentials.identify_token(token)
            if who is None:
                raise Unauthenticated("the bearer token is not known to this daemon (never issued, or revoked)")
            return who
        if certificate_cn:
            who = self.credentials.identify_certificate(certificate_cn)
            if who is not None:
                return who
            raise Unauthenticated(f"the client certificate {certificate_cn!r} is bound to no tenant in the "
                                  "daemon's tokens file, and the call has no bearer token")
        raise Unauthenticated("this daemon requires a credential: send 'authorization: Bearer <token>' metadata "
                              "(or a client certificate the tokens file binds to a tenant)")

    @staticmethod
    def check(who: Identity, tenant: str) -> None:
        """PermissionDenied unless `who` may use namespaces of `tenant`."""
        if not who.may_use(tenant):
            raise PermissionDenied(f"this credential is bound to tenant {who.tenant!r} and may not use tenant "
                                   f"{tenant[:80]!r}")
