"""Request and response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from btm.round_config import RoundConfig
from coordinator.names import USERNAME_PATTERN

DbId = Annotated[int, Field(ge=1, le=2**31 - 1)]


class Orm(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorBody(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    error: ErrorBody


# ---- accounts

class RegisterIn(BaseModel):
    username: str = Field(min_length=2, max_length=64, pattern=USERNAME_PATTERN)
    password: str = Field(min_length=8, max_length=256)
    email: str | None = Field(default=None, max_length=254, pattern=r"^[^@\s]{1,64}@[^@\s]{1,189}$")
    invite: str | None = Field(default=None, max_length=100, description="An invitation code (invite-only registration).")


class InviteIn(BaseModel):
    note: str = Field(default="", max_length=200, description="Who it is for (kept with it).")
    days: int = Field(default=7, ge=1, le=90, description="Days until it expires.")


class InviteOut(BaseModel):
    code: str = Field(description="The code; shown once. The new user passes it to `elmforest login --register`.")
    expires_at: datetime


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)
    token_name: str = Field(default="cli", max_length=100)


class UserOut(Orm):
    id: int
    username: str
    role: str
    created_at: datetime


class TokenIn(BaseModel):
    name: str = Field(default="token", max_length=100)
    scopes: list[Literal["read", "contribute", "maintain"]] | None = None
    expires_days: int | None = Field(default=None, ge=1, le=3650, description="Days until it expires; default: "
                                     "the coordinator's token lifetime (ELMFOREST_TOKEN_TTL_DAYS).")


class TokenOut(Orm):
    id: int
    owner: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class NewToken(BaseModel):
    token: str = Field(description="The secret; shown once, store it now.")
    info: TokenOut
    user: UserOut


# ---- domains

class DomainIn(BaseModel):
    name: str = Field(min_length=2, max_length=64)
    description: str = Field(default="", max_length=10_000)
    category: str = Field(default="", max_length=64)
    provenance: str = Field(default="", max_length=10_000)
    license: str = Field(default="", max_length=128)
    role: Literal["train", "eval"] = "train"


class DomainPatch(BaseModel):
    role: Literal["train", "eval"] | None = None
    status: Literal["active", "retired"] | None = None
    description: str | None = Field(default=None, max_length=10_000)


class EvalDataIn(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="An uploaded JSONL/text file of held-out documents.")


class DomainOut(Orm):
    name: str
    description: str
    category: str
    provenance: str
    license: str
    role: str
    status: str
    created_at: datetime
    eval_data_sha256: str | None
    eval_data_bytes: int | None


# ---- uploads

class UploadIn(BaseModel):
    purpose: Literal["weights", "sample", "eval-data", "model-file"]
    filename: str = Field(min_length=1, max_length=255)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=2**62)


class PartOut(BaseModel):
    part_number: int
    length: int
    url: str
    done: bool = False


class UploadOut(BaseModel):
    upload_id: str
    sha256: str
    size: int
    part_size: int
    status: str = Field(description="open (parts being sent), stored (weights awaiting validation), verified "
                        "(checked, being kept: complete it again after a crash) or complete; an upload that is "
                        "refused, expires or is aborted is deleted (404 after)")
    expires_at: datetime | None = None
    parts: list[PartOut] = Field(default=[], description="Each part's URL takes exactly `length` bytes.")
    parts_done: list[int] = []


class PartDone(BaseModel):
    part_number: int = Field(ge=1, le=10_000)
    etag: str | None = Field(default=None, max_length=200)


class CompleteIn(BaseModel):
    parts: list[PartDone] | None = Field(default=None, max_length=10_000, description="Optional: the server assembles "
                                         "parts 1..n itself and checks each one's length.")

    @field_validator("parts")
    @classmethod
    def _each_once(cls, v):
        if v is not None and len({p.part_number for p in v}) != len(v):
            raise ValueError("each part may be named once")
        return v


class UploadDone(Orm):
    upload_id: str = Field(validation_alias="id")
    purpose: str
    filename: str
    sha256: str
    size: int
    status: str


# ---- forests

class ForestIn(BaseModel):
    name: str = Field(min_length=2, max_length=64)
    description: str = Field(default="", max_length=10_000)
    files: dict[str, str] = Field(description="The seed's files: {filename: sha256 of an uploaded file}.")


class BaselineIn(BaseModel):
    name: str = Field(min_length=2, max_length=64)
    description: str = Field(default="", max_length=10_000)
    files: dict[str, str] = Field(description="The model's files: {filename: sha256 of an uploaded file}.")


class BaselineOut(Orm):
    name: str
    description: str
    files: dict[str, str]
    created_at: datetime


class ForestOut(Orm):
    name: str
    description: str
    family: str
    current_version: int
    created_at: datetime


class VersionOut(Orm):
    number: int
    manifest_sha256: str
    note: str
    created_at: datetime
    elms: int = 0


class PublishIn(BaseModel):
    add: list[DbId] | None = Field(default=None, description="Approved contributions to merge (default: all approved).")
    remove: list[DbId] = Field(default_factory=list, description="Contributions to forget.")
    note: str = Field(default="", max_length=10_000)


class RemoveIn(BaseModel):
    reason: str = Field(min_length=1, max_length=10_000)


class JobOut(Orm):
    id: int
    kind: str
    key: str
    status: str
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None


class DownloadOut(BaseModel):
    manifest: dict[str, Any]
    files: dict[str, str] = Field(description="path inside the forest directory -> download URL")


class AverageIn(BaseModel):
    method: Literal["posterior", "argmax", "uniform"] = "posterior"
    domain: str | None = Field(default=None, max_length=64)


class AverageOut(Orm):
    id: int
    method: str
    target: str
    status: str
    weights: dict[str, float] | None
    files: dict[str, str] | None
    error: str | None
    urls: dict[str, str] = {}
    job_id: int | None = None


class MoeIn(BaseModel):
    experts_per_token: int | None = Field(default=None, ge=1, le=1024, description="Experts each token runs "
                                          "(default 2, or every ELM when the version has fewer); at most the "
                                          "version's number of ELMs.")
    backbone: Literal["uniform", "posterior", "seed"] = Field(
        default="uniform", description="Every tensor but the MLPs: the uniform average of the ELMs, the posterior "
        "average for `domain`, or the seed's own.")
    domain: str | None = Field(default=None, max_length=64, description="The target domain of the posterior backbone.")


class MoeTuneIn(BaseModel):
    steps: int = Field(default=100, ge=1, le=2**31 - 1, description="Training updates (at most the coordinator's "
                       "ELMFOREST_MOE_TUNE_MAX_STEPS).")
    whole: bool = Field(default=False, description="Train every tensor (as Branch-Train-MiX), not only the routers.")
    batch_size: int = Field(default=8, ge=1, le=4096)
    block_size: int = Field(default=128, ge=8, le=131_072, description="Tokens per sequence (at most the model's "
                            "context).")
    lr: float = Field(default=1e-3, gt=0, le=1)


class MoeOut(BaseModel):
    id: int
    forest: str
    version: int
    experts_per_token: int
    backbone: str
    target: str
    parent_id: int | None = Field(description="For a router tuning: the export it tuned.")
    tuning: dict[str, Any] | None
    samples: dict[str, str] = Field(default={}, description="ELM -> the text of its domain behind its router rows "
                                    "(and the tuning).")
    status: str
    error: str | None
    recipe: str | None
    files: dict[str, str] | None = Field(description="file name -> sha256")
    urls: dict[str, str] = {}
    job_id: int | None = None


class MoeListOut(BaseModel):
    forest: str
    version: int
    available: bool = Field(description="Whether this version can become an MoE model at all.")
    reason: str | None = Field(description="Why not, when it cannot (its family, no ELMs, no text of a domain).")
    exports: list[MoeOut]


class BoardDomain(BaseModel):
    name: str
    role: str


class BoardRow(BaseModel):
    subject: str = Field(description="An ELM's name, ensemble, ensemble/topK, average/METHOD, or another model")
    kind: str
    method: str
    mean_train: float | None
    mean_eval: float | None
    mean: float | None = Field(description="mean over the domains shown (all, train or eval)")
    ppl: dict[str, float] = Field(description="perplexity by domain")


class LeaderboardOut(BaseModel):
    forest: str
    version: int
    domains: list[BoardDomain]
    rows: list[BoardRow]
    total: int
    page: int
    per_page: int


# ---- branch inits and contributions

MAX_VECTOR = 65_536  # numbers in a routing vector: a seed's hidden size is far below this


def _bounded_vector(v):
    """A routing vector's length is checked before any of its items (a hostile list may be long)."""
    if isinstance(v, list | tuple) and len(v) > MAX_VECTOR:
        raise ValueError(f"{len(v)} numbers; a routing vector has the forest seed's hidden size (at most "
                         f"{MAX_VECTOR}): compute it with the forest's seed (`elmforest branch request --private`)")
    return v


