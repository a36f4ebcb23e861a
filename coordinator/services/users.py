"""Accounts and API tokens."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from coordinator.models import ApiToken, Invite, Role, User
from coordinator.names import USERNAME
from coordinator.security import SCOPES, hash_password, new_token, token_hash, verify_password


def require_maintainer(user: User, message: str = "only maintainers may do this") -> None:
    """Forbidden (403, saying `message`) unless `user` is a maintainer or an admin."""
    if not user.is_maintainer:
        raise Forbidden(message)


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


def authenticate(db: Session, username: str, password: str, address: str = "", per_hour: int = 0) -> User:
    """The user, if the password is right. Wrong passwords count against the address: past
    `per_hour` of them it is refused for a while (429), right password or not."""
    from coordinator.services import limits

    bucket = f"login:{address}"
    if per_hour:
        limits.check(db, bucket, per_hour, "failed logins from your address")
    u = db.scalar(select(User).where(User.username == username))
    if u is None or not u.is_active or not verify_password(password, u.password_hash):
        if per_hour:
            limits.record(db, bucket)
            db.commit()  # counted even though this request fails
        raise Unauthorized("wrong username or password")
    return u


def register(db: Session, settings, username: str, password: str, email: str | None, invite: str | None,
             address: str) -> User:
    """Open registration, by the settings: open (rate-limited per address), invite-only or closed."""
    from coordinator.services import limits

    if settings.registration == "closed":
        raise Forbidden("registration is closed on this coordinator; ask a maintainer for an account")
    inv = None
    if settings.registration == "invite":
        if not invite:
            raise Forbidden("registration here is by invitation: pass the code a maintainer gave you (--invite)")
        inv = db.scalar(select(Invite).where(Invite.code_hash == token_hash(invite)))
        now = datetime.now(UTC)
        if inv is None or inv.used_at is not None or inv.expires_at < now:
            raise Forbidden("this invitation code is unknown, used or expired; ask a maintainer for a new one")
    limits.check(db, f"register:{address}", settings.registrations_per_hour, "accounts created from your address")
    u = create_user(db, username, password, email=email)
    limits.record(db, f"register:{address}")
    if inv is not None:
        inv.used_at, inv.used_by_id = datetime.now(UTC), u.id
    return u


def invite(db: Session, user: User, note: str = "", days: int = 7) -> tuple[Invite, str]:
    """A one-use invitation code (maintainers); the code is shown once and stored hashed."""
    require_maintainer(user, "only maintainers invite")
    code = "inv_" + secrets.token_urlsafe(18)
    inv = Invite(code_hash=token_hash(code), note=note, created_by_id=user.id,
                 expires_at=datetime.now(UTC) + timedelta(days=days))
    db.add(inv)
    db.flush()
    return inv, code


def allowed_scopes(user: User) -> list[str]:
    return list(SCOPES) if user.is_maintainer else ["read", "contribute"]


def create_token(db: Session, user: User, name: str, scopes: list[str] | None = None,
                 expires_days: int | None = None, holder: list[str] | None = None,
                 settings=None) -> tuple[ApiToken, str]:
    """A new API token, expiring after `expires_days` days (None: the coordinator's token
    lifetime, ELMFOREST_TOKEN_TTL_DAYS, from `settings` or else this process's). `holder`: the
    scopes of the token asking for it, when a token asks (a token can only mint tokens with
    scopes it holds itself); None for a password login."""
    if expires_days is None:
        from coordinator.settings import get_settings

        expires_days = (settings or get_settings()).token_ttl_days
    allowed = allowed_scopes(user)
    if holder is not None:
        allowed = [s for s in allowed if s in holder]
    scopes = list(dict.fromkeys(scopes or allowed))
    bad = [s for s in scopes if s not in allowed]
    if bad:
        why = "the token you used holds" if holder is not None else f"a {user.role.value} may hold"
        raise Forbidden(f"cannot mint a token with scopes {bad}: {why} only {allowed}")
    secret = new_token()
    expires = datetime.now(UTC) + timedelta(days=expires_days)
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
    if t.last_used_at is None or (now - t.last_used_at).total_seconds() > 60:
        _used[t.id] = now  # written in batches, not in this request's transaction (a read stays a read)
        _flusher(db)
    return t.user, t


_used: dict[int, datetime] = {}  # token id -> last use, not yet written
_flush_lock = threading.Lock()
_flush_started = False


def _flusher(db: Session) -> None:
    """Start (once per process) the thread that writes tokens' last use every few seconds."""
    global _flush_started
    if _flush_started:
        return
    with _flush_lock:
        if _flush_started:
            return
        _flush_started = True
        url = db.get_bind().url.render_as_string(hide_password=False)
        threading.Thread(target=_flush_loop, args=(url,), name="elmforest-token-use", daemon=True).start()


def flush_token_use(url: str) -> int:
    """Write the last use of every token used since the last flush, in one short transaction."""
    from sqlalchemy import bindparam, update

    from coordinator.db import session_scope

    with _flush_lock:
        pending = dict(_used)
        _used.clear()
    if pending:
        try:
            with session_scope(url) as s:  # one statement for all of them
                s.connection().execute(
                    update(ApiToken.__table__).where(ApiToken.__table__.c.id == bindparam("tid"))
                    .values(last_used_at=bindparam("at")),
                    [{"tid": tid, "at": at} for tid, at in pending.items()])
        except Exception:
            with _flush_lock:  # keep them for the next round (newer uses win)
                for tid, at in pending.items():
                    _used.setdefault(tid, at)
            raise
    return len(pending)


def _flush_loop(url: str) -> None:
    import logging
    import time

    while True:
        time.sleep(5)
        try:
            flush_token_use(url)
        except Exception:  # the database is busy or away: the next round writes them
            logging.getLogger("elmforest").warning("could not record token use", exc_info=True)


def list_tokens(db: Session, user: User, of: str | None = None) -> list[ApiToken]:
    """`user`'s tokens, or (admins) those of the user named `of`."""
    owner = user
    if of is not None and of != user.username:
        if user.role != Role.admin:
            raise Forbidden("only admins list other users' tokens")
        owner = db.scalar(select(User).where(User.username == of))
        if owner is None:
            raise NotFound(f"no user {of!r}")
    return list(db.scalars(select(ApiToken).where(ApiToken.user_id == owner.id).order_by(ApiToken.id)))


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
        raise NotFound(f"no user {username!r} on this coordinator; create it with `elmforest user create {username}`")
    u.role = role
    return u
