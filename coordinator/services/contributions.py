"""Contributions: an uploaded ELM's way from upload through validation and evaluation to a
maintainer's decision (the states and moves are in lifecycle.py). Validation treats the upload
as hostile and is an ordered list of named checks; evaluation requires the ELM to beat its
branch init on the domain's held-out data. Weights that are not accepted are deleted."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, selectinload

from btm.model_files import CARD, CONFIG, WEIGHTS_FILE, WEIGHTS_PREFIX
from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable, public
from coordinator.models import (
    Artifact,
    BranchInit,
    BranchStatus,
    Contribution,
    ContributionEvent,
    Evaluation,
    State,
    Upload,
    User,
)
from coordinator.names import ELM
from coordinator.services import domains as domains_svc
from coordinator.services import forests as forests_svc
from coordinator.services import uploads
from coordinator.services.lifecycle import DISCARDED, FINAL, PUBLIC, transition
from coordinator.services.users import require_maintainer
from coordinator.storage import Storage, blob_key

if TYPE_CHECKING:
    import torch

log = logging.getLogger("elmforest.contributions")


def visible(c: Contribution, user: User | None) -> bool:
    return user is not None and (c.owner_id == user.id or user.is_maintainer)


def get(db: Session, user: User | None, cid: int) -> Contribution:
    # with what its answer names (owner, forest, domain, history and who made it): two queries, not one per event
    c = db.get(Contribution, cid, options=[joinedload(Contribution.owner), joinedload(Contribution.forest),
                                           joinedload(Contribution.domain),
                                           selectinload(Contribution.events).joinedload(ContributionEvent.actor)])
    if c is None or not (visible(c, user) or c.state in PUBLIC):
        raise NotFound(f"no contribution {cid} visible to you")
    return c


def list_(db: Session, user: User | None, state: State | str | None = None, mine: bool = False, forest: str | None = None,
          limit: int = 200) -> list[Contribution]:
    q = select(Contribution).order_by(Contribution.id.desc()).limit(limit)
    if state:
        q = q.where(Contribution.state == State(state))
    if forest:
        q = q.where(Contribution.forest_id == forests_svc.get(db, forest).id)
    if mine and user is not None:
        q = q.where(Contribution.owner_id == user.id)
    elif user is None or not user.is_maintainer:
        # others' contributions are public once merged; your own are always visible
        cond = Contribution.state.in_(PUBLIC)
        if user is not None:
            cond = cond | (Contribution.owner_id == user.id)
        q = q.where(cond)
    return list(db.scalars(q))


def create(db: Session, storage: Storage, settings, user: User, forest: str, branch_init_id: int, sha256: str,
           size: int, config: dict, tokenizer_sha256: str, name: str | None = None, training: dict | None = None,
           forest_version: int | None = None, routing_vector: list[float] | None = None) -> tuple[Contribution, dict]:
    """Declare an ELM trained from a branch init and get the URLs to upload its weights.
    `routing_vector`: computed by the contributor (who trained privately), else None."""
    f = forests_svc.get(db, forest)
    b = db.get(BranchInit, branch_init_id)
    if b is None or (b.requested_by_id != user.id and not user.is_maintainer):
        raise NotFound(f"no branch init {branch_init_id} of yours; request one first (`elmforest branch request`)")
    if b.forest_id != f.id:
        raise BadRequest(f"branch init {branch_init_id} belongs to forest {b.forest.name!r}, not {forest!r}; "
                         f"train from an init of {forest!r}")
    if forest_version is not None and forest_version != b.version.number:
        raise BadRequest(f"branch init {branch_init_id} was made from {f.name} v{b.version.number}, "
                         f"not v{forest_version}; submit the ELM trained from the init you were given")
    if b.status != BranchStatus.ready:
        raise Conflict(f"branch init {branch_init_id} is {b.status.value}; wait until it is ready")
    return _declare(db, storage, settings, user, f, b.domain, b, sha256, size, config, tokenizer_sha256,
                    name or b.domain.name, training, None,
                    f"trained from branch init {b.id} ({f.name} v{b.version.number})", routing_vector)


def create_import(db: Session, storage: Storage, settings, user: User, forest: str, domain: str, sha256: str,
                  size: int, config: dict, tokenizer_sha256: str, source: dict, name: str | None = None,
                  training: dict | None = None, routing_vector: list[float] | None = None) -> tuple[Contribution, dict]:
    """A maintainer brings an existing checkpoint of the forest's family (a model from the
    Hub, one trained elsewhere) into the forest: no branch init; `source` says where it came
    from. It is validated like any upload and evaluated against the forest's seed."""
    require_maintainer(user)
    f = forests_svc.get(db, forest)
    d = domains_svc.get(db, domain)
    where = source.get("hub") or source.get("path") or "a local directory"
    rev = f"@{source['revision']}" if source.get("revision") else ""
    return _declare(db, storage, settings, user, f, d, None, sha256, size, config, tokenizer_sha256, name or d.name,
                    training, source, f"imported from {where}{rev}", routing_vector)


