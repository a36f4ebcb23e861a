"""`elmforest` commands for contributors and maintainers talking to a coordinator over HTTP:
login, logout, whoami, domain, branch request, submit, status, abandon, token, invite,
download, review, round, register-seed, register-baseline, values; and the demo. Each parses
its options, calls the typed API (api.Coordinator) and prints what it answered."""

from __future__ import annotations

import contextlib
import getpass
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from btm.round_config import RoundConfig
from contributor_client import commands, config
from contributor_client.api import SETTLED, Coordinator
from contributor_client.http import ClientError
from contributor_client.records import Contribution, Moe, Round

console = Console(stderr=True)
out = Console()

Url = Annotated[str | None, typer.Option("--url", help="The coordinator (default: the one you logged in to, or ELMFOREST_URL).")]


def client(url: str | None = None, need_login: bool = True, token: str | None = None) -> Coordinator:
    return Coordinator.from_login(url, token, need_login)


def _log(msg: str) -> None:
    console.print(f"[dim]{msg}[/dim]")


# ----------------------------------------------------------------------------- accounts


def login(
    url: Annotated[str, typer.Option(help="The coordinator's URL.")] = config.DEFAULT_URL,
    username: Annotated[str | None, typer.Option(help="Your username (asked if not given).")] = None,
    password: Annotated[str | None, typer.Option(help="Your password (asked if not given).")] = None,
    token: Annotated[str | None, typer.Option(help="Store this API token instead of logging in with a password.")] = None,
    register: Annotated[bool, typer.Option("--register", help="Create the account first.")] = False,
    invite: Annotated[str | None, typer.Option(help="An invitation code, where registration is invite-only.")] = None,
):
    """Log in to a coordinator; the API token is stored in your config directory (mode 0600).

    EXAMPLES
      elmforest login --url https://forest.example.org
      elmforest login --url http://127.0.0.1:8000 --username alice --register
    """
    c = Coordinator(url)
    if token:
        me = Coordinator(url, token).whoami()
        path = config.save(url, token, me.username)
    else:
        username = username or typer.prompt("username")
        password = password or getpass.getpass("password: ")
        r = c.register(username, password, invite) if register else c.login(username, password)
        path = config.save(url, r.token, r.user.username)
        me = r.user
    console.print(f"logged in to {url} as {me.username} ({me.role}); token saved in {path}")


def logout():
    """Forget the stored token.

    EXAMPLES
      elmforest logout
    """
    config.forget()
    console.print("logged out")


def whoami(url: Url = None):
    """Show who you are logged in as.

    EXAMPLES
      elmforest whoami
      elmforest whoami --url https://forest.example.org
    """
    me = client(url).whoami()
    out.print(f"{me.username} ({me.role}) at {url if url else config.load().url}")


# ----------------------------------------------------------------------------- domains

domain_app = typer.Typer(help="Domains on the coordinator: register, list, held-out data.", no_args_is_help=True)


@domain_app.command("register")
def domain_register(
    name: Annotated[str, typer.Argument(help="Short name, e.g. python_stdlib.")],
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Held-out documents (.jsonl/.txt) the coordinator evaluates ELMs on.")] = None,
    description: str = "",
    category: str = "",
    provenance: Annotated[str, typer.Option(help="Where the text comes from (a domain is defined by provenance).")] = "",
    license: str = "",
    role: Annotated[str, typer.Option(help="train, or eval (maintainers only).")] = "train",
    url: Url = None,
):
    """Register a domain (and, best at once, its held-out evaluation data).

    EXAMPLES
      elmforest domain register legal_contracts --provenance "EDGAR filings 2020" --eval-data held_out.jsonl
    """
    c = client(url)
    c.create_domain(name, description=description, category=category, provenance=provenance, license=license, role=role)
    console.print(f"domain {name} registered")
    if eval_data:
        c.set_eval_data(name, eval_data)
        console.print(f"held-out data for {name} uploaded")


@domain_app.command("eval-data")
def domain_eval_data(name: str, file: Annotated[Path, typer.Argument(help="A .jsonl or .txt file of held-out documents.")],
                     url: Url = None):
    """Upload a domain's held-out evaluation data.

    EXAMPLES
      elmforest domain eval-data legal held-out/legal.jsonl
    """
    if not file.exists():
        raise ClientError(f"{file}: file not found")
    client(url).set_eval_data(name, file)
    console.print(f"held-out data for {name} uploaded")


