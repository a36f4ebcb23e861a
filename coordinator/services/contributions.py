"""Contributions: an uploaded ELM's way from upload through validation and evaluation to a
maintainer's decision. Validation treats the upload as hostile; evaluation requires it to
beat its branch init on the domain's held-out data."""

from __future__ import annotations

import json
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from coordinator.models import (
    BranchInit,
    BranchStatus,
    Contribution,
    Evaluation,
    State,
    Upload,
    User,
)
from coordinator.services import domains as domains_svc
from coordinator.services import forests as forests_svc
from coordinator.services import uploads
from coordinator.services.forests import transition
from coordinator.storage import Storage

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
FINAL = {State.rejected, State.declined, State.removed}


def visible(c: Contribution, user: User | None) -> bool:
    return user is not None and (c.owner_id == user.id or domains_svc.is_maintainer(user))


def get(db: Session, user: User | None, cid: int) -> Contribution:
    c = db.get(Contribution, cid)
    if c is None or not (visible(c, user) or c.state in (State.merged, State.removed)):
        raise NotFound(f"no contribution {cid} visible to you")
    return c


def list_(db: Session, user: User | None, state: str | None = None, mine: bool = False, forest: str | None = None,
          limit: int = 200) -> list[Contribution]:
    q = select(Contribution).order_by(Contribution.id.desc()).limit(limit)
    if state:
        q = q.where(Contribution.state == State(state))
    if forest:
        q = q.where(Contribution.forest_id == forests_svc.get(db, forest).id)
    if mine and user is not None:
        q = q.where(Contribution.owner_id == user.id)
    elif not domains_svc.is_maintainer(user):
        # others' contributions are public once merged; your own are always visible
        cond = Contribution.state.in_([State.merged, State.removed])
        if user is not None:
            cond = cond | (Contribution.owner_id == user.id)
        q = q.where(cond)
    return list(db.scalars(q))


