"""The coordinator's API as one typed Python class, in the manner of huggingface_hub's HfApi:

    from contributor_client import Coordinator

    api = Coordinator("https://forest.example.org", token)    # or Coordinator.from_login()
    b = api.request_branch("demo", "legal", data=Path("~/legal").expanduser(), private=True)
    api.download_init(b, Path("runs/init"))
    c = api.submit(Path("runs/legal"))                          # resumable
    print(api.follow(c.id).state)

One method per operation of the `elmforest` commands, each returning a typed record
(records.py) or a path, and raising ClientError with the server's message. `Routes` is the
one place the client spells a URL path: every method calls the API through it, and
tests/client/test_api_covers_openapi.py checks it against the coordinator's OpenAPI. The
HTTP mechanics (auth, retries, parts, streamed downloads checked against their sha256) are
http.Client's, which this class extends; what is computed on the contributor's machine
(a sample, the private posterior, the routing vector) is local.py's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

import contributor_client.config as config
import contributor_client.local as local
from btm.hashing import sha256_file
from btm.model_files import (
    CONFIG,
    TOKENIZER_PREFIX,
    WEIGHTS_FILE,
    is_upload_file,
    is_weights_file,
    manifest_models,
    write_manifest,
)
from btm.round_config import RoundConfig
from contributor_client.http import Client, ClientError
from contributor_client.records import (
    Average,
    Baseline,
    BranchInit,
    Contribution,
    ContributorValues,
    Domain,
    Files,
    Forest,
    ForestFiles,
    Invite,
    Job,
    Leaderboard,
    Manifest,
    MergePreview,
    Moe,
    MoeList,
    NewToken,
    Round,
    TokenInfo,
    Uploaded,
    User,
    Version,
    VersionValues,
)

Log = Callable[[str], None]
Progress = Callable[[int, int], None]


def _quiet(msg: str) -> None:
    pass


class Route(NamedTuple):
    """One route of the coordinator's API: its method and its path template under /api/v1,
    with the server's own parameter names."""

    method: str
    path: str

    def url(self, **params: Any) -> str:
        return self.path.format(**{k: quote(str(v), safe="") for k, v in params.items()})


class Routes:
    """Every route this client calls; the methods of `Coordinator` use nothing else."""

    # accounts
    REGISTER = Route("POST", "/auth/register")
    LOGIN = Route("POST", "/auth/login")
    ME = Route("GET", "/me")
    TOKENS = Route("GET", "/tokens")
    CREATE_TOKEN = Route("POST", "/tokens")
    REVOKE_TOKEN = Route("DELETE", "/tokens/{token_id}")
    CREATE_INVITE = Route("POST", "/invites")
    # domains
    DOMAINS = Route("GET", "/domains")
    DOMAIN = Route("GET", "/domains/{name}")
    CREATE_DOMAIN = Route("POST", "/domains")
    SET_EVAL_DATA = Route("PUT", "/domains/{name}/eval-data")
    # uploads (of files referred to by sha256: samples, held-out data, a seed's or a baseline's files)
    CREATE_UPLOAD = Route("POST", "/uploads")
    UPLOAD = Route("GET", "/uploads/{upload_id}")
    COMPLETE_UPLOAD = Route("POST", "/uploads/{upload_id}/complete")
    # forests and what a version offers
    FORESTS = Route("GET", "/forests")
    FOREST = Route("GET", "/forests/{name}")
    CREATE_FOREST = Route("POST", "/forests")
    VERSIONS = Route("GET", "/forests/{name}/versions")
    MANIFEST = Route("GET", "/forests/{name}/versions/{number}")
    FOREST_FILES = Route("GET", "/forests/{name}/download")
    BASELINES = Route("GET", "/forests/{name}/baselines")
    CREATE_BASELINE = Route("POST", "/forests/{name}/baselines")
    PUBLISH = Route("POST", "/forests/{name}/publish")
    LEADERBOARD = Route("GET", "/forests/{name}/leaderboard")
    POSTERIORS = Route("GET", "/forests/{name}/posteriors")
    REQUEST_AVERAGE = Route("POST", "/forests/{name}/averages")
    AVERAGE = Route("GET", "/forests/{name}/averages/{average_id}")
    MOE_EXPORTS = Route("GET", "/forests/{name}/moe")
    REQUEST_MOE = Route("POST", "/forests/{name}/moe")
    MOE = Route("GET", "/forests/{name}/moe/{moe_id}")
    TUNE_MOE = Route("POST", "/forests/{name}/moe/{moe_id}/tune")
    VALUES = Route("GET", "/forests/{name}/versions/{number}/values")
    CONTRIBUTOR_VALUES = Route("GET", "/forests/{name}/versions/{number}/values/contributors")
    IMPORT = Route("POST", "/forests/{forest}/imports")
    # branch inits and contributions
    REQUEST_BRANCH = Route("POST", "/branch-inits")
    BRANCH_INIT = Route("GET", "/branch-inits/{init_id}")
    CREATE_CONTRIBUTION = Route("POST", "/contributions")
    CONTRIBUTIONS = Route("GET", "/contributions")
    CONTRIBUTION = Route("GET", "/contributions/{cid}")
    CONTRIBUTION_UPLOAD = Route("GET", "/contributions/{cid}/upload")
    COMPLETE_CONTRIBUTION = Route("POST", "/contributions/{cid}/complete")
    CONTRIBUTION_FILES = Route("GET", "/contributions/{cid}/download")
    ABANDON = Route("POST", "/contributions/{cid}/abandon")
    APPROVE = Route("POST", "/contributions/{cid}/approve")
    DECLINE = Route("POST", "/contributions/{cid}/decline")
    REMOVE = Route("POST", "/contributions/{cid}/remove")
    MERGE_PREVIEW = Route("GET", "/contributions/{cid}/merge-preview")
    # jobs
    JOBS = Route("GET", "/jobs")
    JOB = Route("GET", "/jobs/{job_id}")
    RETRY_JOB = Route("POST", "/jobs/{job_id}/retry")
    # federated rounds
    START_ROUND = Route("POST", "/rounds")
    ROUNDS = Route("GET", "/rounds")
    ROUND = Route("GET", "/rounds/{round_id}")
    CANCEL_ROUND = Route("POST", "/rounds/{round_id}/cancel")


