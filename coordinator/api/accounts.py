from __future__ import annotations

from fastapi import APIRouter, status

from coordinator.api.deps import DB, Id, Reader, SettingsDep
from coordinator.errors import Forbidden
from coordinator.schemas import Error, LoginIn, NewToken, RegisterIn, TokenIn, TokenOut, UserOut
from coordinator.services import users

router = APIRouter(tags=["accounts"], responses={400: {"model": Error}, 401: {"model": Error}, 422: {"model": Error}})


@router.post("/auth/register", status_code=status.HTTP_201_CREATED, response_model=NewToken,
             responses={409: {"model": Error}, 403: {"model": Error}})
def register(body: RegisterIn, db: DB, settings: SettingsDep):
    """Create a contributor account and a first API token."""
    if not settings.registration_open:
        raise Forbidden("registration is closed on this coordinator; ask a maintainer for an account")
    u = users.create_user(db, body.username, body.password, email=body.email)
    t, secret = users.create_token(db, u, "first token")
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(u))


@router.post("/auth/login", response_model=NewToken)
def login(body: LoginIn, db: DB):
    """Exchange a username and password for a new API token."""
    u = users.authenticate(db, body.username, body.password)
    t, secret = users.create_token(db, u, body.token_name)
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(u))


@router.get("/me", response_model=UserOut)
def me(user: Reader):
    return user


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(user: Reader, db: DB):
    return users.list_tokens(db, user)


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=NewToken,
             responses={403: {"model": Error}})
def create_token(body: TokenIn, user: Reader, db: DB):
    t, secret = users.create_token(db, user, body.name, body.scopes, body.expires_days)
    return NewToken(token=secret, info=TokenOut.model_validate(t), user=UserOut.model_validate(user))


@router.delete("/tokens/{token_id}", response_model=TokenOut, responses={404: {"model": Error}})
def revoke_token(token_id: Id, user: Reader, db: DB):
    return users.revoke_token(db, user, token_id)
