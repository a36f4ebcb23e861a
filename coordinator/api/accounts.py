from __future__ import annotations

from fastapi import APIRouter, Query, Request, status

from coordinator.api.deps import DB, Id, Maintainer, Reader, SettingsDep
from coordinator.schemas import (
    Error,
    InviteIn,
    InviteOut,
    LoginIn,
    NewToken,
    RegisterIn,
    TokenIn,
    TokenOut,
    UserOut,
)
from coordinator.services import users

router = APIRouter(tags=["accounts"], responses={400: {"model": Error}, 401: {"model": Error}, 422: {"model": Error},
                                                 429: {"model": Error}})


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/auth/register", status_code=status.HTTP_201_CREATED, response_model=NewToken,
             responses={409: {"model": Error}, 403: {"model": Error}})
def register(body: RegisterIn, request: Request, db: DB, settings: SettingsDep):
    """Create a contributor account and a first API token (if registration is open, or with an
    invitation code when it is invite-only; limited per address)."""
    u = users.register(db, settings, body.username, body.password, body.email, body.invite, _address(request))
    t, secret = users.create_token(db, u, "first token", settings=settings)
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(u))


@router.post("/auth/login", response_model=NewToken)
def login(body: LoginIn, request: Request, db: DB, settings: SettingsDep):
    """Exchange a username and password for a new API token (wrong passwords are limited per address)."""
    u = users.authenticate(db, body.username, body.password, _address(request), settings.failed_logins_per_hour)
    t, secret = users.create_token(db, u, body.token_name, settings=settings)
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(u))


@router.post("/invites", status_code=status.HTTP_201_CREATED, response_model=InviteOut,
             responses={403: {"model": Error}})
def create_invite(body: InviteIn, user: Maintainer, db: DB):
    """A one-use invitation to register (maintainers), for invite-only coordinators."""
    inv, code = users.invite(db, user, body.note, body.days)
    return InviteOut(code=code, expires_at=inv.expires_at)


@router.get("/me", response_model=UserOut)
async def me(user: Reader):  # async: nothing here waits (the token was resolved on a thread)
    return user


@router.get("/tokens", response_model=list[TokenOut], responses={403: {"model": Error}, 404: {"model": Error}})
def list_tokens(user: Reader, db: DB, username: str | None = Query(default=None, max_length=64,
                description="Another user's tokens (admins).")):
    """Your tokens (never their secrets); admins may list anyone's."""
    return users.list_tokens(db, user, username)


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=NewToken,
             responses={403: {"model": Error}})
def create_token(body: TokenIn, request: Request, user: Reader, db: DB, settings: SettingsDep):
    """A new token with at most the scopes of the token making this call."""
    t, secret = users.create_token(db, user, body.name, body.scopes, body.expires_days,
                                   holder=sorted(request.state.scopes), settings=settings)
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(user))


@router.delete("/tokens/{token_id}", response_model=TokenOut, responses={404: {"model": Error}})
def revoke_token(token_id: Id, user: Reader, db: DB):
    """Revoke one of your tokens (admins: anyone's)."""
    return users.revoke_token(db, user, token_id)
