"""What each contribution is worth (services/values): per ELM and domain, per contributor, and
what a pending contribution would change if merged."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from coordinator.api.deps import DB, Id, OptionalUser
from coordinator.caching import published
from coordinator.errors import Conflict, NotFound
from coordinator.schemas import Error
from coordinator.services import contributions, domains, forests, jobs, values

router = APIRouter(tags=["values"], responses={400: {"model": Error}, 401: {"model": Error}, 403: {"model": Error},
                                              404: {"model": Error}, 409: {"model": Error}, 422: {"model": Error}})


class ElmValueOut(BaseModel):
    elm: str
    owner: str | None = None
    contribution_id: int | None = None
    loo: float  # ppl(forest without the ELM) / ppl(forest) - 1
    without_ppl: float
    shapley: float  # nats per token; the ELMs' values on a domain sum to its improvement
    shapley_se: float | None = None


class DomainValuesOut(BaseModel):
    name: str
    role: str
    forest_ppl: float
    seed_ppl: float
    improvement: float  # log ppl(seed) - log ppl(forest), nats per token
    permutations: int
    elms: list[ElmValueOut]


class ValueSumOut(BaseModel):
    name: str  # the ELM, or the contributor
    elms: list[str]
    loo_mean: float
    shapley_mean: float
    loo: dict[str, float]  # per domain (summed over the ELMs)
    shapley: dict[str, float]


class VersionValuesOut(BaseModel):
    forest: str
    version: int
    permutations: int
    domains: list[DomainValuesOut]
    elms: list[ValueSumOut]


class WantedOut(BaseModel):
    domain: str
    role: str
    forest_ppl: float
    baseline: str
    baseline_ppl: float
    ratio: float
    behind: bool


class ContributorValuesOut(BaseModel):
    forest: str
    version: int
    contributors: list[ValueSumOut]
    wanted: list[WantedOut]


class MergeChangeOut(BaseModel):
    role: str | None = None
    before_ppl: float
    after_ppl: float
    change: float  # ppl(with) / ppl(without) - 1; < 0: the merge helps


class MergePreviewOut(BaseModel):
    contribution_id: int
    forest_version: int
    own_domain: str
    domains: dict[str, MergeChangeOut]


@router.get("/forests/{name}/versions/{number}/values", response_model=VersionValuesOut)
def version_values(request: Request, name: str, number: Id, db: DB):
    """Every ELM's value on every domain with held-out data: leave-one-out (the relative change of
    the forest's perplexity without it; > 0: it helps) and its Shapley value (nats per token, from
    `permutations` random orderings, with the standard error) for v(S) = log ppl(seed) - log
    ppl(ensemble of S); an ELM's means over the domains. 409 until the version is evaluated
    (the answer names the job to wait for)."""
    v = forests.version(db, forests.get(db, name), number)
    _published_values(request, db, v)
    return values.version_values(db, v, jobs.enqueue)


@router.get("/forests/{name}/versions/{number}/values/contributors", response_model=ContributorValuesOut)
def contributor_values(request: Request, name: str, number: Id, db: DB):
    """Per contributor, the sums of their ELMs' values (per domain and the mean over domains), and
    the wanted domains: where the forest is weakest against the dense baseline."""
    v = forests.version(db, forests.get(db, name), number)
    _published_values(request, db, v)
    return values.contributors(db, v, jobs.enqueue)


def _published_values(request: Request, db, v) -> None:
    """Values, once computed, change only with the version's next evaluation. (Until then the
    answer is a 409 that may queue their job: never cached, never a 304.)"""
    if v.evaluated_at is not None and v.valued_at is not None:
        published(request, "values", v.id, v.evaluated_at, v.valued_at, domains.stamp(db))


@router.get("/contributions/{cid}/merge-preview", response_model=MergePreviewOut)
def merge_preview(cid: Id, db: DB, user: OptionalUser):
    """What merging the contribution into its forest's current version would change on its own
    domain and every other: the forest's perplexity without and with it. Computed when the
    contribution is evaluated; its owner and maintainers see it before a decision."""
    c = contributions.get(db, user, cid)
    if not contributions.visible(c, user):
        raise NotFound(f"no contribution {cid} of yours")
    p = values.preview_of(c)
    if p is None:
        raise Conflict(f"contribution {cid} is {c.state.value}; its merge preview comes with its evaluation")
    if "error" in p:
        raise Conflict(f"the merge preview of contribution {cid} could not be computed: {p['error']}")
    return MergePreviewOut(contribution_id=c.id, **p)
