"""API tokens of `restorch serve`, created with `restorch serve token create USER [--admin]`.

A token reads `rst_<id>_<secret>`: a random public id and 32 random bytes. The database keeps the
id, a per-token salt and sha256(salt + secret), never the token itself, which is shown once when
created. A request carries it as `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.service_db import Token

PREFIX = "rst"
USER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a user sees and cancels their own experiments; an admin, everyone's."""

    user: str
    admin: bool


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def create_token(sessions: sessionmaker[Session], user: str, *, admin: bool = False) -> str:
    """A new token for `user`, stored hashed; returns the token (the only time it is seen)."""
    if not USER_PATTERN.match(user):
        raise ValueError(f"user {user!r}: use 1-64 letters, digits and _ . @ - (starting with a letter or digit)")
    token_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    with sessions.begin() as session:
        session.add(Token(id=token_id, user=user, admin=admin, salt=salt, digest=_digest(salt, secret)))
    return f"{PREFIX}_{token_id}_{secret}"


def authenticate(sessions: sessionmaker[Session], token: str) -> Caller | None:
    """The caller a token belongs to, or None for a malformed or unknown token."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not token_id or not secret:
        return None
    with sessions() as session:
        stored = session.get(Token, token_id)
    if stored is None or not hmac.compare_digest(stored.digest, _digest(stored.salt, secret)):
        return None
    return Caller(stored.user, stored.admin)