def _declare(db: Session, storage: Storage, settings, user: User, f, d, b: BranchInit | None, sha256: str, size: int,
             config: dict, tokenizer_sha256: str, name: str, training: dict | None, source: dict | None,
             reason: str, routing_vector: list[float] | None = None) -> tuple[Contribution, dict]:
    """The checks every declared ELM passes before its bytes may come: size, tokenizer,
    family, routing vector, a free name. Returns the contribution and its upload."""
    from transformers import AutoConfig

    forest = f.name
    uploads.check_declared(settings, "weights", sha256, size)
    if tokenizer_sha256 != f.tokenizer_sha256:
        raise Unprocessable(f"the ELM's tokenizer (sha256 {tokenizer_sha256[:12]}) is not the forest's "
                            f"({f.tokenizer_sha256[:12]}); ELMs must keep the seed's tokenizer")
    try:
        cfg = AutoConfig.for_model(**config) if "model_type" in config else None
    except (ValueError, TypeError, KeyError):
        cfg = None
    if cfg is None:
        raise Unprocessable("config is not a Hugging Face model config (it needs at least model_type)")
    if problem := config_family_problem(config, f.config, "the ELM's config"):
        raise Unprocessable(problem)
    if routing_vector is not None:
        routing_vector = _checked_vector(f, routing_vector)
    name = name.lower()
    if not ELM.match(name):
        raise BadRequest("an ELM name is 1-64 lowercase letters, digits, '.', '_' or '-'")
    taken = db.scalar(select(Contribution).where(Contribution.forest_id == f.id, Contribution.name == name,
                                                Contribution.state.not_in(FINAL)))
    if taken is not None:
        raise Conflict(f"the name {name!r} is in use in forest {forest!r} (contribution {taken.id}); pass another --name")
    c = Contribution(name=name, owner_id=user.id, forest_id=f.id, domain_id=d.id, branch_init_id=b.id if b else None,
                     source=source, weights_sha256=sha256, weights_size=size, config=config,
                     tokenizer_sha256=tokenizer_sha256, training=training or {}, routing_vector=routing_vector)
    up = uploads.start(db, storage, settings, user, "weights", WEIGHTS_FILE, sha256, size)
    c.upload_id = up.id
    db.add(c)
    db.flush()
    db.add(ContributionEvent(contribution_id=c.id, from_state=None, to_state=State.uploading.value, actor_id=user.id,
                             reason=reason))
    return c, uploads.describe(storage, up)


def config_family_problem(config: dict, forest_config: dict, subject: str = "the config") -> str | None:
    """The rule for an ELM's config, in one place: it is of the forest's family (btm.family).
    What is wrong with `config`, or None. Enforced at declaration (before any bytes come, once
    the config is known to be a Hugging Face one) and again by validation's named check."""
    from transformers import AutoConfig

    from btm.family import Family, family_differences

    diffs = family_differences(Family(AutoConfig.for_model(**config)), Family(AutoConfig.for_model(**forest_config)))
    return f"{subject} is not of the forest's family ({'; '.join(diffs)})" if diffs else None


