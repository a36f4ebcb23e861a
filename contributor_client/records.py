"""What the coordinator answers, as typed records: one dataclass per kind of answer, with the
fields its API documents (coordinator/schemas.py), built by `Coordinator` (api.py).

Each record keeps the JSON it was made from (`.raw`, what `--json` prints) and reads as that
JSON by key too (`x["state"]`, `x.get("job")`), so code written against the API's JSON keeps
working; new code uses the attributes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


class Record(Mapping):
    """A typed view of one JSON object of the API (a dataclass subclass names its fields)."""

    raw: dict

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """The record of `data` (a JSON object, or a record of this kind, returned as it is)."""
        if isinstance(data, cls):
            return data
        raw = dict(data.raw) if isinstance(data, Record) else dict(data)
        hints = _hints(cls)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "raw":
                continue
            if f.name in raw:
                kw[f.name] = _convert(hints[f.name], raw[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kw[f.name] = None  # an answer without it: None rather than a failure
        return cls(**kw, raw=raw)

    # read as the JSON it was made from
    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _convert(hint: Any, value: Any) -> Any:
    """`value` (JSON) as the annotated type: records, lists and dicts of records; the rest as is."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _convert(kinds[0], value) if len(kinds) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_json(value)
    if origin is list and args:
        return [_convert(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    return value


def record(cls: type[R]) -> type[R]:
    """A frozen dataclass record; its JSON goes last, out of its repr and comparisons."""
    cls.__annotations__["raw"] = "dict"
    cls.raw = field(default_factory=dict, repr=False, compare=False)
    return dataclass(frozen=True)(cls)


# ----------------------------------------------------------------------------- accounts


@record
class User(Record):
    id: int
    username: str
    role: str
    created_at: str


@record
class TokenInfo(Record):
    id: int
    owner: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


@record
class NewToken(Record):
    """A token just made (by a login, a registration or `create_token`): its secret, shown once."""

    token: str
    info: TokenInfo
    user: User


@record
class Invite(Record):
    code: str
    expires_at: str


# ----------------------------------------------------------------------------- domains, uploads


@record
class Domain(Record):
    name: str
    description: str
    category: str
    provenance: str
    license: str
    role: str
    status: str
    created_at: str
    eval_data_sha256: str | None
    eval_data_bytes: int | None


@record
class Uploaded(Record):
    """A finished upload: the file the coordinator now holds for its uploader, by sha256."""

    upload_id: str
    purpose: str
    filename: str
    sha256: str
    size: int
    status: str


# ----------------------------------------------------------------------------- forests


@record
class Forest(Record):
    name: str
    description: str
    family: str
    current_version: int
    created_at: str


@record
class Version(Record):
    number: int
    manifest_sha256: str
    note: str
    created_at: str
    elms: int = 0


@record
class Parent(Record):
    """An ELM an init was averaged from, with its weight."""

    name: str
    weight: float


@record
class ModelEntry(Record):
    """The seed or one ELM of a version's manifest: its directory in the forest and its files."""

    name: str
    path: str
    files: dict[str, str]
    domain: str | None = None
    parents: list[Parent] = field(default_factory=list)
    owner: str | None = None
    contribution_id: int | None = None
    routing_vector: list[float] | None = None


@record
class Manifest(Record):
    """A published version's manifest (a btm forest.json)."""

    name: str
    version: int
    family: str
    seed: ModelEntry
    elms: list[ModelEntry]


@record
class ForestFiles(Record):
    """A version's manifest and a download URL for each file (`files`: 'seed/config.json' -> URL)."""

    manifest: Manifest
    files: dict[str, str]


@record
class Files(Record):
    """A model's files (name -> sha256) and their download URLs (name -> URL)."""

    files: dict[str, str]
    urls: dict[str, str]


@record
class Baseline(Record):
    name: str
    description: str
    files: dict[str, str]
    created_at: str


@record
class BoardDomain(Record):
    name: str
    role: str


@record
class BoardRow(Record):
    subject: str
    kind: str
    method: str
    mean_train: float | None
    mean_eval: float | None
    mean: float | None
    ppl: dict[str, float]


@record
class Leaderboard(Record):
    forest: str
    version: int
    domains: list[BoardDomain]
    rows: list[BoardRow]
    total: int
    page: int
    per_page: int


@record
class Average(Record):
    """An averaged model of a version, built by a job (files and URLs once `status` is ready)."""

    id: int
    method: str
    target: str
    status: str
    weights: dict[str, float] | None
    files: dict[str, str] | None
    error: str | None
    urls: dict[str, str] = field(default_factory=dict)
    job_id: int | None = None


@record
class Moe(Record):
    """A version's mixture-of-experts export, or a router tuning of one (`parent_id`, `tuning`)."""

    id: int
    forest: str
    version: int
    experts_per_token: int
    backbone: str
    target: str
    parent_id: int | None
    tuning: dict[str, Any] | None
    status: str
    error: str | None
    recipe: str | None
    files: dict[str, str] | None
    samples: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    job_id: int | None = None


@record
class MoeList(Record):
    """A version's MoE exports and tunings, or why it cannot have one (`available`, `reason`)."""

    forest: str
    version: int
    available: bool
    reason: str | None
    exports: list[Moe]


# ----------------------------------------------------------------------------- branch inits, contributions, jobs


@record
class BranchInit(Record):
    """A branch init: the forest's ELMs averaged for a domain, computed by a job. On a private
    request `routing_vector` is the one this client computed from the contributor's text (it
    never left the machine); `download_init` keeps it in the init's card."""

    id: int
    forest: str
    version: int
    domain: str
    method: str
    status: str
    posterior: dict[str, float] | None
    parents: list[Parent] | None
    files: dict[str, str] | None
    error: str | None
    urls: dict[str, str] = field(default_factory=dict)
    job_id: int | None = None
    routing_vector: list[float] | None = None

    def with_routing_vector(self, vector: list[float]) -> BranchInit:
        return dataclasses.replace(self, routing_vector=vector, raw={**self.raw, "routing_vector": vector})


@record
class JobBrief(Record):
    id: int
    kind: str
    status: str
    error: str | None


@record
class Job(Record):
    id: int
    kind: str
    key: str
    status: str
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: str
    finished_at: str | None


@record
class Event(Record):
    """A move of a contribution from one state to another: who, when and why."""

    from_state: str | None
    to_state: str
    actor: str | None
    reason: str
    at: str
    details: dict[str, Any] | None = None


@record
class Contribution(Record):
    """A contribution (an ELM on its way into a forest): its state, its job, its history."""

    id: int
    name: str
    owner: str
    forest: str
    domain: str
    branch_init_id: int | None
    state: str
    weights_sha256: str
    weights_size: int
    training: dict[str, Any]
    validation: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    created_at: str
    updated_at: str
    source: dict[str, Any] | None = None
    routing_vector: list[float] | None = None
    files: dict[str, str] | None = None
    job: JobBrief | None = None
    history: list[Event] = field(default_factory=list)


# ----------------------------------------------------------------------------- values


@record
class ElmValue(Record):
    elm: str
    loo: float
    without_ppl: float
    shapley: float
    owner: str | None = None
    contribution_id: int | None = None
    shapley_se: float | None = None


@record
class DomainValues(Record):
    name: str
    role: str
    forest_ppl: float
    seed_ppl: float
    improvement: float
    permutations: int
    elms: list[ElmValue]


@record
class ValueSum(Record):
    """An ELM's (or a contributor's) values summed over domains, and their means."""

    name: str
    elms: list[str]
    loo_mean: float
    shapley_mean: float
    loo: dict[str, float]
    shapley: dict[str, float]


@record
class VersionValues(Record):
    forest: str
    version: int
    permutations: int
    domains: list[DomainValues]
    elms: list[ValueSum]


@record
class Wanted(Record):
    domain: str
    role: str
    forest_ppl: float
    baseline: str
    baseline_ppl: float
    ratio: float
    behind: bool


@record
class ContributorValues(Record):
    forest: str
    version: int
    contributors: list[ValueSum]
    wanted: list[Wanted]


@record
class MergeChange(Record):
    before_ppl: float
    after_ppl: float
    change: float
    role: str | None = None


@record
class MergePreview(Record):
    contribution_id: int
    forest_version: int
    own_domain: str
    domains: dict[str, MergeChange]


# ----------------------------------------------------------------------------- federated rounds


@record
class RoundNode(Record):
    node_id: str
    domain: str | None
    owner: str | None
    status: str
    reason: str
    attempt: int
    documents: int | None
    data_bytes: int | None
    branch_init_id: int | None
    contribution_id: int | None
    contribution_state: str | None
    contribution_name: str | None
    late: bool
    metrics: dict[str, Any] | None
    updated_at: str


@record
class Round(Record):
    id: int
    forest: str
    version: int | None
    status: str
    config: dict[str, Any]
    note: str
    flower_run_id: str | None
    error: str | None
    created_by: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    counts: dict[str, int]
    nodes: list[RoundNode]