@domain_app.command("list")
def domain_list(url: Url = None):
    """List the coordinator's domains.

    EXAMPLES
      elmforest domain list
    """
    t = Table()
    for col in ("name", "role", "category", "held-out data", "provenance"):
        t.add_column(col)
    for d in client(url, need_login=False).domains():
        t.add_row(d.name, d.role, d.category, f"{d.eval_data_bytes or 0:,} B" if d.eval_data_sha256 else "none",
                  d.provenance[:50])
    out.print(t)


# ----------------------------------------------------------------------------- branch, submit, status


def branch_request(
    forest: Annotated[str, typer.Option(help="The forest to branch from (its current version).")],
    domain: Annotated[str, typer.Option(help="Your domain (registered on the coordinator).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to put the init (a model directory to train from).")],
    data: Annotated[Path | None, typer.Option(help="Your domain's text: a directory (train/valid splits) or a file.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Compute the posterior and the routing vector here; only those numbers are sent, no text.")] = False,
    method: Annotated[str, typer.Option(help="posterior (default), argmax, uniform or seed.")] = "posterior",
    url: Url = None,
):
    """Ask the coordinator for a branch init for your domain and download it.

    With --data a small sample of your text is uploaded so the coordinator can weigh the
    forest's ELMs; with --private the ELMs come down one at a time, the posterior is
    computed on this machine and only the weights go up (the seed comes down too: the ELM's
    routing vector is computed here, kept in the init and sent by `submit`).

    EXAMPLES
      elmforest branch request --forest demo --domain mine --data ~/mytexts --out runs/init
      elmforest branch request --forest demo --domain mine --data ~/mytexts --private --out runs/init
    """
    c = client(url)
    b = c.request_branch(forest, domain, data, private, method, log=_log)
    c.download_init(b, out_dir, log=_log)
    parents = ", ".join(f"{p.name} {p.weight:.2f}" for p in b.parents or [])
    console.print(f"branch init {b.id} ({forest} v{b.version}; parents: {parents}) saved to {out_dir}")
    console.print(f"next: elmforest train --init {out_dir} --data <your data> --out <elm dir>")


def _progress() -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=console, transient=True)


def submit(
    elm: Annotated[Path, typer.Argument(help="The trained ELM directory.")],
    forest: Annotated[str | None, typer.Option(help="Default: the forest of the init it was trained from.")] = None,
    branch_init: Annotated[int | None, typer.Option("--branch-init", help="Default: recorded by `branch request`.")] = None,
    name: Annotated[str | None, typer.Option(help="Its name in the forest (default: the domain).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until validated and evaluated.")] = False,
    url: Url = None,
):
    """Upload a trained ELM (resumable: interrupted, run it again and it continues).

    EXAMPLES
      elmforest submit runs/elm --wait
    """
    c = client(url)
    if not elm.is_dir():
        raise ClientError(f"{elm}: not a directory; pass the directory `elmforest train --out` wrote")
    with _progress() as prog:
        task = prog.add_task(f"uploading {elm.name}", total=None)
        x = c.submit(elm, forest, branch_init, name, progress=lambda done, total: prog.update(
            task, completed=done, total=total), log=_log)
    console.print(f"contribution {x.id} ({x.name}, domain {x.domain}) is {x.state}")
    if wait:
        _follow(c, x.id)


def abandon(
    cid: Annotated[int, typer.Argument(help="Your contribution's id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in its history).")] = "",
    url: Url = None,
):
    """Withdraw one of your contributions (before it is merged); its uploaded weights are deleted.

    EXAMPLES
      elmforest abandon 12 --reason "trained on the wrong split"
    """
    x = client(url).abandon(cid, reason)
    console.print(f"contribution {cid} is {x.state}")


# ----------------------------------------------------------------------------- tokens, invitations

token_app = typer.Typer(help="Your API tokens: list, create (with fewer scopes), revoke.", no_args_is_help=True)