def _checked_vector(f, vector: list[float]) -> list[float]:
    """A routing vector sent with an upload: the forest seed's hidden size of finite numbers."""
    from btm.errors import BTMError
    from btm.routing import check_vector

    try:
        return check_vector(vector, seed_hidden_size(f), "routing_vector")
    except BTMError as e:
        raise Unprocessable(str(e)) from None


def seed_hidden_size(f) -> int:
    """The hidden size of the forest's seed (of its text model, for a multimodal config)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**f.config).get_text_config().hidden_size


def start_point(c: Contribution) -> tuple[dict, str]:
    """What the ELM started from, which it must differ from and beat: its branch init, or
    for an imported checkpoint the forest's seed. ({filename: sha256}, how to name it)"""
    if c.branch_init is not None:
        return c.branch_init.files, "its branch init"
    return c.forest.seed_files, "the forest's seed"


def upload_info(db: Session, storage: Storage, settings, user: User, cid: int) -> dict:
    """Where the upload stands (for resuming), or a fresh upload if the last one failed or
    expired (its parts are gone; the file goes up again)."""
    c = own(db, user, cid)
    if c.state != State.uploading:
        raise Conflict(f"contribution {cid} is {c.state.value}; its upload is finished")
    up = db.get(Upload, c.upload_id) if c.upload_id else None
    if up is not None and up.status == uploads.OPEN:
        try:
            return uploads.resume(db, storage, user, up.id)
        except Conflict:  # it expired just now
            pass
    up = uploads.start(db, storage, settings, user, "weights", WEIGHTS_FILE, c.weights_sha256, c.weights_size)
    c.upload_id = up.id
    return uploads.describe(storage, up)


def own(db: Session, user: User, cid: int) -> Contribution:
    c = db.get(Contribution, cid)
    if c is None or not visible(c, user):
        raise NotFound(f"no contribution {cid} visible to you")
    if c.owner_id != user.id:
        raise Forbidden("only the contribution's owner may do this")
    return c


def complete_upload(db: Session, storage: Storage, settings, user: User, cid: int) -> Contribution:
    """Finish the weights' upload. Idempotent: called again (a retry after a crash or a lost
    answer) it finishes what is left, or returns the contribution as it now is."""
    c = own(db, user, cid)
    if c.state != State.uploading:
        return c
    if not c.upload_id:
        raise BadRequest("no upload in progress; ask for the upload URLs again (GET .../upload)")
    uploads.complete(db, storage, settings, user, c.upload_id, hold=True)
    transition(db, c, State.uploaded, user, "upload complete; sha256 verified by the server")
    return c


def abandon(db: Session, storage: Storage, settings, user: User, cid: int, reason: str = "") -> Contribution:
    """The owner withdraws a contribution that is not (yet) in the forest; its bytes go."""
    c = own(db, user, cid)
    if c.state in FINAL or c.state == State.merged:
        raise Conflict(f"contribution {cid} is {c.state.value}; only a contribution not yet merged can be abandoned"
                       + (" (a maintainer can remove a merged ELM from the forest)" if c.state == State.merged else ""))
    transition(db, c, State.abandoned, user, reason or "abandoned by its owner")
    discard_weights(db, storage, settings, c)
    return c


def weights_origin(c: Contribution) -> str:
    return f"ELM {c.name} (contribution {c.id})"


