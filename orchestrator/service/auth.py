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

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.service.db import Token

PREFIX = "rst"
TOKEN_ID_PATTERN = r"^[0-9a-f]{12}\Z"  # secrets.token_hex(6)
USER_PATTERN = r"^[a-z0-9_-]{1,64}\Z"  # also a folder name: the user's storage prefix (orchestrator/service/policy.py)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a user sees and cancels their own experiments; an admin, everyone's."""

    user: str
    admin: bool


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def create_token(sessions: sessionmaker[Session], user: str, *, admin: bool = False) -> str:
    """A new token for `user`, stored hashed; returns the token (the only time it is seen)."""
    if not re.match(USER_PATTERN, user):
        raise ValueError(f"user {user!r}: use 1-64 lower-case letters, digits, _ and -")
    token_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    with sessions.begin() as session:
        session.add(Token(id=token_id, user=user, admin=admin, salt=salt, digest=_digest(salt, secret)))
    return f"{PREFIX}_{token_id}_{secret}"


def list_tokens(sessions: sessionmaker[Session], user: str | None = None) -> list[Token]:
    """The stored tokens (of `user`), oldest first: ids, users and roles; their secrets are not stored."""
    query = select(Token).order_by(Token.created_at, Token.id)
    with sessions() as session:
        return list(session.scalars(query if user is None else query.where(Token.user == user)))


def revoke_token(sessions: sessionmaker[Session], token_id: str) -> bool:
    """Delete the token with this id (the `<id>` of `rst_<id>_<secret>`); returns whether there was one."""
    with sessions.begin() as session:
        return session.execute(delete(Token).where(Token.id == token_id)).rowcount == 1


def authenticate(sessions: sessionmaker[Session], token: str) -> Caller | None:
    """The caller a token belongs to, or None for a malformed or unknown token."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not re.match(TOKEN_ID_PATTERN, token_id) or not secret:
        return None  # a malformed id never reaches the database (PostgreSQL refuses a NUL in it)
    with sessions() as session:
        stored = session.get(Token, token_id)
    if stored is None or not hmac.compare_digest(stored.digest, _digest(stored.salt, secret)):
        return None
    return Caller(stored.user, stored.admin)