ROUTES: dict[str, Route] = {k: v for k, v in vars(Routes).items() if isinstance(v, Route)}
# outside the API: whether the coordinator is up (and its database reachable)
HEALTH = "/healthz"

# a contribution in one of these states waits for nobody but a maintainer (or is done)
SETTLED = {"evaluated", "rejected", "approved", "declined", "merged", "removed", "abandoned"}


class Coordinator(Client):
    """A coordinator, reached with an API token (or none, for what anyone may read).

    `Coordinator(url, token)`; `Coordinator.from_login()` uses `elmforest login`'s (and
    ELMFOREST_URL / ELMFOREST_TOKEN). Reads return records, jobs are waited for unless
    `wait=False`, and uploads resume where they stopped when run again. The raw calls it is
    built on (`get`, `post`, `request`) stay available for anything it has no method for.
    """

    @classmethod
    def from_login(cls, url: str | None = None, token: str | None = None, need_login: bool = False,
                   **kw: Any) -> Coordinator:
        """The coordinator you logged in to (`elmforest login`), or `url`, with your token (or
        `token`); with `need_login`, a ClientError says to log in when there is no token."""
        cred = config.load()
        token = token or cred.token
        if need_login and not token:
            raise ClientError("not logged in: run `elmforest login` first (or set ELMFOREST_TOKEN)")
        return cls(url or cred.url, token, **kw)

    @classmethod
    def of(cls, client: Client) -> Coordinator:
        """`client` as a Coordinator (itself if it is one; else one on the same connections)."""
        if isinstance(client, cls):
            return client
        c = cls.__new__(cls)
        c.__dict__.update(client.__dict__)
        return c

    def health(self, timeout: float = 2.0) -> int | None:
        """The HTTP status of the coordinator's health check (200: up), or None when nothing
        answers at its URL."""
        try:
            return self.raw.get(self.url + HEALTH, timeout=timeout).status_code
        except httpx.HTTPError:
            return None

    def _call(self, route: Route, body: dict | None = None, query: dict | None = None, **path: Any) -> Any:
        kw: dict[str, Any] = {"params": {k: v for k, v in (query or {}).items() if v is not None}}
        if route.method in ("POST", "PUT", "PATCH"):
            kw["json"] = body or {}
        return self.request(route.method, route.url(**path), **kw)

    def _complete(self, route: Route, **path: Any) -> Any:
        """An upload's completion (long, and repeated after a broken connection: it is idempotent)."""
        return self.complete(route.url(**path))

    # ------------------------------------------------------------------ accounts

    def register(self, username: str, password: str, invite: str | None = None) -> NewToken:
        """Create an account (with an invitation code where registration is invite-only)."""
        return NewToken.from_json(self._call(Routes.REGISTER, {"username": username, "password": password,
                                                               "invite": invite}))

    def login(self, username: str, password: str, token_name: str = "cli") -> NewToken:
        return NewToken.from_json(self._call(Routes.LOGIN, {"username": username, "password": password,
                                                            "token_name": token_name}))

    def whoami(self) -> User:
        return User.from_json(self._call(Routes.ME))

    me = whoami

    def tokens(self, username: str | None = None) -> list[TokenInfo]:
        """Your tokens (admins: `username`'s); their secrets are never shown again."""
        return [TokenInfo.from_json(x) for x in self._call(Routes.TOKENS, query={"username": username})]

    def create_token(self, name: str, scopes: list[str] | None = None, days: int | None = None) -> NewToken:
        """A new token with at most your current token's scopes (default: all of them)."""
        return NewToken.from_json(self._call(Routes.CREATE_TOKEN, {"name": name, "scopes": scopes or None,
                                                                   "expires_days": days}))

    def revoke_token(self, token_id: int) -> TokenInfo:
        return TokenInfo.from_json(self._call(Routes.REVOKE_TOKEN, token_id=token_id))

    def create_invite(self, note: str = "", days: int = 7) -> Invite:
        """A one-use invitation to register (maintainers)."""
        return Invite.from_json(self._call(Routes.CREATE_INVITE, {"note": note, "days": days}))

    # ------------------------------------------------------------------ domains, uploads

    def domains(self) -> list[Domain]:
        return [Domain.from_json(x) for x in self._call(Routes.DOMAINS)]

    def domain(self, name: str) -> Domain:
        return Domain.from_json(self._call(Routes.DOMAIN, name=name))

    def create_domain(self, name: str, description: str | None = None, category: str | None = None,
                      provenance: str | None = None, license: str | None = None, role: str | None = None) -> Domain:
        """Register a domain (role `eval`: maintainers only); what is not given is the server's default."""
        fields = {"description": description, "category": category, "provenance": provenance, "license": license,
                  "role": role}
        return Domain.from_json(self._call(Routes.CREATE_DOMAIN, {"name": name, **{k: v for k, v in fields.items()
                                                                                   if v is not None}}))

    def set_eval_data(self, name: str, path: Path, progress: Progress | None = None) -> Domain:
        """Upload a domain's held-out documents (.jsonl/.txt), which ELMs are evaluated on."""
        art = self.upload(path, "eval-data", progress=progress)
        return Domain.from_json(self._call(Routes.SET_EVAL_DATA, {"sha256": art.sha256}, name=name))

    def upload(self, path: Path, purpose: str, sha256: str | None = None, state_file: Path | None = None,
               progress: Progress | None = None) -> Uploaded:
        """Upload a file in parts. With a state file, an interrupted upload resumes from the
        parts that already arrived."""
        path = Path(path)
        size = path.stat().st_size
        sha256 = sha256 or sha256_file(path)
        info = None
        if state_file and state_file.exists():
            saved = json.loads(state_file.read_text())
            if saved.get("sha256") == sha256 and saved.get("upload_id"):
                info, done = self._resume_upload(saved["upload_id"])
                if done is not None:
                    state_file.unlink(missing_ok=True)
                    return done
        if info is None:
            info = self._call(Routes.CREATE_UPLOAD, {"purpose": purpose, "filename": path.name, "sha256": sha256,
                                                     "size": size})
            if state_file:
                state_file.write_text(json.dumps({"sha256": sha256, "upload_id": info["upload_id"]}))
        self.put_parts(path, info, progress)
        art = self._complete(Routes.COMPLETE_UPLOAD, upload_id=info["upload_id"])
        if state_file:
            state_file.unlink(missing_ok=True)
        return Uploaded.from_json(art)

    def _resume_upload(self, upload_id: str) -> tuple[dict | None, Uploaded | None]:
        """(its parts, None) of an upload under way; (None, the upload) of one that finished
        already (its answer was lost); (None, None) of one that is gone."""
        try:
            return self._call(Routes.UPLOAD, upload_id=upload_id), None
        except ClientError as e:
            if e.status == 409:  # finished already? then done
                try:
                    done = self._complete(Routes.COMPLETE_UPLOAD, upload_id=upload_id)
                    if done.get("status") == "complete":
                        return None, Uploaded.from_json(done)
                except ClientError:
                    pass
            return None, None

    def upload_model(self, model_dir: Path, progress: Progress | None = None) -> dict[str, str]:
        """Upload a model directory's files (not its training state); {filename: sha256}."""
        files = {}
        for f in sorted(Path(model_dir).iterdir()):
            if f.is_file() and is_upload_file(f.name):
                purpose = "weights" if is_weights_file(f.name) else "model-file"
                files[f.name] = self.upload(f, purpose, progress=progress).sha256
        return files

    # ------------------------------------------------------------------ forests

    def forests(self) -> list[Forest]:
        return [Forest.from_json(x) for x in self._call(Routes.FORESTS)]

    def forest(self, name: str) -> Forest:
        return Forest.from_json(self._call(Routes.FOREST, name=name))

    def create_forest(self, name: str, model_dir: Path, description: str = "", progress: Progress | None = None) -> Forest:
        """A new forest with this seed as its root (maintainers)."""
        return Forest.from_json(self._call(Routes.CREATE_FOREST, {"name": name, "description": description,
                                                                  "files": self.upload_model(model_dir, progress)}))

    def register_seed(self, name: str, seed_dir: Path, description: str = "",
                      progress: Progress | None = None) -> tuple[Forest, bool]:
        """Register a seed as the root of forest `name`; (forest, created). Running it again with
        the same seed is a no-op, so a restarted cluster job registers its seed exactly once."""
        try:
            f = self.forest(name)
        except ClientError as e:
            if e.status != 404:
                raise
            return self.create_forest(name, seed_dir, description, progress), True
        if self.manifest(name, 1).seed.files != local.local_files(seed_dir):
            raise ClientError(f"forest {name!r} already exists with another seed; choose another name")
        return f, False

    def versions(self, forest: str) -> list[Version]:
        return [Version.from_json(x) for x in self._call(Routes.VERSIONS, name=forest)]

    def manifest(self, forest: str, version: int) -> Manifest:
        """A published version's manifest: its seed and ELMs, their files and lineage."""
        return Manifest.from_json(self._call(Routes.MANIFEST, name=forest, number=version))

    def forest_files(self, forest: str, version: int | None = None) -> ForestFiles:
        """A version's manifest (default: the current version) and a download URL per file."""
        return ForestFiles.from_json(self._call(Routes.FOREST_FILES, query={"version": version}, name=forest))

    def download_forest(self, forest: str, dest: Path, version: int | None = None, log: Log = _quiet) -> Path:
        """A published version as a btm forest directory (forest.json, seed/, elms/<name>/)."""
        d = self.forest_files(forest, version)
        for path, files in manifest_models(d.manifest.raw):
            urls = {name: d.files[f"{path}/{name}"] for name in files}
            self.download_files(files, urls, dest / path, log)
        write_manifest(dest, d.manifest.raw)
        return dest

    def baselines(self, forest: str) -> list[Baseline]:
        return [Baseline.from_json(x) for x in self._call(Routes.BASELINES, name=forest)]

    def register_baseline(self, forest: str, name: str, model_dir: Path, description: str = "",
                          progress: Progress | None = None) -> Baseline:
        """A baseline (e.g. the compute-matched dense LM) the leaderboard scores (maintainers)."""
        files = self.upload_model(model_dir, progress)
        return Baseline.from_json(self._call(Routes.CREATE_BASELINE, {"name": name, "description": description,
                                                                      "files": files}, name=forest))

    def publish(self, forest: str, note: str = "", wait: bool = True) -> Job:
        """Merge every approved contribution into a new version (maintainers); with `wait`,
        the finished job, whose result names the version."""
        job = Job.from_json(self._call(Routes.PUBLISH, {"note": note}, name=forest))
        return self.finish(job, "publishing") if wait else job

    def leaderboard(self, forest: str, version: int | None = None, **query: Any) -> Leaderboard:
        """A version's leaderboard (default: the current one); `query`: role, kind, sort, desc,
        page, per_page, as the API takes them."""
        return Leaderboard.from_json(self._call(Routes.LEADERBOARD, query={"version": version, **query}, name=forest))

    def posteriors(self, forest: str, version: int | None = None) -> dict[str, dict[str, float]]:
        """Per domain, the cached domain posterior over the version's ELMs."""
        return self._call(Routes.POSTERIORS, query={"version": version}, name=forest)

    # ------------------------------------------------------------------ averaged and MoE models

    def request_average(self, forest: str, method: str = "posterior", domain: str | None = None,
                        version: int | None = None, wait: bool = True, log: Log = _quiet) -> Average:
        """An averaged model of a version (built by the coordinator if it is new); with `wait`,
        once it is ready."""
        a = Average.from_json(self._call(Routes.REQUEST_AVERAGE, {"method": method, "domain": domain},
                                         query={"version": version}, name=forest))
        if wait and a.status == "requested":
            log("the averaged model is being built")
            a = self.wait(lambda: self.average(forest, a.id), lambda x: x.status != "requested")
        if a.status == "failed":
            raise ClientError(f"the coordinator could not build the averaged model: {a.error}")
        return a

    def average(self, forest: str, average_id: int) -> Average:
        return Average.from_json(self._call(Routes.AVERAGE, name=forest, average_id=average_id))

    def download_average(self, forest: str, dest: Path, method: str = "posterior", domain: str | None = None,
                         version: int | None = None, log: Log = _quiet) -> Path:
        """An averaged model for a target domain in `dest` (loads with transformers)."""
        a = self.request_average(forest, method, domain, version, log=log)
        return self.download_files(a.files, a.urls, dest, log)

    def moe_exports(self, forest: str, version: int | None = None) -> MoeList:
        """A version's MoE exports and router tunings, or why it cannot have one."""
        return MoeList.from_json(self._call(Routes.MOE_EXPORTS, query={"version": version}, name=forest))

    def moe(self, forest: str, moe_id: int) -> Moe:
        return Moe.from_json(self._call(Routes.MOE, name=forest, moe_id=moe_id))

    def moe_export(self, forest: str, version: int | None = None, experts_per_token: int | None = None,
                   backbone: str = "uniform", domain: str | None = None, log: Log = _quiet) -> Moe:
        """A version's MoE export with these options (default: the current version), built by the
        coordinator if it is new; waits until it is ready."""
        m = self._call(Routes.REQUEST_MOE, {"experts_per_token": experts_per_token, "backbone": backbone,
                                            "domain": domain}, query={"version": version}, name=forest)
        return self._ready(forest, Moe.from_json(m), "the MoE export", log)

    def _ready(self, forest: str, m: Moe, what: str, log: Log) -> Moe:
        if m.status == "requested":
            log(f"{what} (MoE {m.id}) is being built")
            m = self.wait(lambda: self.moe(forest, m.id), lambda x: x.status != "requested")
        if m.status == "failed":
            raise ClientError(f"the coordinator could not build {what} (MoE {m.id}): {m.error}")
        return m

    def download_moe(self, forest: str, dest: Path, version: int | None = None, experts_per_token: int | None = None,
                     backbone: str = "uniform", domain: str | None = None, moe_id: int | None = None,
                     log: Log = _quiet) -> Moe:
        """A version as one native mixture-of-experts model in `dest` (each file checked against
        its sha256), or the MoE export or tuning `moe_id`. Returns its description."""
        if moe_id is not None:
            m = self._ready(forest, self.moe(forest, moe_id), "the MoE model", log)
        else:
            m = self.moe_export(forest, version, experts_per_token, backbone, domain, log)
        self.download_files(m.files, m.urls, dest, log)
        return m

    def tune_router(self, forest: str, steps: int, version: int | None = None, whole: bool = False,
                    batch_size: int = 8, block_size: int = 128, lr: float = 1e-3, experts_per_token: int | None = None,
                    backbone: str = "uniform", domain: str | None = None, moe_id: int | None = None,
                    log: Log = _quiet) -> Moe:
        """For maintainers: tune the routers of a version's MoE export (made first if need be, or
        the export `moe_id`) on the coordinator; waits until the tuned model is ready."""
        parent = (self._ready(forest, self.moe(forest, moe_id), "the MoE export", log) if moe_id is not None
                  else self.moe_export(forest, version, experts_per_token, backbone, domain, log))
        t = self._call(Routes.TUNE_MOE, {"steps": steps, "whole": whole, "batch_size": batch_size,
                                         "block_size": block_size, "lr": lr}, name=forest, moe_id=parent.id)
        return self._ready(forest, Moe.from_json(t), "the router tuning", log)

    # ------------------------------------------------------------------ values

    def values(self, forest: str, version: int | None = None, wait: float = 0, log: Log = _quiet) -> VersionValues:
        """A version's values (default: the current one) per ELM and domain: leave-one-out and
        Shapley. With `wait` seconds, a 409 (not evaluated yet, values being computed) is
        waited out; otherwise it is raised with what to wait for."""
        return VersionValues.from_json(self._values(Routes.VALUES, forest, version, wait, log))

    def contributor_values(self, forest: str, version: int | None = None, wait: float = 0,
                           log: Log = _quiet) -> ContributorValues:
        """A version's values per contributor, and the wanted domains (as `values` waits)."""
        return ContributorValues.from_json(self._values(Routes.CONTRIBUTOR_VALUES, forest, version, wait, log))

    def _values(self, route: Route, forest: str, version: int | None, wait: float, log: Log) -> dict:
        version = version or self.forest(forest).current_version
        end = time.monotonic() + wait
        while True:
            try:
                return self._call(route, name=forest, number=version)
            except ClientError as e:
                if e.status != 409 or time.monotonic() > end:
                    raise
                log(str(e))
                time.sleep(2)

    def merge_preview(self, cid: int) -> MergePreview:
        """What merging an evaluated contribution would change on every domain (maintainers)."""
        return MergePreview.from_json(self._call(Routes.MERGE_PREVIEW, cid=cid))

    # ------------------------------------------------------------------ branch, submit, follow

    def request_branch(self, forest: str, domain: str, data: Path | None = None, private: bool = False,
                       method: str = "posterior", wait: bool = True, log: Log = _quiet,
                       max_sample_bytes: int = 1 << 20) -> BranchInit:
        """Ask for a branch init of the forest's current version for `domain`. With `data`, a
        small sample of it is uploaded for the posterior; with `data` and `private`, the
        posterior and the ELM's routing vector are computed here (no text is sent) and the
        vector comes back as the init's `routing_vector`, which `download_init` keeps."""
        body: dict = {"forest": forest, "domain": domain, "method": method}
        vector = None
        if data is not None and private:
            with tempfile.TemporaryDirectory() as td:
                vector = self._private_routing_vector(forest, data, Path(td), log)
                post = (self._private_posterior(forest, data, Path(td), log=log)[0]
                        if method in ("posterior", "argmax") else {})
            if post:
                body["posterior"] = post
        elif data is not None and method in ("posterior", "argmax"):
            with tempfile.TemporaryDirectory() as td:
                s = local.sample_file(data, max_sample_bytes, Path(td) / "sample.jsonl")
                body["sample_sha256"] = self.upload(s, "sample").sha256
        b = BranchInit.from_json(self._call(Routes.REQUEST_BRANCH, body))
        if wait and b.status == "requested":
            log(f"branch init {b.id} is being computed")
            b = self.wait(lambda: self.branch_init(b.id), lambda x: x.status != "requested")
        if b.status == "failed":
            raise ClientError(f"the coordinator could not compute branch init {b.id}: {b.error}")
        return b.with_routing_vector(vector) if vector is not None else b

    def branch_init(self, init_id: int) -> BranchInit:
        return BranchInit.from_json(self._call(Routes.BRANCH_INIT, init_id=init_id))

    def _private_routing_vector(self, forest: str, data: Path, work: Path, log: Log = _quiet) -> list[float]:
        """The new ELM's routing vector, computed here: the forest's seed comes down (one model,
        removed again after) and only the vector goes to the coordinator; the text stays here."""
        d = self.forest_files(forest)
        files = d.manifest.seed.files
        seed = self.download_files(files, {k: d.files[f"seed/{k}"] for k in files}, work / "seed", log)
        log("computing the routing vector of your text under the forest's seed")
        try:
            return local.routing_vector(seed, data)
        finally:
            shutil.rmtree(seed, ignore_errors=True)

    def _private_posterior(self, forest: str, data: Path, work: Path, block_size: int = 256, max_blocks: int = 100,
                           log: Log = _quiet) -> tuple[dict[str, float], int]:
        """The domain posterior over the current version's ELMs, computed here: the ELMs come
        down one at a time (memory and disk of one ELM) and only the weights go back."""
        d = self.forest_files(forest)
        m = d.manifest
        if not m.elms:
            return {}, m.version
        tok_files = {k: v for k, v in m.seed.files.items() if k.startswith(TOKENIZER_PREFIX) or k == CONFIG}
        tok_dir = self.download_files(tok_files, {k: d.files[f"seed/{k}"] for k in tok_files}, work / "tokenizer", log)
        blocks = local.sample_blocks(tok_dir, data, block_size, max_blocks)
        cols = []
        for e in m.elms:
            log(f"scoring the sample under {e.name}")
            edir = work / "elm"
            shutil.rmtree(edir, ignore_errors=True)
            self.download_files(e.files, {k: d.files[f"{e.path}/{k}"] for k in e.files}, edir)
            cols.append(local.logliks(edir, blocks))
            shutil.rmtree(edir, ignore_errors=True)
        return local.posterior([e.name for e in m.elms], cols), m.version

    def download_init(self, branch: BranchInit | dict, dest: Path, log: Log = _quiet) -> Path:
        """The init's files; its card's `origin` names the forest, version and branch init (and
        the routing vector computed here, for a private request), and `elmforest train` carries
        it into the ELM, so `submit` knows what it was trained from."""
        branch = BranchInit.from_json(branch)
        out = self.download_files(branch.files, branch.urls, dest, log)
        if branch.routing_vector is not None:
            local.set_init_vector(out, branch.routing_vector)
        return out

    def submit(self, elm_dir: Path, forest: str | None = None, branch_init_id: int | None = None,
               name: str | None = None, progress: Progress | None = None, log: Log = _quiet) -> Contribution:
        """Upload a trained ELM (resumable: run it again after an interruption and it continues
        from the last part that arrived)."""
        from btm.family import read_card
        from btm.tokenizer import load_tokenizer, tokenizer_sha256

        elm_dir = Path(elm_dir)
        weights = elm_dir / WEIGHTS_FILE
        if not weights.exists():
            raise ClientError(f"{elm_dir}: no model.safetensors; train the ELM first (`elmforest train`)")
        card = read_card(elm_dir)
        info = card.origin or {}
        forest = forest or info.get("forest")
        branch_init_id = branch_init_id or info.get("branch_init_id")
        if not forest or not branch_init_id:
            raise ClientError(f"{elm_dir}: which branch init was this trained from? pass --forest and --branch-init")
        sha = sha256_file(weights)
        body = {
            "forest": forest, "branch_init_id": branch_init_id, "forest_version": info.get("version"),
            "name": name, "sha256": sha, "size": weights.stat().st_size,
            "config": json.loads((elm_dir / CONFIG).read_text()),
            "tokenizer_sha256": tokenizer_sha256(load_tokenizer(elm_dir)),
            "training": {**card.training, "data": card.data},
        }
        if info.get("routing_vector") is not None and info.get("forest") == forest:  # computed where it was trained privately
            body["routing_vector"] = info["routing_vector"]
        return self._send_elm(weights, Routes.CREATE_CONTRIBUTION, {}, body, elm_dir / ".elmforest-submit.json",
                              progress, log)

    def import_checkpoint(self, forest: str, source: str, domain: str, name: str | None = None,
                          revision: str | None = None, progress: Progress | None = None,
                          log: Log = _quiet) -> Contribution:
        """For maintainers: bring an existing checkpoint (a local directory, or a Hub id
        `org/name[@rev]` fetched through huggingface_hub) into a forest as the ELM of `domain`.
        It is validated like a contribution and evaluated against the forest's seed."""
        from btm.family import read_card
        from btm.hub import resolve
        from btm.tokenizer import load_tokenizer, tokenizer_sha256

        r = resolve(source, revision)
        weights = r.path / WEIGHTS_FILE
        if not weights.exists():
            raise ClientError(f"{source}: no single model.safetensors (sharded or missing weights); an import uploads "
                              "one file: save the model with save_pretrained(..., max_shard_size='1000GB') first")
        where = r.source or {"path": str(Path(source).resolve()),
                             "files": {f.name: sha256_file(f) for f in sorted(r.path.iterdir()) if f.is_file()}}
        card = read_card(r.path)
        body = {
            "domain": domain, "name": name, "sha256": where["files"][WEIGHTS_FILE], "size": weights.stat().st_size,
            "config": json.loads((r.path / CONFIG).read_text()),
            "tokenizer_sha256": tokenizer_sha256(load_tokenizer(r.path)),
            "source": {k: where[k] for k in ("hub", "revision", "requested", "path", "files") if k in where},
            "training": {**card.training, "data": card.data} if card.training or card.data else {},
        }
        # the resume state lives with the client, not in the (possibly read-only) Hub cache
        state = config.config_dir() / "imports" / f"{forest}-{body['sha256'][:16]}.json"
        state.parent.mkdir(parents=True, exist_ok=True)
        return self._send_elm(weights, Routes.IMPORT, {"forest": forest}, body, state, progress, log)

    def _send_elm(self, weights: Path, create: Route, where: dict, body: dict, state_path: Path,
                  progress: Progress | None, log: Log) -> Contribution:
        """Declare an ELM at `create`, then send its weights in parts (resumable: run it again
        after an interruption and it continues from the last part that arrived; `state_path`
        remembers which contribution it was)."""
        sha = body["sha256"]
        try:
            state = json.loads(state_path.read_text()) if state_path.exists() else {}
        except ValueError:
            state = {}
        if state.get("sha256") != sha or state.get("url") != self.url:
            state = {}
        if not state.get("contribution_id"):
            r = self._call(create, body, **where)
            state = {"contribution_id": r["contribution"]["id"], "sha256": sha, "url": self.url}
            state_path.write_text(json.dumps(state))
            up = r["upload"]
            log(f"contribution {state['contribution_id']} created; uploading {weights.stat().st_size:,} bytes")
        else:
            c = self.contribution(state["contribution_id"])
            if c.state != "uploading":
                state_path.unlink(missing_ok=True)
                return c
            up = self._call(Routes.CONTRIBUTION_UPLOAD, cid=state["contribution_id"])
            log(f"resuming the upload of contribution {state['contribution_id']} ({len(up['parts_done'])} parts "
                "already sent)")
        self.put_parts(weights, up, progress)
        c = self._complete(Routes.COMPLETE_CONTRIBUTION, cid=state["contribution_id"])
        state_path.unlink(missing_ok=True)
        return Contribution.from_json(c)

    def contributions(self, mine: bool = False, state: str | None = None, forest: str | None = None) -> list[Contribution]:
        """Contributions (yours with `mine`), by state and forest (without their histories)."""
        query = {"mine": True if mine else None, "state": state, "forest": forest}
        return [Contribution.from_json(x) for x in self._call(Routes.CONTRIBUTIONS, query=query)]

    def contribution(self, cid: int) -> Contribution:
        """A contribution with its state, its job and its history."""
        return Contribution.from_json(self._call(Routes.CONTRIBUTION, cid=cid))

    def follow(self, cid: int, until: set[str] | None = None, timeout: float = 3600,
               on_change: Callable[[Contribution], None] | None = None) -> Contribution:
        """Poll a contribution until it reaches one of `until` (default: SETTLED), or until the
        job working on it fails (then it waits for a maintainer's retry or its owner's
        decision, not for us)."""
        until = until or SETTLED
        seen = {"state": None}

        def poll(x: Contribution) -> None:
            if x.state != seen["state"]:
                seen["state"] = x.state
                if on_change:
                    on_change(x)

        def settled(x: Contribution) -> bool:
            return x.state in until or (x.job is not None and x.job.status == "failed")

        return self.wait(lambda: self.contribution(cid), settled, timeout=timeout, on_poll=poll)

    def abandon(self, cid: int, reason: str = "") -> Contribution:
        """Withdraw one of your contributions (before it is merged); its weights are deleted."""
        return Contribution.from_json(self._call(Routes.ABANDON, {"reason": reason}, cid=cid))

    def download_elm(self, cid: int, dest: Path, log: Log = _quiet) -> Contribution:
        """One ELM (a contribution) as a model directory, each file checked against its sha256."""
        d = Files.from_json(self._call(Routes.CONTRIBUTION_FILES, cid=cid))
        x = self.contribution(cid)
        self.download_files(d.files, d.urls, dest, log)
        return x

    # ------------------------------------------------------------------ review (maintainers)

    def approve(self, cid: int, reason: str = "") -> Contribution:
        """Approve an evaluated contribution: it is merged at the next publish."""
        return Contribution.from_json(self._call(Routes.APPROVE, {"reason": reason}, cid=cid))

    def decline(self, cid: int, reason: str) -> Contribution:
        """Decline a contribution; its owner reads why, and its weights are deleted."""
        return Contribution.from_json(self._call(Routes.DECLINE, {"reason": reason}, cid=cid))

    def remove(self, cid: int, reason: str, wait: bool = True) -> Job:
        """Forget a merged ELM: a new version without it; with `wait`, the finished job."""
        job = Job.from_json(self._call(Routes.REMOVE, {"reason": reason}, cid=cid))
        return self.finish(job, "removal") if wait else job

    def jobs(self, status: str | None = None) -> list[Job]:
        """Jobs (yours; maintainers: all), e.g. status="failed"."""
        return [Job.from_json(x) for x in self._call(Routes.JOBS, query={"status": status})]

    def job(self, job_id: int) -> Job:
        return Job.from_json(self._call(Routes.JOB, job_id=job_id))

    def retry_job(self, job_id: int) -> Job:
        """Run a failed job again (maintainers); it is queued, not waited for."""
        return Job.from_json(self._call(Routes.RETRY_JOB, job_id=job_id))

    def finish(self, job: Job | dict, what: str) -> Job:
        """Wait for a job the coordinator started; its result, or a ClientError naming `what` failed."""
        job = self.wait(lambda: self.job(job["id"]), lambda x: x.status in ("succeeded", "failed"))
        if job.status == "failed":
            raise ClientError(f"{what} failed: {job.error}")
        return job

    # ------------------------------------------------------------------ federated rounds

    def start_round(self, forest: str, note: str = "", **settings: Any) -> Round:
        """Create a federated round of `forest` (maintainers); `settings` as the API's RoundIn
        takes them: steps, batch_size, block_size, lr, min_nodes, node_wait_s, query_timeout_s,
        branch_timeout_s, init_timeout_s, train_timeout_s, max_attempts, ...; one not given is
        btm.round_config.RoundConfig's default."""
        body = {"forest": forest, "note": note, **RoundConfig().to_dict(), **settings}
        return Round.from_json(self._call(Routes.START_ROUND, body))

    def rounds(self, forest: str | None = None) -> list[Round]:
        return [Round.from_json(x) for x in self._call(Routes.ROUNDS, query={"forest": forest})]

    def round(self, round_id: int) -> Round:
        return Round.from_json(self._call(Routes.ROUND, round_id=round_id))

    def cancel_round(self, round_id: int) -> Round:
        """Stop a pending or running round (ELMs already uploaded stay)."""
        return Round.from_json(self._call(Routes.CANCEL_ROUND, round_id=round_id))
