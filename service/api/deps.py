"""Request dependencies: the service objects and bearer-token auth with scopes."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import SCOPES, Settings
from service.sweeps import SweepService

bearer = HTTPBearer(auto_error=False, description="An API token from CONVTUNE_API_TOKENS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> SweepService:
    return request.app.state.sweeps


@dataclass(frozen=True)
class Caller:
    """Who is calling: the owner name recorded on their sweeps, the names their older sweeps carry, scopes."""

    owner: str
    scopes: frozenset[str]
    aliases: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def owns(self, sweep) -> bool:
        return self.admin or sweep.owner in self.aliases


LOCAL = Caller("local", frozenset(SCOPES), frozenset({"local"}))
"""The one implicit owner while auth is off (loopback only): every sweep is theirs."""


def token_owner(settings: Settings, token: str) -> str:
    """A stable, non-secret name for a token (recorded as the sweep's owner): an HMAC keyed by the server
    secret, so it cannot be checked against guessed tokens."""
    return "token-" + hmac.new(settings.owner_secret(), token.encode(), hashlib.sha256).hexdigest()[:32]


def token_scopes(settings: Settings, authorization: str | None) -> frozenset[str] | None:
    """The scopes of the bearer token in an Authorization header value, or None when it holds no valid token."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    scopes = None
    for token, granted in settings.api_tokens.items():  # constant-time compare against every token
        if hmac.compare_digest(token.encode(), presented.strip().encode()):
            scopes = granted
    return scopes


def caller_for(settings: Settings, token: str, scopes: frozenset[str]) -> Caller:
    owner = settings.token_owners.get(token) or token_owner(settings, token)
    legacy = "token-" + hashlib.sha256(token.encode()).hexdigest()[:10]  # owner names before the HMAC
    return Caller(owner, scopes, frozenset({owner, token_owner(settings, token), legacy}))


def require(scope: str):
    """A dependency that admits requests whose token holds ``scope``; returns the :class:`Caller`."""

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        settings: Settings = request.app.state.settings
        if not settings.auth_enabled:
            return LOCAL
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token: send "
                                "'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
        scopes = token_scopes(settings, f"Bearer {credentials.credentials}")
        if scopes is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if scope not in scopes and "admin" not in scopes:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"this token lacks the '{scope}' scope (it has: {', '.join(sorted(scopes))})")
        return caller_for(settings, credentials.credentials, scopes)

    return check


read_access = require("read")
submit_access = require("submit")
