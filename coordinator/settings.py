"""Settings from the environment (prefix ELMFOREST_), with embedded defaults that need no
servers: a SQLite file, a local artifact directory and a broker-less job queue, all under
one data directory."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ELMFOREST_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path.home() / ".local" / "share" / "elmforest",
                           description="Everything the embedded defaults write: database, artifacts, queue.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    storage_url: str | None = Field(default=None, description="file:///dir or s3://bucket/prefix; default: data_dir/artifacts.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto); default: AWS.")
    s3_public_endpoint_url: str | None = Field(default=None, description="Endpoint named in presigned URLs, when clients reach S3 by another address.")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    broker_url: str | None = Field(default=None, description="Celery broker (redis://...); default: a broker-less local queue.")
    public_url: str = Field(default="http://127.0.0.1:8000", description="Where clients reach this API (for signed local URLs).")
    secret_key: str | None = Field(default=None, description="Signs session cookies and local URLs; default: generated into data_dir.")

    # who may create an account: anyone, holders of an invitation (`elmforest invite`), nobody
    registration: Literal["open", "invite", "closed"] = "open"
    registrations_per_hour: int = Field(default=10, description="Accounts one address may create per hour.")
    failed_logins_per_hour: int = Field(default=30, description="Wrong passwords one address may send per hour.")

    # limits: every byte a user can make the coordinator store is bounded
    max_upload_bytes: int = Field(default=4 * 1024**3, description="Largest weights file (contributions, seeds).")
    max_sample_bytes: int = 16 * 1024**2
    max_eval_data_bytes: int = 256 * 1024**2
    max_model_file_bytes: int = Field(default=64 * 1024**2, description="Largest config, tokenizer or README file.")
    upload_quota_bytes: int = Field(default=4 * 1024**3, description="Bytes one user may have in flight: unfinished "
                                    "uploads plus weights awaiting validation (maintainers are exempt).")
    uploads_per_hour: int = Field(default=200, description="Uploads one user may start per hour.")
    upload_ttl_hours: float = Field(default=24, description="An upload not completed in this time expires; a sweeper "
                                    "deletes its parts.")
    max_json_bytes: int = Field(default=1024**2, description="Largest request body of an API call (files go through "
                                "uploads, not JSON).")
    part_size: int = 64 * 1024**2
    max_concurrent_requests: int = Field(default=16, description="Requests one API process works on at once; one "
                                         "more gets 503 with Retry-After at once (or after overload_wait_seconds). "
                                         "At most the database pool's size less its background connections (24). "
                                         "/healthz and part uploads in flight are never refused.")
    overload_wait_seconds: float = Field(default=1.0, ge=0, description="How long a request past "
                                         "max_concurrent_requests may wait for a place before its 503 (0: none, "
                                         "the 503 comes at once). A short queue: a burst of requests that the "
                                         "process works through in well under this time is answered, not "
                                         "refused; a process still at capacity after it is overloaded.")
    requests_per_minute: int = Field(default=600, ge=0, description="Requests one client (an API token, else an "
                                     "address) may send a minute; past that 429 with Retry-After. Counted in Redis "
                                     "when the broker is Redis (across every process and replica), else in a file "
                                     "in data_dir (across the processes of this machine). 0: no limit. /healthz, "
                                     "/static and upload parts and signed downloads do not count.")
    trusted_proxies: str = Field(default="", description="Addresses or networks (comma-separated, e.g. "
                                 "\"172.28.0.10\" or \"10.0.0.0/8\"; \"*\" for any) of the reverse proxies in "
                                 "front of the API: a request from one of them counts as from the client its "
                                 "X-Forwarded-For names (and its scheme is X-Forwarded-Proto's), for per-address "
                                 "limits and logs. From any other address those headers are ignored. Empty (the "
                                 "default): no proxy is trusted.")
    api_threads: int = Field(default=16, description="Threads serving API requests in one process (about the "
                             "database pool's size: more would only wait for a connection).")
    url_ttl_seconds: int = 3600
    cache_max_age_seconds: int = Field(default=30, ge=0, description="How long browsers and shared caches may reuse "
                                       "a public read (forest versions, leaderboards, posteriors, download lists and "
                                       "their pages) before asking again with If-None-Match (answered 304 while it "
                                       "is unchanged).")
    response_cache_seconds: float = Field(default=1.0, ge=0, description="How long each API process answers a "
                                          "public read of published data from its own copy (no route, no database) "
                                          "before asking the route again: a change made through another process "
                                          "(a job, another replica) shows within this time, one made through this "
                                          "process at once. Less than cache_max_age_seconds, which lets any cache "
                                          "keep it longer. 0: no copy.")
    token_ttl_days: int = Field(default=365, ge=1, description="Days an API token lives when its maker names no "
                                "other lifetime (login, registration, `elmforest user create`, POST /tokens "
                                "without expires_days).")

    # evaluation
    eval_block_size: int = 256
    posterior_prior_blocks: int = Field(default=100, ge=1, description="Blocks at the start of a domain's held-out "
                                        "data behind its cached prior (the posterior's EMA); never scored.")
    eval_scored_blocks: int = Field(default=64, ge=1, description="At most this many blocks after the prior's are "
                                    "scored for perplexities (evaluation, leaderboard).")
    top_k: list[int] = [1, 2, 4]
    value_permutations: int = Field(default=200, ge=2, le=100_000, description="Random orderings of the ELMs "
                                    "behind each Shapley value (btm.value); the standard error is reported.")

    # mixture-of-experts exports (btm.moe): router tuning a maintainer starts on the coordinator
    moe_tune_max_steps: int = Field(default=2000, ge=1, description="Most training updates one router tuning may "
                                    "ask for (POST /forests/{name}/moe/{id}/tune).")
    moe_tune_max_batch_tokens: int = Field(default=65_536, ge=64, description="Most tokens one update of a router "
                                           "tuning may take (batch size x block size).")

    # jobs
    job_retries: int = 3
    job_lease_seconds: int = Field(default=60, description="A running job whose worker sent no heartbeat for this long is run again.")
    queue: str = Field(default="elmforest", description="The Celery queue name (one per deployment on a shared broker).")
    visibility_timeout: int = 3600
    embedded_worker: bool = Field(default=True, description="When no broker is set, `elmforest serve` starts a job "
                                  "worker as its child process (stopped with it, started again if it dies).")
    sweep_seconds: float = Field(default=15, description="How often dead jobs are run again and expired uploads deleted.")

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, v: str) -> str:
        import ipaddress

        items = [x.strip() for x in v.split(",") if x.strip()]
        for x in items:
            if x != "*":
                try:
                    ipaddress.ip_network(x, strict=False)
                except ValueError:
                    raise ValueError(f"{x!r} is not an IP address or network (ELMFOREST_TRUSTED_PROXIES)") from None
        return ",".join(items)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'coordinator.db'}"

    @property
    def artifacts_url(self) -> str:
        return self.storage_url or f"file://{self.data_dir / 'artifacts'}"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def celery_broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def work_dir(self) -> Path:
        """Scratch space for jobs (downloaded models, builds)."""
        return self.data_dir / "work"

    def signing_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        f = self.data_dir / "secret_key"
        if not f.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            f.write_text(secrets.token_urlsafe(48))
            f.chmod(0o600)
        return f.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()