def discard_weights(db: Session, storage: Storage, settings, c: Contribution) -> None:
    """Delete the weights of a contribution that was not accepted: the upload's bytes, or the
    blob validation made of them. Idempotent (the sweeper retries it)."""
    from coordinator.materialize import forget

    up = db.get(Upload, c.upload_id) if c.upload_id else None
    if up is not None and up.status in (uploads.OPEN, uploads.STORED):
        c.upload_id = None
        uploads.delete(db, storage, up)
    sha = (c.files or {}).get(WEIGHTS_FILE)
    art = db.get(Artifact, sha) if sha else None
    if art is not None and art.origin == weights_origin(c):  # its own blob, which nothing else refers to
        storage.delete(blob_key(sha))
        db.delete(art)
    if sha:
        forget(settings.work_dir, sha)
    c.files = None


def sweep(db: Session, storage: Storage, settings, limit: int = 200) -> dict[str, int]:
    """Contributions whose upload expired are abandoned; whatever is still stored of
    contributions that were rejected, declined or abandoned is deleted (a crash between the
    decision and the deletion leaves it; this finishes the job)."""
    from coordinator.models import utcnow

    expired = list(db.scalars(select(Contribution).join(Upload, Upload.id == Contribution.upload_id).where(
        Contribution.state == State.uploading, Upload.status == uploads.OPEN, Upload.expires_at < utcnow()).limit(limit)))
    for c in expired:
        transition(db, c, State.abandoned, None,
                   f"its upload was not finished within {settings.upload_ttl_hours:g} hours")
    stale = list(db.scalars(select(Contribution).join(Upload, Upload.id == Contribution.upload_id, isouter=True).where(
        Contribution.state.in_(DISCARDED),
        (Contribution.files.is_not(None)) | Upload.status.in_(uploads.IN_FLIGHT)).limit(limit)))
    for c in stale:
        discard_weights(db, storage, settings, c)
    return {"abandoned": len(expired), "purged": len(stale)}


def decide(db: Session, storage: Storage, settings, user: User, cid: int, decision: str, reason: str) -> Contribution:
    require_maintainer(user)
    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"no contribution {cid}")
    if not reason.strip() and decision != "approve":
        raise BadRequest("say why (the reason is recorded in the contribution's history)")
    if decision == "approve":
        if c.state != State.evaluated:
            raise Conflict(f"contribution {cid} is {c.state.value}; only evaluated contributions that beat their "
                           "starting point can be approved")
        transition(db, c, State.approved, user, reason or "approved")
    elif decision == "decline":
        if c.state not in (State.evaluated, State.approved):
            raise Conflict(f"contribution {cid} is {c.state.value}; only evaluated or approved ones can be declined")
        transition(db, c, State.declined, user, reason)
        discard_weights(db, storage, settings, c)
    else:
        raise BadRequest(f"unknown decision {decision!r}")
    return c


# ----------------------------------------------------------------------------- validation


class Refused(Exception):
    """A check's verdict: the upload is not acceptable, and why (in the contributor's terms)."""


@dataclass
class Candidate:
    """An uploaded ELM under validation and what its checks compare it with."""

    c: Contribution
    path: Path  # a local copy of the uploaded weights
    label: str  # how messages name the file
    seed_signature: dict
    init_weights: Path
    holder: Callable[[str], str | None]  # sha256 -> what already holds those bytes, if anything
    init_name: str = "its branch init"
    header: object = None
    notes: list[str] = field(default_factory=list)
    # the sha256 the server took of the stored bytes when their upload completed (None: hash `path`)
    sha256: str | None = None
    # the file's bytes from its first, in chunks: one sequential read (None: read `path`)
    chunks: Callable[[], Iterator[bytes]] | None = None
    differs: bool | None = None  # whether a tensor differs from the starting point's (set by _finite)


def _declared(x: Candidate) -> None:
    from btm.hashing import sha256_file

    size = x.path.stat().st_size
    if size != x.c.weights_size:
        raise Refused(f"{x.label} has {size} bytes; {x.c.weights_size} were declared")
    if (x.sha256 or sha256_file(x.path)) != x.c.weights_sha256:
        raise Refused(f"{x.label}: its sha256 differs from the declared one")


