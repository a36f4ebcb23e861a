"""Accounts and API tokens."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from coordinator.models import ApiToken, Role, User
from coordinator.security import SCOPES, hash_password, new_token, token_hash, verify_password

USERNAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,63}$")


def create_user(db: Session, username: str, password: str, role: Role = Role.contributor, email: str | None = None) -> User:
    if not USERNAME.match(username):
        raise BadRequest("username must be 2-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if len(password) < 8:
        raise BadRequest("password must be at least 8 characters")
    if db.scalar(select(User).where(User.username == username)):
        raise Conflict(f"the username {username!r} is taken; choose another")
    u = User(username=username, password_hash=hash_password(password), role=role, email=email)
    db.add(u)
    db.flush()
    return u


def authenticate(db: Session, username: str, password: str) -> User:
    u = db.scalar(select(User).where(User.username == username))
    if u is None or not u.is_active or not verify_password(password, u.password_hash):
        raise Unauthorized("wrong username or password")
    return u


def allowed_scopes(user: User) -> list[str]:
    return list(SCOPES) if user.role in (Role.maintainer, Role.admin) else ["read", "contribute"]


def create_token(db: Session, user: User, name: str, scopes: list[str] | None = None,
                 expires_days: int | None = 365) -> tuple[ApiToken, str]:
    allowed = allowed_scopes(user)
    scopes = scopes or allowed
    bad = [s for s in scopes if s not in allowed]
    if bad:
        raise Forbidden(f"a {user.role.value} cannot hold token scopes {bad}; allowed: {allowed}")
    secret = new_token()
    expires = datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None
    t = ApiToken(user_id=user.id, name=name[:100] or "token", prefix=secret[:12], token_hash=token_hash(secret),
                 scopes=scopes, expires_at=expires)
    db.add(t)
    db.flush()
    return t, secret


def resolve_token(db: Session, secret: str) -> tuple[User, ApiToken]:
    t = db.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(secret)))
    if t is None:
        raise Unauthorized("unknown API token; log in again (`elmforest login`) to get a new one")
    now = datetime.now(UTC)
    if t.revoked_at is not None:
        raise Unauthorized("this API token was revoked; log in again to get a new one")
    exp = t.expires_at.replace(tzinfo=UTC) if t.expires_at and t.expires_at.tzinfo is None else t.expires_at
    if exp is not None and exp < now:
        raise Unauthorized("this API token has expired; log in again to get a new one")
    if not t.user.is_active:
        raise Unauthorized("this account is disabled")
    last = t.last_used_at.replace(tzinfo=UTC) if t.last_used_at and t.last_used_at.tzinfo is None else t.last_used_at
    if last is None or (now - last).total_seconds() > 60:  # don't write on every request
        t.last_used_at = now
    return t.user, t


def list_tokens(db: Session, user: User) -> list[ApiToken]:
    return list(db.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(db: Session, user: User, token_id: int) -> ApiToken:
    t = db.get(ApiToken, token_id)
    if t is None or (t.user_id != user.id and user.role != Role.admin):
        raise NotFound(f"no token {token_id} of yours")
    if t.revoked_at is None:
        t.revoked_at = datetime.now(UTC)
    return t


def set_role(db: Session, username: str, role: Role) -> User:
    u = db.scalar(select(User).where(User.username == username))
    if u is None:
        raise NotFound(f"no user {username!r}")
    u.role = role
    return u
