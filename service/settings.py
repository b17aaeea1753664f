"""Service settings, read once from the environment (prefix ``CONVTUNE_``) and an optional ``.env``.

Defaults point at the local stack that ``convtune up`` starts: everything under one data folder,
Ray's Jobs API on 8265, MLflow on 5000, the API on 8000, bound to loopback without tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SCOPES = ("read", "submit", "admin")
"""``read``: every GET of the caller's own sweeps; ``submit``: submit, validate, cancel and resume them;
``admin``: every sweep, whoever owns it."""
OWNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_data_dir() -> Path:
    return Path("~/.convtune").expanduser()


def _split_list(value):
    if isinstance(value, str):
        return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
    return value


MIN_TOKEN_LENGTH = 32


def _split_scopes(entry: str) -> tuple[str, frozenset[str]]:
    """``token:read+submit`` (or the older ``token=read+submit``) -> (token, scopes). A suffix counts as scopes
    only when it names scopes, so a base64 token keeps its trailing ``=`` padding; a bare token has every scope."""
    for sep in (":", "="):
        token, found, suffix = entry.rpartition(sep)
        if not found or not token:
            continue
        names = suffix.split("+")
        if suffix and all(n.isalpha() for n in names):
            unknown = sorted(set(names) - set(SCOPES))
            if unknown:
                raise ValueError(f"unknown scope(s) {unknown} for an API token; valid scopes: {list(SCOPES)}")
            return token, frozenset(names)
    return entry, frozenset(SCOPES)


def split_owner(entry: str) -> tuple[str | None, str]:
    """``alice@token:scopes`` -> ("alice", "token:scopes"); no ``@``: (None, entry) (tokens never hold ``@``)."""
    owner, found, rest = entry.partition("@")
    if not found:
        return None, entry
    if not OWNER_NAME.match(owner):
        raise ValueError(f"CONVTUNE_API_TOKENS: owner name {owner!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return owner, rest


def parse_token_owners(value) -> dict[str, str]:
    """The owner named for each token (``alice@token:scopes``); tokens without a name are absent."""
    if not isinstance(value, str):
        return {}
    owners = {}
    for entry in _split_list(value) or []:
        owner, rest = split_owner(entry)
        if owner:
            owners[_split_scopes(rest)[0]] = owner
    return owners


def parse_api_tokens(value) -> dict[str, frozenset[str]]:
    """``"alice@tok1:read+submit,tok2:read,tok3"`` -> {token: scopes}; a bare token gets every scope
    (``admin`` included, as before owners existed)."""
    if isinstance(value, dict):
        pairs = [(str(k), frozenset(v)) for k, v in value.items()]
    else:
        pairs = [_split_scopes(split_owner(entry)[1]) for entry in _split_list(value) or []]
    for token, _ in pairs:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"CONVTUNE_API_TOKENS: every token needs at least {MIN_TOKEN_LENGTH} characters (one "
                             f"has {len(token)}); make one with `python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'`")
    return dict(pairs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the API process needs; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="CONVTUNE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir,
                           description="Folder for the local stack's state (DB, MLflow store, Ray results).")
    ray_address: str = Field("http://127.0.0.1:8265", description="Ray Jobs API (dashboard) URL.")
    ray_auth_token: SecretStr | None = Field(
        None, description="Token for a Ray cluster with token auth on; unset means RAY_AUTH_MODE=disabled.")
    ray_public_url: str | None = Field(None, description="Ray dashboard URL for links (default: ray_address).")
    mlflow_tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking server URI.")
    mlflow_public_url: str | None = Field(None, description="MLflow UI URL for links (default: tracking URI).")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/convtune.db.")
    storage_path: str | None = Field(
        None, description="Ray Tune storage (shared by all Ray nodes); default <data_dir>/ray_results.")
    api_tokens: Annotated[dict[str, frozenset[str]], NoDecode] = Field(
        default_factory=dict, description=f"Bearer tokens of at least {MIN_TOKEN_LENGTH} characters: "
        "'tok:read+submit,tok2:read'; a bare token has every scope.")
    token_owners: dict[str, str] = Field(default_factory=dict, exclude=True, description=(
        "Owner name of each token, from the 'alice@token:scopes' form of CONVTUNE_API_TOKENS."))
    secret_key: SecretStr | None = Field(None, description=(
        "Server secret keying the HMACs of owner names (Ray job metadata) and Idempotency-Keys; default: a "
        "random key kept in <data_dir>/secret_key. Set it when several API processes share a database."))
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders specs may read data from; default <data_dir>/data.")
    host: str = Field("127.0.0.1", description="Bind address of the API.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the API.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Largest accepted request body.")
    job_python: str = Field(sys.executable, description="Interpreter that runs the sweep driver on the Ray head.")
    job_stop_wait_s: int = Field(60, ge=1, description="Grace period for a cancelled driver before SIGKILL.")
    reconcile_interval_s: float = Field(5.0, gt=0, description=(
        "How often active sweeps are synced with Ray and MLflow (status, trials, events)."))
    events_poll_s: float = Field(0.5, gt=0, le=60, description="How often an event stream looks for new events.")
    events_heartbeat_s: float = Field(5.0, gt=0, le=300, description=(
        "An event stream sends a comment line after this many seconds without events (keeps proxies open)."))
    max_trials: int = Field(1000, ge=1, le=100_000, description=(
        "Most trials one sweep may run, for every search algorithm (num_samples x grid size)."))
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Host names the API answers to (DNS-rebinding guard; '*.example.com' wildcards). Default: the "
        "loopback names while auth is off, any host once tokens are set."))
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Browser origins (scheme://host:port) allowed to send state-changing requests besides the API's own."))

    @model_validator(mode="before")
    @classmethod
    def _owners_from_tokens(cls, data):
        if isinstance(data, dict) and isinstance(data.get("api_tokens"), str):
            data = {**data, "token_owners": parse_token_owners(data["api_tokens"])}
        return data

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens(cls, value):
        return parse_api_tokens(value)

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @field_validator("data_roots", mode="before")
    @classmethod
    def _roots(cls, value):
        return _split_list(value)

    @model_validator(mode="after")
    def _fill_defaults(self):
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'convtune.db'}"
        if self.storage_path is None:
            self.storage_path = str(self.data_dir / "ray_results")
        if not self.data_roots:
            self.data_roots = [self.data_dir / "data"]
        self.data_roots = [Path(p).expanduser().resolve() for p in self.data_roots]
        self.ray_address = self.ray_address.rstrip("/")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens)

    def owner_secret(self) -> bytes:
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it first: read theirs
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()

    def owner_tag(self, owner: str | None) -> str:
        """An owner name as other systems see it (Ray job metadata): an HMAC, not the name or a bare hash."""
        return hmac.new(self.owner_secret(), (owner or "").encode(), hashlib.sha256).hexdigest()[:32]

    @property
    def trusted_hosts(self) -> list[str]:
        if self.allowed_hosts:
            return self.allowed_hosts
        if self.auth_enabled:
            return ["*"]
        names = ["127.0.0.1", "localhost", "::1", "[::1]"]
        return names if self.host in names or self.host in ("0.0.0.0", "::") else [*names, self.host]

    @property
    def ray_url(self) -> str:
        return (self.ray_public_url or self.ray_address).rstrip("/")

    @property
    def mlflow_url(self) -> str:
        return (self.mlflow_public_url or self.mlflow_tracking_uri).rstrip("/")

    def check_bind(self) -> None:
        """Refuse to serve beyond loopback without tokens: the API would be open to the network."""
        if not is_loopback(self.host) and not self.auth_enabled:
            raise ValueError(
                f"CONVTUNE_HOST={self.host} exposes the API beyond loopback: set CONVTUNE_API_TOKENS "
                "(e.g. 'a-long-secret=read+submit') or bind to 127.0.0.1")


@lru_cache
def get_settings() -> Settings:
    return Settings()