RoutingVector = Annotated[list[float] | None, BeforeValidator(_bounded_vector), Field(
    default=None, description="The forest seed's mean last hidden state over the ELM's domain text (hidden-size "
    "finite numbers), for the centroid router; without it the coordinator computes one when it evaluates.")]

class BranchIn(BaseModel):
    forest: str = Field(min_length=1, max_length=64)
    domain: str = Field(min_length=1, max_length=64)
    method: Literal["posterior", "argmax", "uniform", "seed"] = "posterior"
    sample_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    posterior: dict[str, float] | None = Field(default=None, description="Weights computed privately, by ELM name.")


class BranchOut(Orm):
    id: int
    forest: str
    version: int
    domain: str
    method: str
    status: str
    posterior: dict[str, float] | None
    parents: list[dict[str, Any]] | None
    files: dict[str, str] | None
    error: str | None
    urls: dict[str, str] = {}
    job_id: int | None = None


class ContributionIn(BaseModel):
    forest: str = Field(min_length=1, max_length=64)
    branch_init_id: DbId
    forest_version: DbId | None = Field(default=None, description="The version the init came from (checked).")
    name: str | None = Field(default=None, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of model.safetensors")
    size: int = Field(gt=0, le=2**62)
    config: dict[str, Any]
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    training: dict[str, Any] = Field(default_factory=dict)
    routing_vector: RoutingVector = None


class ImportSource(BaseModel):
    """Where an imported checkpoint came from (recorded in the forest's manifest and lineage)."""

    hub: str | None = Field(default=None, max_length=200, pattern=r"^[\w.-]+/[\w.-]+$", description="A Hub id.")
    revision: str | None = Field(default=None, max_length=100)
    requested: str | None = Field(default=None, max_length=300)
    path: str | None = Field(default=None, max_length=500, description="A local directory it was read from.")
    files: dict[str, str] = Field(default_factory=dict, max_length=1000, description="file name -> sha256")


class ImportIn(BaseModel):
    domain: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of model.safetensors")
    size: int = Field(gt=0, le=2**62)
    config: dict[str, Any]
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source: ImportSource
    training: dict[str, Any] = Field(default_factory=dict)
    routing_vector: RoutingVector = None


class EventOut(Orm):
    from_state: str | None
    to_state: str
    actor: str | None
    reason: str
    at: datetime
    details: dict[str, Any] | None = None


class JobBrief(BaseModel):
    id: int
    kind: str
    status: str
    error: str | None


class ContributionOut(Orm):
    id: int
    name: str
    owner: str
    forest: str
    domain: str
    branch_init_id: DbId | None
    source: dict[str, Any] | None = Field(default=None, description="Where an imported checkpoint came from.")
    state: str
    weights_sha256: str
    weights_size: int
    training: dict[str, Any]
    validation: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    routing_vector: list[float] | None = Field(default=None, description="Its routing vector (in the view of one "
                                               "contribution, not in lists).")
    created_at: datetime
    updated_at: datetime
    files: dict[str, str] | None = Field(default=None, description="The ELM's files (name -> sha256), once "
                                         "validated and while kept.")
    job: JobBrief | None = Field(default=None, description="The latest job working on it (validation, evaluation).")
    history: list[EventOut] = []


class FilesOut(BaseModel):
    files: dict[str, str] = Field(description="file name -> sha256 (check what you download)")
    urls: dict[str, str] = Field(description="file name -> download URL")


class ContributionCreated(BaseModel):
    contribution: ContributionOut
    upload: UploadOut


class DecisionIn(BaseModel):
    reason: str = Field(default="", max_length=10_000)


class AbandonIn(BaseModel):
    reason: str = Field(default="", max_length=10_000)


# ---- federated rounds

class RoundIn(BaseModel):
    # a round to create; every setting's default is btm.round_config.RoundConfig's
    forest: str = Field(min_length=1, max_length=64)
    note: str = Field(default="", max_length=10_000)
    steps: int = Field(default=RoundConfig.steps, ge=1, le=10_000_000, description="Training updates per node.")
    batch_size: int = Field(default=RoundConfig.batch_size, ge=1, le=65_536)
    block_size: int = Field(default=RoundConfig.block_size, ge=8, le=131_072)
    lr: float = Field(default=RoundConfig.lr, gt=0, le=1)
    warmup: float = Field(default=RoundConfig.warmup, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16"] = RoundConfig.precision
    min_nodes: int = Field(default=RoundConfig.min_nodes, ge=1, le=100_000,
                           description="Start once this many nodes are connected...")
    node_wait_s: float = Field(default=RoundConfig.node_wait_s, ge=0, le=86_400,
                               description="...or after this long with at least one.")
    query_timeout_s: float = Field(default=RoundConfig.query_timeout_s, gt=0, le=86_400)
    branch_timeout_s: float = Field(default=RoundConfig.branch_timeout_s, gt=0, le=7 * 86_400)
    init_timeout_s: float = Field(default=RoundConfig.init_timeout_s, gt=0, le=7 * 86_400)
    train_timeout_s: float = Field(default=RoundConfig.train_timeout_s, gt=0, le=30 * 86_400,
                                   description="The round's time-out for training and uploading.")
    max_attempts: int = Field(default=RoundConfig.max_attempts, ge=1, le=100,
                              description="Rounds in a row a domain may fail before it is no longer asked.")


class RoundNodeOut(BaseModel):
    node_id: str
    domain: str | None
    owner: str | None
    status: str = Field(description="queried, skipped, branching, training, submitted, failed or timed_out")
    reason: str
    attempt: int
    documents: int | None
    data_bytes: int | None
    branch_init_id: int | None
    contribution_id: int | None
    contribution_state: str | None
    contribution_name: str | None
    late: bool = Field(description="The ELM arrived after the node's time-out.")
    metrics: dict[str, Any] | None
    updated_at: datetime


class RoundOut(BaseModel):
    id: int
    forest: str
    version: int | None
    status: str = Field(description="pending, running, succeeded, partial, failed, empty or cancelled")
    config: dict[str, Any]
    note: str
    flower_run_id: str | None
    error: str | None
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: dict[str, int]
    nodes: list[RoundNodeOut]