@token_app.command("list")
def token_list(user: Annotated[str | None, typer.Option(help="Another user's tokens (admins).")] = None, url: Url = None):
    """Your tokens (their secrets are never shown again).

    EXAMPLES
      elmforest token list
      elmforest token list --user mallory     (admins)
    """
    t = Table()
    for col in ("id", "name", "prefix", "scopes", "expires", "last used", "revoked"):
        t.add_column(col)
    for x in client(url).tokens(user):
        t.add_row(str(x.id), x.name, x.prefix, ",".join(x.scopes), (x.expires_at or "never")[:10],
                  (x.last_used_at or "")[:19], (x.revoked_at or "")[:19])
    out.print(t)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="What it is for.")],
    scope: Annotated[list[str] | None, typer.Option("--scope", help="read, contribute or maintain (repeatable; "
                                                    "default: those of your current token).")] = None,
    days: Annotated[int | None, typer.Option(help="Days until it expires (default: the coordinator's token "
                                             "lifetime, ELMFOREST_TOKEN_TTL_DAYS).", show_default=False)] = None,
    url: Url = None,
):
    """A new token with at most your current token's scopes; printed once.

    EXAMPLES
      elmforest token create ci-readonly --scope read --days 30
    """
    r = client(url).create_token(name, scope or None, days)
    console.print(f"token {r.info.id} ({','.join(r.info.scopes)}), shown once:")
    print(r.token)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="The token's id (`elmforest token list`).")], url: Url = None):
    """Revoke a token (yours; admins: anyone's).

    EXAMPLES
      elmforest token revoke 4
    """
    x = client(url).revoke_token(token_id)
    console.print(f"token {x.id} ({x.name}) revoked")


def invite(
    note: Annotated[str, typer.Option(help="Who it is for (kept with it).")] = "",
    days: Annotated[int, typer.Option(help="Days until it expires.")] = 7,
    url: Url = None,
):
    """An invitation to register, for coordinators whose registration is invite-only (maintainers).

    EXAMPLES
      elmforest invite --note "Dana, legal texts"
      elmforest login --url URL --register --invite CODE        (what the new contributor runs)
    """
    r = client(url).create_invite(note, days)
    console.print(f"one-use invitation, valid until {r.expires_at[:16]} (shown once):")
    print(r.code)


def _follow(c: Coordinator, cid: int) -> Contribution:
    def show(x: Contribution) -> None:
        console.print(f"  {x.state:<11} {x.history[-1].reason if x.history else ''}")

    x = c.follow(cid, on_change=show)
    job = x.job
    if job is not None and job.status == "failed" and x.state not in SETTLED:
        raise ClientError(f"contribution {cid} is stuck at {x.state}: its {job.kind} job {job.id} failed: "
                          f"{job.error}. A maintainer can retry it (`elmforest review retry {job.id}`); "
                          f"you can abandon it (`elmforest abandon {cid}`)")
    if x.state == "evaluated" and x.evaluation:
        e = x.evaluation
        console.print(f"perplexity on {e['domain']}: {e['ppl']:.2f} (its init: {e['init_ppl']:.2f}); waiting for a maintainer")
    return x


def status(
    cid: Annotated[int | None, typer.Argument(help="A contribution id (default: list yours).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Keep watching until it settles.")] = False,
    url: Url = None,
):
    """Your contributions, or one contribution's state and history.

    EXAMPLES
      elmforest status
      elmforest status 12 --follow
    """
    c = client(url)
    if cid is None:
        t = Table()
        for col in ("id", "name", "domain", "forest", "state", "updated"):
            t.add_column(col)
        for x in c.contributions(mine=True):
            t.add_row(str(x.id), x.name, x.domain, x.forest, x.state, x.updated_at[:19])
        out.print(t)
        return
    if follow:
        _follow(c, cid)
        return
    x = c.contribution(cid)
    out.print(f"contribution {x.id} {x.name} ({x.domain}, {x.forest}): {x.state}")
    for h in x.history:
        out.print(f"  {h.at[:19]}  {h.to_state:<11} {h.actor or 'system':<10} {h.reason}")


# ----------------------------------------------------------------------------- downloads

download_app = typer.Typer(help="Download a forest version, one ELM, an averaged model or an MoE model.",
                           no_args_is_help=True)


@download_app.command("forest")
def download_forest(
    name: str,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the forest to.")],
    version: Annotated[int | None, typer.Option(help="Default: the current version.")] = None,
    url: Url = None,
):
    """A forest version as a local forest directory (use it with `elmforest eval`/`generate`).

    EXAMPLES
      elmforest download forest demo --out forest
    """
    client(url, need_login=False).download_forest(name, out_dir, version, log=_log)
    m = json.loads((out_dir / "forest.json").read_text())
    console.print(f"{name} v{m['version']} ({len(m['elms'])} ELMs) saved to {out_dir}")