def create(db: Session, storage: Storage, settings, user: User, forest: str, branch_init_id: int, sha256: str,
           size: int, config: dict, tokenizer_sha256: str, name: str | None = None, training: dict | None = None,
           forest_version: int | None = None) -> tuple[Contribution, dict]:
    """Declare an ELM trained from a branch init and get the URLs to upload its weights."""
    from transformers import AutoConfig

    from btm.family import architecture

    f = forests_svc.get(db, forest)
    b = db.get(BranchInit, branch_init_id)
    if b is None or (b.requested_by_id != user.id and not domains_svc.is_maintainer(user)):
        raise NotFound(f"no branch init {branch_init_id} of yours; request one first (`elmforest branch request`)")
    if b.forest_id != f.id:
        raise BadRequest(f"branch init {branch_init_id} belongs to forest {b.forest.name!r}, not {forest!r}; "
                         f"train from an init of {forest!r}")
    if forest_version is not None and forest_version != b.version.number:
        raise BadRequest(f"branch init {branch_init_id} was made from {f.name} v{b.version.number}, "
                         f"not v{forest_version}; submit the ELM trained from the init you were given")
    if b.status != BranchStatus.ready:
        raise Conflict(f"branch init {branch_init_id} is {b.status.value}; wait until it is ready")
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
    want = architecture(AutoConfig.for_model(**f.config))
    got = architecture(cfg)
    if got != want:
        diffs = [f"{k}: {got.get(k)!r} vs {want.get(k)!r}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
        raise Unprocessable(f"the ELM's config is not of the forest's family ({'; '.join(diffs[:6])})")
    name = (name or b.domain.name).lower()
    if not NAME.match(name):
        raise BadRequest("an ELM name is 1-64 lowercase letters, digits, '.', '_' or '-'")
    taken = db.scalar(select(Contribution).where(Contribution.forest_id == f.id, Contribution.name == name,
                                                Contribution.state.not_in(FINAL)))
    if taken is not None:
        raise Conflict(f"the name {name!r} is in use in forest {forest!r} (contribution {taken.id}); pass another --name")
    c = Contribution(name=name, owner_id=user.id, forest_id=f.id, domain_id=b.domain_id, branch_init_id=b.id,
                     weights_sha256=sha256, weights_size=size, config=config, tokenizer_sha256=tokenizer_sha256,
                     training=training or {})
    db.add(c)
    db.flush()
    from coordinator.models import ContributionEvent

    db.add(ContributionEvent(contribution_id=c.id, from_state=None, to_state=State.uploading.value, actor_id=user.id,
                             reason=f"trained from branch init {b.id} ({f.name} v{b.version.number})"))
    up = uploads.start(db, storage, settings, user, "weights", "model.safetensors", sha256, size)
    c.upload_id = up["upload_id"]
    return c, up


def upload_info(db: Session, storage: Storage, settings, user: User, cid: int) -> dict:
    """Where the upload stands (for resuming), or a fresh upload if the last one failed."""
    c = own(db, user, cid)
    if c.state != State.uploading:
        raise Conflict(f"contribution {cid} is {c.state.value}; its upload is finished")
    up = db.get(Upload, c.upload_id) if c.upload_id else None
    if up is None or up.status != "open":
        info = uploads.start(db, storage, settings, user, "weights", "model.safetensors", c.weights_sha256, c.weights_size)
        c.upload_id = info["upload_id"]
        return info
    return uploads.resume(db, storage, user, up.id)


def own(db: Session, user: User, cid: int) -> Contribution:
    c = db.get(Contribution, cid)
    if c is None or not visible(c, user):
        raise NotFound(f"no contribution {cid} visible to you")
    if c.owner_id != user.id:
        raise Forbidden("only the contribution's owner may do this")
    return c


def complete_upload(db: Session, storage: Storage, user: User, cid: int, parts: list[dict] | None = None) -> Contribution:
    c = own(db, user, cid)
    if c.state != State.uploading:
        raise Conflict(f"contribution {cid} is {c.state.value}, not uploading")
    if not uploads.artifact_exists(db, storage, c.weights_sha256):
        if not c.upload_id:
            raise BadRequest("no upload in progress; ask for the upload URLs again")
        uploads.complete(db, storage, user, c.upload_id, parts)
    transition(db, c, State.uploaded, user, "upload complete; sha256 verified by the server")
    return c


def decide(db: Session, user: User, cid: int, decision: str, reason: str) -> Contribution:
    forests_svc.require_maintainer(user)
    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"no contribution {cid}")
    if not reason.strip() and decision != "approve":
        raise BadRequest("say why (the reason is recorded in the contribution's history)")
    if decision == "approve":
        if c.state != State.evaluated:
            raise Conflict(f"contribution {cid} is {c.state.value}; only evaluated contributions that beat their "
                           "branch init can be approved")
        transition(db, c, State.approved, user, reason or "approved")
    elif decision == "decline":
        if c.state not in (State.evaluated, State.approved):
            raise Conflict(f"contribution {cid} is {c.state.value}; only evaluated or approved ones can be declined")
        transition(db, c, State.declined, user, reason)
    else:
        raise BadRequest(f"unknown decision {decision!r}")
    return c


# ----------------------------------------------------------------------------- jobs


