"""The coordinator's tables (SQLAlchemy 2). Alembic owns the schema: see migrations/."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp that always comes back with its offset: SQLite keeps no time zone, so
    values read from it are naive; they were written in UTC, and say so again here."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


# Python None is stored as SQL NULL (not JSON null), so "IS NULL" finds what the code set to None
JSON_ = JSON(none_as_null=True)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON_, list[Any]: JSON_}


def _enum(e: type[enum.Enum], name: str) -> Enum:
    # stored as plain strings (no native enum types): adding a state is a code change only
    return Enum(e, name=name, native_enum=False, length=32, values_callable=lambda x: [m.value for m in x])


class Role(enum.StrEnum):
    contributor = "contributor"
    maintainer = "maintainer"
    admin = "admin"


class DomainRole(enum.StrEnum):
    train = "train"
    eval = "eval"


class DomainStatus(enum.StrEnum):
    active = "active"
    retired = "retired"


class BranchStatus(enum.StrEnum):
    requested = "requested"
    ready = "ready"
    failed = "failed"


class State(enum.StrEnum):
    """A contribution's lifecycle (every transition is logged in contribution_events)."""

    uploading = "uploading"  # created; the client is uploading the weights it trained
    uploaded = "uploaded"  # the bytes arrived whole, sha256 as declared
    validating = "validating"
    validated = "validated"
    rejected = "rejected"  # failed validation or evaluation; final
    evaluated = "evaluated"  # beats its branch init; waiting for a maintainer
    approved = "approved"
    declined = "declined"  # by a maintainer; final
    merged = "merged"  # in a published forest version
    removed = "removed"  # forgotten by a later version
    abandoned = "abandoned"  # withdrawn by its owner, or its upload was never finished; final


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"), default=Role.contributor)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def is_maintainer(self) -> bool:
        """A maintainer or an admin: the roles that review, publish and see everyone's work."""
        return self.role in (Role.maintainer, Role.admin)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to the user to tell tokens apart
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the secret
    scopes: Mapped[list[Any]] = mapped_column(JSON_, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    user: Mapped[User] = relationship()

    @property
    def owner(self) -> str:
        return self.user.username


class Artifact(Base):
    """A content-addressed blob in the object store."""

    __tablename__ = "artifacts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))  # weights, config, tokenizer, sample, eval-data, manifest, ...
    origin: Mapped[str | None] = mapped_column(String(200))  # what it is, e.g. "branch init 4 of demo v2"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Upload(Base):
    """One user's (multipart) upload. Open while its parts arrive; once complete, its bytes are
    what that user (and nobody else) may refer to by sha256. Contribution weights stay under the
    upload's own key until validation accepts them; other files become content-addressed blobs."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    part_size: Mapped[int] = mapped_column(BigInteger)
    backend_upload_id: Mapped[str] = mapped_column(String(1024))
    key: Mapped[str] = mapped_column(String(512))
    # open (parts arriving) -> stored (contribution weights awaiting validation) -> complete (kept);
    # an upload refused, expired or aborted is deleted, row and bytes
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Domain(Base):
    __tablename__ = "domains"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    category: Mapped[str] = mapped_column(String(64), default="")
    provenance: Mapped[str] = mapped_column(Text, default="")
    license: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[DomainRole] = mapped_column(_enum(DomainRole, "domain_role"), default=DomainRole.train)
    status: Mapped[DomainStatus] = mapped_column(_enum(DomainStatus, "domain_status"), default=DomainStatus.active)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    eval_data_sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256"))
    eval_data_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_by: Mapped[User | None] = relationship()


class Forest(Base):
    __tablename__ = "forests"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    family: Mapped[str] = mapped_column(String(32))  # btm family id of the seed
    config: Mapped[dict[str, Any]] = mapped_column(JSON_)  # the seed's config.json
    tokenizer_sha256: Mapped[str] = mapped_column(String(64))
    seed_files: Mapped[dict[str, Any]] = mapped_column(JSON_)  # {filename: sha256}
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    current_version: Mapped[int] = mapped_column(Integer, default=1)


class Baseline(Base):
    """A model the leaderboard compares the forest against (e.g. the compute-matched dense LM)."""

    __tablename__ = "baselines"
    __table_args__ = (UniqueConstraint("forest_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    forest_id: Mapped[int] = mapped_column(ForeignKey("forests.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    files: Mapped[dict[str, Any]] = mapped_column(JSON_)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ForestVersion(Base):
    """An immutable published manifest; `current_version` on the forest points at one."""

    __tablename__ = "forest_versions"
    __table_args__ = (UniqueConstraint("forest_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    forest_id: Mapped[int] = mapped_column(ForeignKey("forests.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    # loaded when used: a manifest of a thousand ELMs is large and most queries only need the number
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON_, deferred=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text, default="")
    publish_key: Mapped[str | None] = mapped_column(String(128), unique=True)  # makes a retried publish a no-op
    evaluated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # its leaderboard's last evaluation
    valued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # its ELMs' values' last computation
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    forest: Mapped[Forest] = relationship()


class VersionMember(Base):
    """Which contributions a version holds (the queryable half of its manifest)."""

    __tablename__ = "version_members"
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"), primary_key=True)
    contribution_id: Mapped[int] = mapped_column(ForeignKey("contributions.id", ondelete="CASCADE"), primary_key=True)


class BranchInit(Base):
    __tablename__ = "branch_inits"
    __table_args__ = (Index("ix_branch_cache", "version_id", "method", "sample_sha256", "weights_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    forest_id: Mapped[int] = mapped_column(ForeignKey("forests.id", ondelete="CASCADE"))
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"), index=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    requested_by_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(16))  # posterior, argmax, uniform, seed
    sample_sha256: Mapped[str | None] = mapped_column(String(64))
    weights_key: Mapped[str | None] = mapped_column(String(64))  # hash of a privately computed posterior
    posterior: Mapped[dict[str, Any] | None] = mapped_column(JSON_)  # {elm name: weight}
    parents: Mapped[list[Any] | None] = mapped_column(JSON_)  # [{"name", "contribution_id", "weight"}]
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON_)  # {filename: sha256}
    status: Mapped[BranchStatus] = mapped_column(_enum(BranchStatus, "branch_status"), default=BranchStatus.requested)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    forest: Mapped[Forest] = relationship()
    version: Mapped[ForestVersion] = relationship()
    domain: Mapped[Domain] = relationship()


class Contribution(Base):
    __tablename__ = "contributions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    forest_id: Mapped[int] = mapped_column(ForeignKey("forests.id", ondelete="CASCADE"), index=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"), index=True)
    # None for a checkpoint a maintainer imported; `source` says where it came from
    branch_init_id: Mapped[int | None] = mapped_column(ForeignKey("branch_inits.id", ondelete="CASCADE"))
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    state: Mapped[State] = mapped_column(_enum(State, "contribution_state"), default=State.uploading, index=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_size: Mapped[int] = mapped_column(BigInteger)
    upload_id: Mapped[str | None] = mapped_column(ForeignKey("uploads.id", ondelete="SET NULL"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON_)
    tokenizer_sha256: Mapped[str] = mapped_column(String(64))
    training: Mapped[dict[str, Any]] = mapped_column(JSON_, default=dict)
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON_)  # the assembled ELM directory {filename: sha256}
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    # the forest seed's mean last hidden state over the domain's text (btm.routing): sent by a
    # contributor who trained privately, else computed by the coordinator when it evaluates
    routing_vector: Mapped[list[Any] | None] = mapped_column(JSON_)
    round_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    owner: Mapped[User] = relationship()
    forest: Mapped[Forest] = relationship()
    domain: Mapped[Domain] = relationship()
    branch_init: Mapped[BranchInit | None] = relationship()
    events: Mapped[list[ContributionEvent]] = relationship(order_by="ContributionEvent.id", back_populates="contribution")


class ContributionEvent(Base):
    """The audit log: every state change with who (None: the system), when and why."""

    __tablename__ = "contribution_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    contribution_id: Mapped[int] = mapped_column(ForeignKey("contributions.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    contribution: Mapped[Contribution] = relationship(back_populates="events")
    actor: Mapped[User | None] = relationship()


class Evaluation(Base):
    """One perplexity: subject (an ELM, the ensemble, an average, ...) x domain x method."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("version_id", "subject", "domain_id", "method", name="uq_evaluation"),
        Index("ix_eval_version_domain_ppl", "version_id", "domain_id", "perplexity"),
        Index("ix_eval_version_subject", "version_id", "subject"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    contribution_id: Mapped[int | None] = mapped_column(ForeignKey("contributions.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(String(128))  # ELM name, "ensemble", "ensemble/top2", "average/posterior", ...
    kind: Mapped[str] = mapped_column(String(16))  # elm, ensemble, average, init, model
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(32))
    perplexity: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    domain: Mapped[Domain] = relationship()


class SubjectSummary(Base):
    """Mean perplexity of each leaderboard subject over a version's train and eval domains,
    kept with the evaluations so the leaderboard sorts and pages in the database."""

    __tablename__ = "subject_summaries"
    __table_args__ = (
        UniqueConstraint("version_id", "subject"),
        Index("ix_summary_version_mean", "version_id", "mean_all"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(32))
    mean_train: Mapped[float | None] = mapped_column(Float)
    mean_eval: Mapped[float | None] = mapped_column(Float)
    mean_all: Mapped[float] = mapped_column(Float)
    domains: Mapped[int] = mapped_column(Integer)


class Posterior(Base):
    """The cached prior of a domain over a version's ELMs (the heatmap's rows)."""

    __tablename__ = "posteriors"
    __table_args__ = (UniqueConstraint("version_id", "domain_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    weights: Mapped[dict[str, Any]] = mapped_column(JSON_)  # {elm name: weight}
    domain: Mapped[Domain] = relationship()


class DomainValue(Base):
    """A version's forest on one domain, as its ELMs' values measure it (btm.value): the
    forest's and the seed's perplexity, v(all) = log ppl(seed) - log ppl(forest)."""

    __tablename__ = "domain_values"
    __table_args__ = (UniqueConstraint("version_id", "domain_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    forest_ppl: Mapped[float] = mapped_column(Float)
    seed_ppl: Mapped[float] = mapped_column(Float)
    improvement: Mapped[float] = mapped_column(Float)  # nats per token over the seed
    permutations: Mapped[int] = mapped_column(Integer)  # behind the Shapley estimates
    domain: Mapped[Domain] = relationship()


class ElmValue(Base):
    """One ELM's value to a version's forest on one domain: leave-one-out (the relative change
    of the forest's perplexity without it) and its Shapley value (nats per token) with the
    estimate's standard error."""

    __tablename__ = "elm_values"
    __table_args__ = (UniqueConstraint("version_id", "domain_id", "elm"),
                      Index("ix_elm_values_version_owner", "version_id", "owner"))
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    elm: Mapped[str] = mapped_column(String(64))
    contribution_id: Mapped[int | None] = mapped_column(Integer)  # from the manifest
    owner: Mapped[str | None] = mapped_column(String(64))  # its contributor's username, from the manifest
    loo: Mapped[float] = mapped_column(Float)
    without_ppl: Mapped[float] = mapped_column(Float)
    shapley: Mapped[float] = mapped_column(Float)
    shapley_se: Mapped[float | None] = mapped_column(Float)
    domain: Mapped[Domain] = relationship()


class AveragedModel(Base):
    __tablename__ = "averaged_models"
    __table_args__ = (UniqueConstraint("version_id", "method", "target"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(64), default="")  # domain name ("" for uniform)
    weights: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    status: Mapped[BranchStatus] = mapped_column(_enum(BranchStatus, "average_status"), default=BranchStatus.requested)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    version: Mapped[ForestVersion] = relationship()


class MoeExport(Base):
    """A published version as one native mixture-of-experts model (btm.moe), or a router tuning
    of one (`parent_id`, `tuning`); cached per (version, options)."""

    __tablename__ = "moe_exports"
    __table_args__ = (UniqueConstraint("version_id", "options_key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("forest_versions.id", ondelete="CASCADE"))
    options_key: Mapped[str] = mapped_column(String(128))  # what it was built with, e.g. "k2:posterior:python"
    experts_per_token: Mapped[int] = mapped_column(Integer)
    backbone: Mapped[str] = mapped_column(String(16))  # uniform | posterior | seed
    target: Mapped[str] = mapped_column(String(64), default="")  # the posterior backbone's domain ("" otherwise)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("moe_exports.id", ondelete="CASCADE"))
    tuning: Mapped[dict[str, Any] | None] = mapped_column(JSON_)  # steps, what (router | all), batch, lr
    samples: Mapped[dict[str, Any] | None] = mapped_column(JSON_)  # {elm: {domain, text, sha256}}: router text
    recipe: Mapped[str | None] = mapped_column(Text)
    files: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    status: Mapped[BranchStatus] = mapped_column(_enum(BranchStatus, "moe_status"), default=BranchStatus.requested)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    version: Mapped[ForestVersion] = relationship()
    parent: Mapped[MoeExport | None] = relationship(remote_side="MoeExport.id")


class Job(Base):
    """A unit of asynchronous work. The row, not the broker, is the truth about a job."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"), UniqueConstraint("kind", "key", name="uq_job_key"))
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(128))  # what it works on, e.g. "contribution:12"
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.queued)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON_, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # who asked for it (its owner may read it; maintainers read every job)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # the process running it (host:boot:pid:start), so a dead runner is recognised at once on its host
    runner: Mapped[str | None] = mapped_column(String(128))
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # last handed to the broker


class RateEvent(Base):
    """One counted action (a registration, a failed login) for per-address limits that hold
    across API processes."""

    __tablename__ = "rate_events"
    __table_args__ = (Index("ix_rate_bucket_at", "bucket", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    bucket: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Invite(Base):
    """A one-use invitation to register, for coordinators whose registration is invite-only."""

    __tablename__ = "invites"
    id: Mapped[int] = mapped_column(primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the code
    note: Mapped[str] = mapped_column(String(200), default="")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RoundStatus(enum.StrEnum):
    """A federated BTM round (see coordinator/federated and docs/federated.md)."""

    pending = "pending"  # created by a maintainer; no ServerApp has picked it up yet
    running = "running"
    succeeded = "succeeded"  # every node asked to train uploaded its ELM
    partial = "partial"  # some did, some failed or timed out (their domains are retried next round)
    failed = "failed"  # none did, or the round itself broke
    empty = "empty"  # no node had work to do
    cancelled = "cancelled"


class Round(Base):
    """One synchronous BTM round over a group of Flower nodes: each node branches from the
    forest's current version, trains an ELM on its own domain and uploads it as an ordinary
    contribution of the node's owner. Per-node progress is in round_nodes."""

    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(primary_key=True)
    forest_id: Mapped[int] = mapped_column(ForeignKey("forests.id", ondelete="CASCADE"), index=True)
    version: Mapped[int | None] = mapped_column(Integer)  # the forest version the inits branch from
    status: Mapped[RoundStatus] = mapped_column(_enum(RoundStatus, "round_status"), default=RoundStatus.pending, index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON_, default=dict)  # timeouts, training settings
    note: Mapped[str] = mapped_column(Text, default="")
    flower_run_id: Mapped[str | None] = mapped_column(String(32))  # Flower run ids are uint64
    error: Mapped[str | None] = mapped_column(Text)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    forest: Mapped[Forest] = relationship()
    created_by: Mapped[User | None] = relationship()
    nodes: Mapped[list[RoundNode]] = relationship(order_by="RoundNode.id", back_populates="round",
                                                  cascade="all, delete-orphan")


class RoundNode(Base):
    """One Flower node's part in a round: what it reported, what it was asked, how it went."""

    __tablename__ = "round_nodes"
    __table_args__ = (UniqueConstraint("round_id", "node_id"), Index("ix_round_nodes_domain", "domain"))
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    node_id: Mapped[str] = mapped_column(String(32))
    domain: Mapped[str | None] = mapped_column(String(64))
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # queried, skipped, branching, training, submitted, failed, timed_out
    status: Mapped[str] = mapped_column(String(16), default="queried")
    reason: Mapped[str] = mapped_column(Text, default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # 1 + earlier failed attempts at this domain
    documents: Mapped[int | None] = mapped_column(BigInteger)
    data_bytes: Mapped[int | None] = mapped_column(BigInteger)
    branch_init_id: Mapped[int | None] = mapped_column(ForeignKey("branch_inits.id", ondelete="SET NULL"))
    contribution_id: Mapped[int | None] = mapped_column(ForeignKey("contributions.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON_)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    round: Mapped[Round] = relationship(back_populates="nodes")
    owner: Mapped[User | None] = relationship()
    contribution: Mapped[Contribution | None] = relationship()