@download_app.command("elm")
def download_elm(cid: int, out_dir: Annotated[Path, typer.Option("--out")], url: Url = None):
    """One ELM (a contribution) as a Hugging Face model directory.

    EXAMPLES
      elmforest download elm 12 --out elms/legal
    """
    x = client(url, need_login=False).download_elm(cid, out_dir, log=_log)  # each file's sha256 checked
    console.print(f"ELM {x.name} saved to {out_dir}")


@download_app.command("average")
def download_average(
    forest: str,
    out_dir: Annotated[Path, typer.Option("--out")],
    method: Annotated[str, typer.Option(help="posterior, argmax or uniform.")] = "posterior",
    domain: Annotated[str | None, typer.Option(help="The target domain (for posterior and argmax).")] = None,
    version: Annotated[int | None, typer.Option()] = None,
    url: Url = None,
):
    """An averaged model of a forest for a target domain (loads with transformers).

    EXAMPLES
      elmforest download average demo --domain go --out go-model
    """
    client(url).download_average(forest, out_dir, method, domain, version, log=_log)
    console.print(f"averaged model ({method}{' for ' + domain if domain else ''}) saved to {out_dir}")


Backbone = Annotated[str, typer.Option(help="Every tensor but the MLPs: uniform (the ELMs' average), posterior "
                                        "(weighted by --domain's posterior) or seed.")]


def _describe_moe(m: Moe) -> str:
    return (f"MoE {m.id} of {m.forest} v{m.version} ({m.experts_per_token} expert(s) per token, "
            f"{m.backbone} backbone" + (f" for {m.target}" if m.target else "") + ")")


@download_app.command("moe")
def download_moe(
    forest: str,
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    version: Annotated[int | None, typer.Option(help="Default: the current version.")] = None,
    experts_per_token: Annotated[int | None, typer.Option("--experts-per-token", help="Experts each token runs (default 2, or every ELM when there are fewer).")] = None,
    backbone: Backbone = "uniform",
    domain: Annotated[str | None, typer.Option(help="The target domain of the posterior backbone.")] = None,
    moe_id: Annotated[int | None, typer.Option("--id", help="An MoE export or router tuning by its id (the web page and `review tune-router` name it).")] = None,
    url: Url = None,
):
    """A forest version as one native mixture-of-experts model (Mixtral for Llama and Mistral
    forests, Qwen2-MoE for Qwen2), built by the coordinator if nobody asked for it before; each
    file is checked against its sha256. It loads with plain transformers.

    EXAMPLES
      elmforest download moe demo --out demo-moe
      elmforest download moe demo --version 3 --experts-per-token 1 --backbone posterior --domain go --out go-moe
      elmforest download moe demo --id 7 --out demo-moe-tuned
    """
    m = client(url).download_moe(forest, out_dir, version, experts_per_token, backbone, domain, moe_id, log=_log)
    console.print(f"{_describe_moe(m)} saved to {out_dir}")


# ----------------------------------------------------------------------------- maintainers

review_app = typer.Typer(help="For maintainers: the review queue (list), what a merge would change (preview), jobs, "
                                "retry, import, approve, decline, publish, remove, tune-router.",
                         no_args_is_help=True)


@review_app.command("list")
def review_list(state: str = "evaluated", url: Url = None):
    """Contributions waiting for a decision (default: evaluated).

    EXAMPLES
      elmforest review list
      elmforest review list --state validated
    """
    c = client(url)
    t = Table()
    for col in ("id", "name", "owner", "domain", "ppl", "init ppl", "forest ppl"):
        t.add_column(col)
    for x in c.contributions(state=state):
        e = x.evaluation or {}

        def num(k, e=e):
            return f"{e[k]:.2f}" if isinstance(e.get(k), (int, float)) else "not evaluated"

        t.add_row(str(x.id), x.name, x.owner, x.domain, num("ppl"), num("init_ppl"),
                  num("forest_ensemble_ppl") if e else "not evaluated")
    out.print(t)


@review_app.command("jobs")
def review_jobs(url: Url = None):
    """Jobs that failed, with the reason (retry one with `elmforest review retry JOB`).

    EXAMPLES
      elmforest review jobs
    """
    t = Table()
    for col in ("job", "kind", "on", "why"):
        t.add_column(col)
    for j in client(url).jobs(status="failed"):
        t.add_row(str(j.id), j.kind, j.key, j.error or "")
    out.print(t)