def validate(db: Session, storage: Storage, settings, cid: int) -> dict:
    """Check an uploaded ELM as untrusted input; never unpickles anything.

    Header and sizes before data; names, shapes and dtypes against the seed; every tensor
    finite; sha256 and size as declared; the config of the forest's family; not the init."""
    import torch

    from btm.errors import WeightsError
    from btm.safetensors_io import open_weights, read_header, read_tensor
    from coordinator.materialize import blob, model_dir

    c = db.get(Contribution, cid)
    if c is None:
        raise NotFound(f"contribution {cid} vanished")
    if c.state not in (State.uploaded, State.validating):
        return {"skipped": c.state.value}  # already done: running it again changes nothing
    if c.state == State.uploaded:
        transition(db, c, State.validating, None, "validation started")
        db.commit()
    report: dict = {"checks": []}

    def fail(msg: str) -> dict:
        report["ok"] = False
        report["error"] = msg
        c.validation = report
        transition(db, c, State.rejected, None, msg, {"stage": "validation"})
        return report

    def ok(name: str) -> None:
        report["checks"].append(name)

    sha, size = c.weights_sha256, c.weights_size
    path = blob(storage, settings.work_dir, sha)
    if path.stat().st_size != size:
        return fail(f"the stored file has {path.stat().st_size} bytes, {size} were declared")
    from btm.hashing import sha256_file

    if sha256_file(path) != sha:
        return fail("the stored file's sha256 differs from the declared one")
    ok("sha256 and size as declared")
    try:
        hdr = read_header(path, max_file_bytes=settings.max_upload_bytes)
    except WeightsError as e:
        # only once the header has failed do we look at what the file is instead (a valid
        # header can start with any byte: its first byte is the low byte of its length)
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80" or head == b"PK\x03\x04":
            return fail("the file is a pickle (or a zip of pickles, as torch.save writes), not safetensors; "
                        "save the weights with safetensors (nothing was unpickled)")
        return fail(f"not a valid safetensors file: {e}")
    ok("safetensors header well-formed; every tensor lies inside the file")
    seed_sig = open_weights(model_dir(storage, settings.work_dir, c.forest.seed_files)).signature()
    got = {n: (t.dtype, t.shape) for n, t in hdr.tensors.items()}
    missing = sorted(set(seed_sig) - set(got))
    extra = sorted(set(got) - set(seed_sig))
    if missing or extra:
        return fail(f"tensor names differ from the forest's: missing {missing[:5]}, extra {extra[:5]}")
    for n, (dt, shape) in seed_sig.items():
        if got[n][1] != shape:
            return fail(f"tensor {n!r} has shape {list(got[n][1])}, the forest's family has {list(shape)}")
        if got[n][0] != dt:
            return fail(f"tensor {n!r} is {got[n][0]}, the forest's family uses {dt}")
    ok("tensor names, shapes and dtypes equal the forest's family")
    import os

    init_idx = open_weights(model_dir(storage, settings.work_dir, c.branch_init.files))
    same_as_init = True
    fd = os.open(path, os.O_RDONLY)
    try:
        for n, info in hdr.tensors.items():
            t = read_tensor(path, info, fd)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return fail(f"tensor {n!r} contains NaN or Inf values")
            if same_as_init:
                same_as_init = torch.equal(t, read_tensor(init_idx.path(n), init_idx.info(n)))
    finally:
        os.close(fd)
    ok("no NaN or Inf")
    from transformers import AutoConfig

    from btm.family import architecture

    if architecture(AutoConfig.for_model(**c.config)) != architecture(AutoConfig.for_model(**c.forest.config)):
        return fail("the config is not of the forest's family")
    ok("config of the forest's family")
    if same_as_init:
        return fail("the weights are identical to the branch init: train the ELM on its domain before submitting")
    ok("differs from its branch init")
    # assemble the ELM directory: the forest's config and tokenizer files, the uploaded weights, a card
    files = {k: v for k, v in c.forest.seed_files.items() if not k.startswith("model") and k != "README.md"}
    files["config.json"] = uploads.put_small(db, storage, json.dumps(c.config, indent=2, sort_keys=True).encode(), "file").sha256
    files["model.safetensors"] = sha
    c.files = files
    report["ok"] = True
    c.validation = report
    transition(db, c, State.validated, None, "all checks passed", {"checks": report["checks"]})
    return report


def evaluate(db: Session, storage: Storage, settings, cid: int) -> dict:
    """Perplexity on the domain's held-out data: the ELM, its branch init, and the current
    forest's ensemble. It must beat its init to go to a maintainer."""
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
    init = model_dir(storage, settings.work_dir, c.branch_init.files)
    db_ = domains_svc.held_out_blocks(storage, settings, d, load_tokenizer(elm))
    if db_ is None:
        raise BadRequest(f"domain {d.name!r} has too little held-out text to evaluate on; upload more")
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
        transition(db, c, State.evaluated, None,
                   f"perplexity {ppl:.3f} on {d.name} beats its branch init's {init_ppl:.3f}", result)
    else:
        transition(db, c, State.rejected, None,
                   f"perplexity {ppl:.3f} on the held-out data of {d.name} is not better than its branch init's "
                   f"{init_ppl:.3f}: train longer or check the data", {"stage": "evaluation", **result})
    return result