def _not_a_copy(x: Candidate) -> None:
    what = x.holder(x.c.weights_sha256)
    if what:
        raise Refused(f"{x.label} is byte for byte the same file as {what}: submit weights you trained yourself")


def _safetensors(x: Candidate) -> None:
    from btm.errors import WeightsError
    from btm.safetensors_io import read_header

    try:
        x.header = read_header(x.path, name=x.label)
    except WeightsError as e:
        raise Refused(str(e)) from None


def _layout(x: Candidate) -> None:
    from btm.family import Family, family_differences

    got = {n: (t.dtype, t.shape) for n, t in x.header.tensors.items()}
    want = x.seed_signature
    diffs = family_differences(Family(tensors=got), Family(tensors=want))
    if diffs:
        raise Refused(f"{x.label} is not of the forest's family: {'; '.join(diffs)}")
    for n, (dt, _) in want.items():  # stricter than the family: the forest's files keep one precision
        if got[n][0] != dt:
            raise Refused(f"{x.label}: tensor {n!r} is {got[n][0]}, the forest's family uses {dt}")


def _config(x: Candidate) -> None:
    if problem := config_family_problem(x.c.config, x.c.forest.config):
        raise Refused(problem)


def _tensors(x: Candidate) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the upload, from one sequential read of its bytes."""
    from btm.safetensors_io import stream_tensors

    if x.chunks is not None:
        return stream_tensors(x.header, x.chunks())

    def from_path() -> Iterator[bytes]:
        with open(x.path, "rb") as f:
            while b := f.read(8 << 20):
                yield b

    return stream_tensors(x.header, from_path())


def _finite(x: Candidate) -> None:
    """No NaN or Inf, and (for the next check) whether the weights differ from their starting
    point: both from the one read of the tensors that validation makes."""
    import torch

    from btm.safetensors_io import open_weights, read_tensor

    init = open_weights(x.init_weights)
    differs = False
    for n, t in _tensors(x):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise Refused(f"{x.label}: tensor {n!r} contains NaN or Inf values")
        if not differs and not torch.equal(t, read_tensor(init.path(n), init.info(n))):
            differs = True  # the init is read no further
    x.differs = differs


def _not_the_init(x: Candidate) -> None:
    if x.differs is None:  # on its own (the tensors were not read yet): read them now
        _finite(x)
    if not x.differs:
        raise Refused(f"the weights are identical to {x.init_name}: train the ELM on its domain before submitting")


# the order matters: cheap and decisive first, then whatever needs the earlier ones
CHECKS: list[tuple[str, Callable[[Candidate], None]]] = [
    ("size and sha256 as declared", _declared),
    ("not a copy of a file the coordinator holds", _not_a_copy),
    ("a safetensors file the reference library reads one way", _safetensors),
    ("tensor names, shapes and dtypes of the forest's family", _layout),
    ("config of the forest's family", _config),
    ("no NaN or Inf", _finite),
    ("differs from its starting point (branch init, or the seed for an import)", _not_the_init),
]


def holder_of(db: Session, c: Contribution) -> Callable[[str], str | None]:
    """sha256 -> a description of what already holds a file with that hash (another
    contribution, an ELM, an init, a seed...), or None."""

    def find(sha: str) -> str | None:
        other = db.scalar(select(Contribution).where(Contribution.weights_sha256 == sha, Contribution.id != c.id,
                                                     Contribution.state.not_in(DISCARDED)).limit(1))
        if other is not None:
            return f"ELM {other.name} (contribution {other.id}, {other.state.value})"
        art = db.get(Artifact, sha)
        if art is not None:
            return art.origin or "a file this coordinator already holds"
        return None

    return find


def validate(db: Session, storage: Storage, settings, cid: int) -> dict:
    """Run CHECKS on an uploaded ELM, treated as hostile (nothing is ever unpickled). Passed,
    its weights become a content-addressed blob; refused, they are deleted."""
    from btm.safetensors_io import open_weights
    from coordinator.materialize import model_dir

    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"contribution {cid} vanished")
    if c.state not in (State.uploaded, State.validating):
        return {"skipped": c.state.value}  # already done: running it again changes nothing
    if c.state == State.uploaded:
        transition(db, c, State.validating, None, "validation started")
        db.commit()
    up = db.get(Upload, c.upload_id)
    report: dict = {"checks": []}
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    # the bytes are read once, by the tensor checks, as they stream from the store; the header
    # checks read a stand-in holding the header alone (on local files, the file itself); the
    # sha256 is the one the server took when the upload completed (it refused any other)
    with tempfile.TemporaryDirectory(dir=settings.work_dir) as td, \
            storage.local_head(up.key, Path(td), _header_span(storage, up.key)) as path:
        x = Candidate(c, path, f"model.safetensors of contribution {c.id}",
                      open_weights(model_dir(storage, settings.work_dir, c.forest.seed_files)).signature(),
                      model_dir(storage, settings.work_dir, start_point(c)[0]), holder_of(db, c), start_point(c)[1],
                      sha256=up.sha256 if up.status == uploads.STORED else None,
                      chunks=lambda: storage.iter_chunks(up.key))
        for name, check in CHECKS:
            try:
                check(x)
            except Refused as e:
                return _refuse(db, storage, settings, c, report, name, str(e))
            report["checks"].append(name)
    if not uploads.promote(db, storage, up.key, c.weights_sha256, c.weights_size, "weights", weights_origin(c)):
        # a concurrent upload of the same bytes was accepted a moment ago
        return _refuse(db, storage, settings, c, report, CHECKS[1][0],
                       f"{x.label} is byte for byte the same file as one accepted a moment ago")
    up.status = uploads.COMPLETE
    # the ELM directory: the forest's config and tokenizer files, the uploaded weights, a card
    files = {k: v for k, v in c.forest.seed_files.items() if not k.startswith(WEIGHTS_PREFIX) and k != CARD}
    files[CONFIG] = uploads.put_small(db, storage, json.dumps(c.config, indent=2, sort_keys=True).encode(),
                                             "file").sha256
    files[WEIGHTS_FILE] = c.weights_sha256
    c.files = files
    report["ok"] = True
    c.validation = report
    transition(db, c, State.validated, None, "all checks passed", {"checks": report["checks"]})
    return report


def _header_span(storage: Storage, key: str) -> int:
    """How many of an uploaded file's first bytes its header checks read: the 8-byte length
    and the header it announces, or the 8 bytes alone when that announces no header the
    file could hold (the reference library refuses it on the length alone)."""
    import struct

    from btm.safetensors_io import MAX_HEADER_BYTES

    first, size = storage.read_range(key, 0, 8), storage.size(key) or 0
    if len(first) < 8:
        return len(first)
    (n,) = struct.unpack("<Q", first)
    return 8 + n if n <= min(MAX_HEADER_BYTES, size - 8) else 8


def _refuse(db: Session, storage: Storage, settings, c: Contribution, report: dict, check: str, msg: str) -> dict:
    report.update(ok=False, error=msg, failed_check=check)
    c.validation = report
    transition(db, c, State.rejected, None, msg, {"stage": "validation", "check": check})
    discard_weights(db, storage, settings, c)
    return report


# ----------------------------------------------------------------------------- evaluation


def evaluate(db: Session, storage: Storage, settings, cid: int) -> dict:
    """Perplexity on the domain's held-out data: the ELM, its starting point (branch init, or
    the seed for an import), and the current forest's ensemble. It must beat its starting
    point to go to a maintainer."""
    from btm.evaluate import Scores
    from btm.forest import Forest
    from btm.tokenizer import load_tokenizer
    from coordinator.materialize import forest_dir, model_dir

    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"contribution {cid} vanished")
    if c.state != State.validated:
        return {"skipped": c.state.value}
    d = c.domain
    if d.eval_data_sha256 is None:
        raise BadRequest(f"domain {d.name!r} has no held-out evaluation data")
    elm = model_dir(storage, settings.work_dir, c.files)
    start, init_name = start_point(c)
    init = model_dir(storage, settings.work_dir, start)
    db_ = domains_svc.held_out_blocks(storage, settings, d, load_tokenizer(elm))
    if db_ is None:
        raise BadRequest(domains_svc.too_short(settings, d))
    s = Scores()
    s.add_model("elm", elm, [db_], dev_too=False)
    s.add_model("init", init, [db_], dev_too=False)
    ppl, init_ppl = s.ppl("elm", d.name), s.ppl("init", d.name)
    result = {"domain": d.name, "ppl": ppl, "init_ppl": init_ppl, "tokens": db_.tokens, "beats_init": ppl < init_ppl}
    v = forests_svc.version(db, c.forest)
    forest = Forest.load(forest_dir(storage, settings.work_dir, v.manifest))
    if len(forest):
        for e in forest.elms:
            s.add_model(e.name, e.path, [db_])
        result["forest_ensemble_ppl"] = s.ensemble_ppl(forest.names(), d.name)
        result["forest_version"] = v.number
    for method, val in (("elm", ppl), ("init", init_ppl), ("forest-ensemble", result.get("forest_ensemble_ppl"))):
        if val is None:
            continue
        row = db.scalar(select(Evaluation).where(Evaluation.contribution_id == c.id, Evaluation.method == method))
        row = row or Evaluation(contribution_id=c.id, subject=c.name, kind="contribution", domain_id=d.id, method=method)
        row.perplexity, row.tokens = float(val), db_.tokens
        db.add(row)
    c.evaluation = result
    if result["beats_init"]:
        vector_from = ensure_routing_vector(storage, settings, c)
        c.evaluation = {**result, "merge_preview": merge_preview(db, storage, settings, c)}
        transition(db, c, State.evaluated, None,
                   f"perplexity {ppl:.3f} on {d.name} beats {init_name}'s {init_ppl:.3f}",
                   {**result, "routing_vector": vector_from})
    else:
        transition(db, c, State.rejected, None,
                   f"perplexity {ppl:.3f} on the held-out data of {d.name} is not better than {init_name}'s "
                   f"{init_ppl:.3f}: train longer or check the data", {"stage": "evaluation", **result})
        discard_weights(db, storage, settings, c)
    return result


def merge_preview(db: Session, storage: Storage, settings, c: Contribution) -> dict:
    """What merging `c` would change on every domain (services/values.preview), for the review
    queue; a failure leaves a note instead, never fails the evaluation."""
    from btm.errors import BTMError
    from coordinator.services import values

    try:
        return values.preview(db, storage, settings, c)
    except (BTMError, ValueError, OSError) as e:
        log.warning("merge preview of contribution %s failed: %s", c.id, e)
        return {"error": public(str(e))}


def ensure_routing_vector(storage: Storage, settings, c: Contribution) -> str:
    """The ELM's routing vector, unless its contributor sent one: the forest seed's mean hidden
    state over the domain text the coordinator holds, its branch init's sample if there is
    one, else the domain's held-out data. Deterministic, so a retried job computes the same.
    Returns where it came from (for the contribution's history)."""
    from btm.errors import DataError
    from btm.recipes import routing_vector as compute
    from coordinator.materialize import blob, model_dir

    if c.routing_vector is not None:
        return "sent by its contributor"
    seed = model_dir(storage, settings.work_dir, c.forest.seed_files)
    sources = [(c.branch_init.sample_sha256 if c.branch_init else None, "computed from its branch init's sample"),
               (c.domain.eval_data_sha256, f"computed from the held-out data of {c.domain.name}")]
    for sha, what in sources:
        if sha is None:
            continue
        try:
            c.routing_vector = compute(seed, blob(storage, settings.work_dir, sha))
        except DataError:  # a sample without usable text: the held-out data serves
            continue
        return what
    return "none: no text of its domain to compute it from"