@review_app.command("retry")
def review_retry(job: Annotated[int, typer.Argument(help="A failed job's id.")], wait: bool = True, url: Url = None):
    """Run a failed job again (maintainers).

    EXAMPLES
      elmforest review retry 17
    """
    c = client(url)
    j = c.retry_job(job)
    console.print(f"job {j.id} ({j.kind}) queued again")
    if wait:
        j = c.finish(j, f"job {job}")
        console.print(f"job {j.id} {j.status}")


@review_app.command("import")
def review_import(
    forest: Annotated[str, typer.Argument(help="The forest to import into.")],
    source: Annotated[str, typer.Argument(help="A model directory, or a Hub id org/name[@revision].")],
    domain: Annotated[str, typer.Option(help="The registered domain it is the expert of.")],
    name: Annotated[str | None, typer.Option(help="Its name in the forest (default: the domain).")] = None,
    revision: Annotated[str | None, typer.Option(help="A Hub revision (branch, tag or commit).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until validated and evaluated.")] = False,
    url: Url = None,
):
    """Import an existing checkpoint of the forest's family into FOREST (maintainers). It is
    validated like a contribution, evaluated against the seed, and shown as imported in the
    lineage; approve and publish it as usual.

    EXAMPLES
      elmforest review import demo runs/python-finetune --domain python --wait
      HF_HUB_OFFLINE=1 elmforest review import demo example/tiny-llama-python@main --domain python
    """
    c = client(url)
    with _progress() as prog:
        task = prog.add_task(f"uploading {source}", total=None)
        x = c.import_checkpoint(forest, source, domain, name, revision, progress=lambda done, total:
                                prog.update(task, completed=done, total=total), log=_log)
    console.print(f"contribution {x.id} ({x.name}, domain {x.domain}, imported) is {x.state}")
    if wait:
        _follow(c, x.id)


