"""Dashboard sessions: who is signed in, with which role, and their CSRF token.

A session is a signed cookie, not server state, so it survives restarts and
works across several API processes:

    ledgerq_session = <role>.<expires unix s>.<nonce hex>.<HMAC-SHA256 base64url>

The HMAC key of a role is derived from that role's token, so changing a token
signs every session made with the old one out. The CSRF token of a session is
another HMAC of its nonce: a form must carry it in ``csrf_token``, and a
cross-site page cannot read it (the cookie is HttpOnly and SameSite=Strict on
top). With no token configured the dashboard is open: sessions are still
issued (for CSRF), signed with a key drawn at random when the app starts.

Every comparison of a token, a signature or a CSRF token takes constant time.
The cookie is ``Secure`` when the request came over HTTPS, or when a trusted
proxy says so in ``X-Forwarded-Proto`` (``ledgerq api --trust-forwarded-proto``).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import secrets
import time

from starlette.requests import Request
from starlette.responses import Response

COOKIE_NAME = "ledgerq_session"
COOKIE_PATH = "/ui"
#: How long a sign-in lasts.
SESSION_TTL_S = 12 * 3600
_KEY_LABEL = b"ledgerq dashboard session v1"


class Role(enum.StrEnum):
    """What a session may do: ``admin`` reads and changes, ``reader`` only reads."""

    ADMIN = "admin"
    READER = "reader"


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its role and the CSRF token its forms carry."""

    role: Role
    csrf_token: str
    expires_at: int

    @property
    def may_change(self) -> bool:
        return self.role is Role.ADMIN


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    """The tokens that sign in, and the signing key each role's sessions use."""

    admin_token: bytes | None
    readonly_token: bytes | None
    signing: dict[Role, bytes]
    trust_forwarded_proto: bool = False

    @classmethod
    def from_tokens(
        cls,
        admin_token: str | None,
        readonly_token: str | None,
        *,
        trust_forwarded_proto: bool = False,
    ) -> Keys:
        signing: dict[Role, bytes] = {}
        if admin_token is None:
            # Open dashboard: sessions only carry CSRF tokens; any fresh key works.
            signing[Role.ADMIN] = secrets.token_bytes(32)
        else:
            signing[Role.ADMIN] = hmac.digest(admin_token.encode(), _KEY_LABEL, hashlib.sha256)
        if readonly_token is not None:
            signing[Role.READER] = hmac.digest(readonly_token.encode(), _KEY_LABEL, hashlib.sha256)
        return cls(
            admin_token.encode() if admin_token is not None else None,
            readonly_token.encode() if readonly_token is not None else None,
            signing,
            trust_forwarded_proto,
        )

    @property
    def open(self) -> bool:
        """No token configured: everyone is an admin."""
        return self.admin_token is None

    def role_of_token(self, token: str) -> Role | None:
        """The role token signs in as, if any (both compared, in constant time)."""
        given = token.strip().encode()
        is_admin = self.admin_token is not None and hmac.compare_digest(given, self.admin_token)
        is_reader = self.readonly_token is not None and hmac.compare_digest(
            given, self.readonly_token
        )
        if is_admin:
            return Role.ADMIN
        return Role.READER if is_reader else None

    def _signature(self, role: Role, payload: str) -> str:
        return _b64(hmac.digest(self.signing[role], payload.encode(), hashlib.sha256))

    def _csrf(self, role: Role, nonce: str) -> str:
        return _b64(hmac.digest(self.signing[role], b"csrf." + nonce.encode(), hashlib.sha256))

    def issue(self, role: Role, *, now: float | None = None) -> tuple[Session, str]:
        """A new session for role, and the cookie value that carries it."""
        expires_at = int(now if now is not None else time.time()) + SESSION_TTL_S
        nonce = secrets.token_hex(16)
        payload = f"{role.value}.{expires_at}.{nonce}"
        cookie = f"{payload}.{self._signature(role, payload)}"
        return Session(role, self._csrf(role, nonce), expires_at), cookie

    def read(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None if it is missing, forged or expired."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        role_text, expires_text, nonce, signature = parts
        try:
            role = Role(role_text)
            expires_at = int(expires_text)
        except ValueError:
            return None
        if role not in self.signing:
            return None
        payload = f"{role_text}.{expires_text}.{nonce}"
        if not hmac.compare_digest(signature.encode(), self._signature(role, payload).encode()):
            return None
        if expires_at <= (now if now is not None else time.time()):
            return None
        return Session(role, self._csrf(role, nonce), expires_at)

    def is_secure(self, request: Request) -> bool:
        """Whether request reached us over HTTPS (directly, or per a trusted proxy)."""
        if request.url.scheme == "https":
            return True
        if not self.trust_forwarded_proto:
            return False
        forwarded = request.headers.get("x-forwarded-proto", "")
        # A chain of proxies lists one scheme each; the first is the client's.
        return forwarded.split(",")[0].strip().lower() == "https"

    def set_cookie(self, response: Response, request: Request, value: str) -> None:
        response.set_cookie(
            COOKIE_NAME,
            value,
            max_age=SESSION_TTL_S,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=self.is_secure(request),
        )

    def clear_cookie(self, response: Response, request: Request) -> None:
        response.delete_cookie(
            COOKIE_NAME,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=self.is_secure(request),
        )


def csrf_valid(session: Session, submitted: str | None) -> bool:
    """Whether a form's csrf_token is its session's (constant time)."""
    if not submitted:
        return False
    return hmac.compare_digest(submitted.encode(), session.csrf_token.encode())