@review_app.command("tune-router")
def review_tune_router(
    forest: str,
    steps: Annotated[int, typer.Option(help="Training updates (the coordinator bounds them: ELMFOREST_MOE_TUNE_MAX_STEPS).")] = 100,
    version: Annotated[int | None, typer.Option(help="Default: the current version.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Train every tensor, not only the routers (as Branch-Train-MiX does).")] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences per update.")] = 8,
    block_size: Annotated[int, typer.Option(help="Tokens per sequence (at most the model's context).")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    experts_per_token: Annotated[int | None, typer.Option("--experts-per-token", help="Of the MoE export to tune (made first if need be).")] = None,
    backbone: Backbone = "uniform",
    domain: Annotated[str | None, typer.Option(help="The target domain of the posterior backbone.")] = None,
    moe_id: Annotated[int | None, typer.Option("--moe", help="Tune this MoE export (its id) instead.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Also download the tuned model here.")] = None,
    url: Url = None,
):
    """Tune the routers of a version's MoE export on the coordinator (maintainers): a job trains
    them (or every tensor, --all) on a balanced mix of the domains' text with the load-balancing
    loss. The tuned model is a new artifact with its recipe in its card.

    EXAMPLES
      elmforest review tune-router demo --version 3 --steps 200
      elmforest review tune-router demo --moe 7 --steps 500 --all --lr 1e-4 --out demo-btx
    """
    c = client(url)
    t = c.tune_router(forest, steps, version, all_, batch_size, block_size, lr, experts_per_token, backbone, domain,
                      moe_id, log=_log)
    console.print(f"{_describe_moe(t)}: routers tuned from MoE {t.parent_id} ({t.tuning['what']}, "
                  f"{t.tuning['steps']} steps)")
    if out_dir is not None:
        c.download_files(t.files, t.urls, out_dir, log=_log)
        console.print(f"saved to {out_dir}")


@review_app.command("approve")
def review_approve(cid: int, reason: str = "", url: Url = None):
    """Approve an evaluated contribution: it is merged at the next publish.

    EXAMPLES
      elmforest review approve 12 --reason "beats its init on legal"
    """
    x = client(url).approve(cid, reason)
    console.print(f"contribution {cid} is {x.state}")


@review_app.command("decline")
def review_decline(cid: int, reason: Annotated[str, typer.Option(help="Why (recorded).")], url: Url = None):
    """Decline a contribution; the owner reads why, and its weights are deleted.

    EXAMPLES
      elmforest review decline 13 --reason "trained on the held-out split"
    """
    x = client(url).decline(cid, reason)
    console.print(f"contribution {cid} is {x.state}")


@review_app.command("publish")
def review_publish(forest: str, note: str = "", url: Url = None):
    """Merge every approved contribution into a new version of FOREST.

    EXAMPLES
      elmforest review publish debian --note "adds legal"
    """
    job = client(url).publish(forest, note)
    console.print(f"{forest} v{job.result['version']} published")


@review_app.command("remove")
def review_remove(cid: int, reason: Annotated[str, typer.Option(help="Why (recorded in the version).")], url: Url = None):
    """Forget a merged ELM: a new version without it.

    EXAMPLES
      elmforest review remove 7 --reason "license withdrawn"
    """
    job = client(url).remove(cid, reason)
    console.print(f"removed; forest is now v{job.result['version']}")


def register_seed(
    name: Annotated[str, typer.Argument(help="The new forest's name.")],
    seed_dir: Annotated[Path, typer.Argument(help="The seed LM directory (from `elmforest seed`).")],
    description: str = "",
    url: Url = None,
):
    """Upload a seed LM and register it as the root of a new forest (maintainers).

    EXAMPLES
      elmforest register-seed debian runs/seed --description "8 Debian domains"
    """
    c = client(url)
    with _progress() as prog:
        task = prog.add_task("uploading the seed", total=None)
        f, created = c.register_seed(name, seed_dir, description,
                                     progress=lambda d, t: prog.update(task, completed=d, total=t))
    if created:
        console.print(f"forest {f.name} created (version {f.current_version}, family {f.family})")
    else:
        console.print(f"forest {f.name} already has this seed as its root; nothing to do")


def register_baseline(
    forest: Annotated[str, typer.Argument(help="The forest it is compared with.")],
    name: Annotated[str, typer.Argument(help="Its name on the leaderboard, e.g. dense.")],
    model_dir: Annotated[Path, typer.Argument(help="The model directory (e.g. from `elmforest seed --kind dense`).")],
    description: str = "",
    url: Url = None,
):
    """Register a baseline (e.g. the compute-matched dense LM) that the leaderboard scores (maintainers).

    EXAMPLES
      elmforest register-baseline debian dense runs/dense
    """
    b = client(url).register_baseline(forest, name, model_dir, description)
    console.print(f"baseline {b.name} registered for {forest}; it is scored when a version is evaluated")


# ----------------------------------------------------------------------------- federated rounds

round_app = typer.Typer(help="For maintainers: federated BTM rounds over Flower nodes (see docs/federated.md).",
                        no_args_is_help=True)
Token = Annotated[str | None, typer.Option("--token", show_default=False,
                                           help="A maintainer's API token (default: your login's, or ELMFOREST_TOKEN).")]
ACTIVE_ROUND = ("pending", "running")

# `round start --node` simulates the nodes in this process, which needs the coordinator's
# database; the `elmforest` command wires that in (this package does not import the coordinator)
_simulate: dict = {"round": None}


def _print_round(r: Round) -> None:
    out.print(f"round {r.id}  forest {r.forest}" + (f" v{r.version}" if r.version else "")
              + f"  [bold]{r.status}[/bold]" + (f"  flower run {r.flower_run_id}" if r.flower_run_id else "")
              + (f"\n  [red]{r.error}[/red]" if r.error else ""))
    if not r.nodes:
        return
    t = Table("node", "domain", "owner", "status", "contribution", "why", show_lines=False)
    for n in r.nodes:
        c = f"{n.contribution_id} ({n.contribution_state})" if n.contribution_id else ""
        t.add_row(n.node_id, n.domain or "?", n.owner or "", n.status, c, n.reason)
    out.print(t)


@round_app.command("start")
def round_start(
    forest: Annotated[str, typer.Argument(help="The forest the round grows.")],
    superlink: Annotated[str | None, typer.Option(help="The SuperLink connection (a name in $FLWR_HOME/config.toml; "
                                                  "default: its default one).")] = None,
    node: Annotated[list[str] | None, typer.Option("--node", help="Simulate instead, on this machine: one in-process "
                                                   "node per --node, given as its node config, e.g. \"domain='python' "
                                                   "data-dir='/data/py' token-file='~/.tok'\" (needs the database).")] = None,
    steps: Annotated[int, typer.Option(help="Training updates per node.")] = RoundConfig.steps,
    batch_size: Annotated[int, typer.Option(help="Sequences per update.")] = RoundConfig.batch_size,
    block_size: Annotated[int, typer.Option(help="Tokens per sequence.")] = RoundConfig.block_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = RoundConfig.lr,
    min_nodes: Annotated[int, typer.Option(help="Start once this many nodes are connected...")] = RoundConfig.min_nodes,
    node_wait: Annotated[float, typer.Option(help="...or after this many seconds with at least one.")] = RoundConfig.node_wait_s,
    query_timeout: Annotated[float, typer.Option(help="Seconds for the nodes to say their domain and data size.")] = RoundConfig.query_timeout_s,
    branch_timeout: Annotated[float, typer.Option(help="Seconds for the nodes to score their data and request inits.")] = RoundConfig.branch_timeout_s,
    init_timeout: Annotated[float, typer.Option(help="Seconds for the coordinator to compute the inits.")] = RoundConfig.init_timeout_s,
    train_timeout: Annotated[float, typer.Option(help="Seconds for training and uploading (the round's time-out).")] = RoundConfig.train_timeout_s,
    max_attempts: Annotated[int, typer.Option(help="Rounds in a row a domain may fail before it is no longer asked.")] = RoundConfig.max_attempts,
    note: Annotated[str, typer.Option(help="Why this round (kept with it).")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the round until it finishes.")] = True,
    url: Url = None,
    token: Token = None,
):
    """Start a synchronous BTM round over the connected Flower nodes.

    Every node branches from the forest, trains an ELM on its own domain and uploads it for
    validation, evaluation and review, as the node owner's contribution.

    The round is created at the coordinator (as you), then submitted to the SuperLink with
    `flwr run`; its ServerApp runs next to the SuperLink with the coordinator's settings.

    EXAMPLES
      elmforest round start demo --superlink federation --steps 300
      elmforest round start demo --node "domain='python' data-dir='data/python' token-file='alice.tok'" \\
        --node "domain='go' data-dir='data/go' token-file='bob.tok'" --steps 20     (simulated here)
    """
    import tempfile

    from contributor_client import flower_run

    c = client(url, token=token)
    r = c.start_round(forest, note, steps=steps, batch_size=batch_size, block_size=block_size, lr=lr,
                      min_nodes=min_nodes, node_wait_s=node_wait, query_timeout_s=query_timeout,
                      branch_timeout_s=branch_timeout, init_timeout_s=init_timeout, train_timeout_s=train_timeout,
                      max_attempts=max_attempts)
    console.print(f"round {r.id} created for forest {forest}")
    if node:
        from flwr.common.config import parse_config_args

        configs = [parse_config_args([n]) for n in node]
        console.print(f"simulating {len(configs)} nodes in this process")
        _print_round(Round.from_json(_simulate["round"](r.id, configs)))
        return
    with tempfile.TemporaryDirectory() as td:
        app_dir = flower_run.write_app(Path(td) / flower_run.APP_NAME)
        try:
            run_id = flower_run.submit(r.id, app_dir, superlink)
        except (flower_run.SubmitError, OSError) as e:
            c.cancel_round(r.id)
            raise ClientError(f"{e}\n(round {r.id} cancelled)") from None
    console.print(f"submitted as Flower run {run_id}; follow it with `elmforest round status {r.id}`")
    print(r.id)
    if wait:
        r = _follow_round(c, r, run_id)
        _print_round(r)
        if r.status not in ("succeeded", "partial", "empty"):
            raise typer.Exit(1)


def _follow_round(c: Coordinator, r: Round, run_id: str) -> Round:
    """Poll a submitted round until it ends, printing each change of its nodes."""
    seen, submitted = None, time.monotonic()
    while r.status in ACTIVE_ROUND:
        time.sleep(3)
        r = c.round(r.id)
        if r.status == "pending" and time.monotonic() - submitted > 300:
            raise ClientError(f"no ServerApp picked round {r.id} up within 5 minutes; see `flwr log {run_id}` and "
                              "the SuperLink's log (does it run with the coordinator's ELMFOREST_* settings?), then "
                              f"`elmforest round cancel {r.id}`")
        key = (r.status, tuple((n.node_id, n.status) for n in r.nodes))
        if key != seen:
            seen = key
            console.print(f"  {r.status}: " + ", ".join(f"{n.domain or n.node_id} {n.status}" for n in r.nodes))
    return r


@round_app.command("status")
def round_status(
    round_id: Annotated[int | None, typer.Argument(help="A round (default: the recent ones).")] = None,
    forest: Annotated[str | None, typer.Option(help="Only this forest's rounds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: Url = None,
    token: Token = None,
):
    """A round's status and each node's part (or the recent rounds).

    EXAMPLES
      elmforest round status 3
      elmforest round status --forest demo --json
    """
    c = client(url, token=token)
    rows = [c.round(round_id)] if round_id is not None else c.rounds(forest)
    if as_json:
        print(json.dumps(rows[0].raw if round_id is not None else [r.raw for r in rows], indent=2))
        return
    if not rows:
        console.print("no rounds yet (`elmforest round start FOREST`)")
    for r in rows:
        _print_round(r)


@round_app.command("cancel")
def round_cancel(round_id: Annotated[int, typer.Argument()], url: Url = None, token: Token = None):
    """Stop a pending or running round (ELMs already uploaded stay).

    EXAMPLES
      elmforest round cancel 3
    """
    _print_round(client(url, token=token).cancel_round(round_id))


# ----------------------------------------------------------------------------- the demo


def demo(
    port: Annotated[int, typer.Option(help="Port for the coordinator and its web pages.")] = 8000,
    workdir: Annotated[Path, typer.Option("--dir", help="Where the demo keeps everything (reused when run again).")] = Path("elmforest-demo"),
    seed_steps: Annotated[int, typer.Option("--seed-steps", help="Seed LM updates.")] = 400,
    elm_steps: Annotated[int, typer.Option("--elm-steps", help="Updates per ELM.")] = 150,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Keep serving the leaderboard until Ctrl-C.")] = True,
):
    """The whole platform on this machine: coordinator, seed, two contributors, a maintainer.

    EXAMPLES
      elmforest demo
      elmforest demo --port 8080 --no-serve
    """
    import signal

    from contributor_client.demo import Demo, summary

    def _stop(signum, frame):  # SIGTERM: unwind like Ctrl-C, so the coordinator is stopped too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    d = Demo(workdir, port, seed_steps, elm_steps, lambda m: console.print(m))
    try:
        r = d.run()
        print()
        print(summary(r["leaderboard"]))
        print()
        console.print(f"[bold green]done in {time.monotonic() - d.t0:.0f}s.[/bold green] forest demo v{r['version']}: "
                      f"leaderboard at [bold]{d.url}/[/bold], API at {d.url}/docs")
        if serve:
            console.print("serving until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                d.server.wait()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        d.stop()


def values(
    forest: str,
    version: Annotated[int | None, typer.Option(help="The version (default: the current one).")] = None,
    contributors: Annotated[bool, typer.Option("--contributors", help="Per contributor, with the wanted domains.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the evaluation if it is not done.")] = 0,
    url: Url = None,
):
    """What each ELM (or contributor) adds to a forest version, on every domain: leave-one-out
    (how much worse the forest's perplexity is without it) and the Shapley value (nats per token
    over the seed; an ELM's share of the forest's improvement), with the standard error.

    EXAMPLES
      elmforest values demo
      elmforest values demo --version 3 --json
      elmforest values demo --contributors
    """
    c = client(url, need_login=False)
    rep = (c.contributor_values if contributors else c.values)(forest, version, wait, _log)
    if as_json:
        print(json.dumps(rep.raw, indent=2))
    else:
        out.print(commands.contributors_table(rep) if contributors else commands.values_table(rep), highlight=False)


@review_app.command("preview")
def review_preview(cid: int, as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
                   url: Url = None):
    """What merging a contribution would change: the forest's perplexity on its own domain and on
    every other, without and with it (from the cached scores of the forest and the candidate).

    EXAMPLES
      elmforest review preview 12
      elmforest review preview 12 --json
    """
    p = client(url).merge_preview(cid)
    if as_json:
        print(json.dumps(p.raw, indent=2))
    else:
        out.print(commands.preview_table(p), highlight=False)


def register(app: typer.Typer, panel: str) -> None:
    """Add the commands of contributors and maintainers (over HTTP) to `app`, under `panel`."""
    for name, fn in [("login", login), ("logout", logout), ("whoami", whoami), ("submit", submit),
                     ("status", status), ("abandon", abandon), ("invite", invite), ("register-seed", register_seed),
                     ("register-baseline", register_baseline), ("values", values)]:
        app.command(name, rich_help_panel=panel)(fn)
    for name, sub in [("domain", domain_app), ("token", token_app), ("download", download_app),
                      ("review", review_app), ("round", round_app)]:
        app.add_typer(sub, name=name, rich_help_panel=panel)
