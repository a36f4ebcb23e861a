"""`elmforest demo`: the whole platform on one machine, through its real parts.

Starts a coordinator on the embedded defaults with the `elmforest` command, as a user does
(the client reaches it over HTTP only), trains a small seed LM on the corpus that
ships with the project and registers it as a forest, then runs two contributors through the
client flow (branch request, local training, submit) in two rounds, so the second round's
ELMs branch from the posterior-weighted average of the first round's. A maintainer
approves and publishes each round; the leaderboard is served at the printed URL.
Running it again reuses what is done.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from btm.model_files import CARD
from contributor_client.api import Coordinator
from contributor_client.http import ClientError
from contributor_client.records import Contribution, Leaderboard

CORPUS = Path(__file__).resolve().parents[1] / "btm" / "demo_corpus"
FOREST = "demo"
ROUNDS = [  # (contributor, domain, private posterior?)
    [("alice", "python", False), ("bob", "kjv_bible", True)],
    [("alice", "postgres_docs", False), ("bob", "webster_dictionary", False)],
]
EVAL_DOMAINS = ["go"]


def elmforest_command() -> str:
    """The `elmforest` command installed with this package (next to this interpreter, else on
    PATH): the demo starts and administers its coordinator as a user does, so the client
    depends on the coordinator over HTTP only, never by importing or naming its modules."""
    here = Path(sys.executable).parent / "elmforest"
    found = str(here) if here.exists() else shutil.which("elmforest")
    if found is None:
        raise ClientError("the `elmforest` command is not installed next to this Python nor on PATH; "
                          "install the package (`pip install -e .` in the repository) and run the demo again")
    return found


class Demo:
    def __init__(self, workdir: Path, port: int, seed_steps: int, elm_steps: int, log):
        self.work = workdir.resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.seed_steps = seed_steps
        self.elm_steps = elm_steps
        self.log = log
        self.t0 = time.monotonic()
        self.server: subprocess.Popen | None = None
        self.env = {**os.environ, "ELMFOREST_DATA_DIR": str(self.work / "coordinator"), "ELMFOREST_PUBLIC_URL": self.url,
                    "ELMFOREST_EVAL_BLOCK_SIZE": "128", "ELMFOREST_EVAL_SCORED_BLOCKS": "24", "ELMFOREST_POSTERIOR_PRIOR_BLOCKS": "24"}

    def say(self, msg: str) -> None:
        t = time.monotonic() - self.t0
        self.log(f"[{int(t) // 60:02d}:{int(t) % 60:02d}] {msg}")

    # ------------------------------------------------------------------ steps

    def seed(self) -> Path:
        out = self.work / "seed"
        if (out / CARD).exists() and (out / "checkpoint" / "state.json").exists():
            self.say("seed LM already trained")
            return out
        from btm.data import Corpus
        from btm.family import new_model, preset_config
        from btm.recipes import train_seed
        from btm.tokenizer import iter_balanced_texts, load_tokenizer, train_bpe
        from btm.train import TrainConfig

        c = Corpus(CORPUS)
        names = c.names("train")
        tok_dir = self.work / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            self.say(f"training a byte-level BPE tokenizer on {', '.join(names)}")
            train_bpe(iter_balanced_texts({n: c[n].documents("train") for n in names}, 1_000_000), 4096).save_pretrained(str(tok_dir))
        tok = load_tokenizer(tok_dir)
        self.say(f"training the seed LM on a balanced mixture of {len(names)} domains ({self.seed_steps} updates)")
        cfg = TrainConfig(steps=self.seed_steps, batch_size=16, block_size=128, lr=2e-3, checkpoint_every=50)
        train_seed(new_model(preset_config("mini", tok)), tok, out, [c[n].split_path("train") for n in names], cfg,
                   data={"corpus": "btm/demo_corpus", "domains": names}, cache_dir=self.work / "tokens")
        return out

    def start_coordinator(self) -> None:
        probe = Coordinator(self.url)
        if probe.health(timeout=1) is not None:
            raise ClientError(f"something already listens on port {self.port}; stop it or pass --port")
        (self.work / "coordinator").mkdir(parents=True, exist_ok=True)
        log = open(self.work / "coordinator.log", "ab")
        self.server = subprocess.Popen([elmforest_command(), "serve", "--port", str(self.port)],
                                       env=self.env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.server.poll() is not None:
                raise ClientError(f"the coordinator exited; see {self.work / 'coordinator.log'}")
            if probe.health(timeout=2) == 200:
                self.say(f"coordinator running at {self.url} (data in {self.work / 'coordinator'})")
                return
            time.sleep(0.3)
        raise ClientError("the coordinator did not start within 2 minutes")

    def account(self, name: str, role: str = "contributor") -> Coordinator:
        f = self.work / "accounts" / f"{name}.json"
        if f.exists():
            saved = json.loads(f.read_text())
            return Coordinator(self.url, saved["token"])
        f.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(12)
        if role == "contributor":
            token = Coordinator(self.url).register(name, password).token
        else:  # maintainers are made by the operator, on the coordinator's machine
            r = subprocess.run([elmforest_command(), "user", "create", name, "--role", role, "--password", password],
                               env=self.env, capture_output=True, text=True, check=True)
            token = r.stdout.strip().splitlines()[-1]
        f.write_text(json.dumps({"username": name, "password": password, "token": token}))
        f.chmod(0o600)
        return Coordinator(self.url, token)

    def forest(self, maint: Coordinator, seed: Path) -> None:
        try:
            maint.forest(FOREST)
            self.say(f"forest {FOREST!r} already registered")
        except ClientError:
            self.say(f"registering the seed as the root of forest {FOREST!r}")
            maint.create_forest(FOREST, seed, "The demo forest: four Debian-sourced domains")

    def domains(self, maint: Coordinator, contributors: dict[str, Coordinator]) -> None:
        have = {d.name for d in maint.domains()}
        for rnd in ROUNDS:
            for who, dom, _ in rnd:
                if dom not in have:
                    contributors[who].create_domain(dom, description=f"{dom} text", provenance="Debian packages",
                                                    category="demo")
                    contributors[who].set_eval_data(dom, CORPUS / dom / "test.jsonl")
        for dom in EVAL_DOMAINS:
            if dom not in have:
                maint.create_domain(dom, description=f"{dom} text (never trained on)", role="eval", category="demo")
                maint.set_eval_data(dom, CORPUS / dom / "test.jsonl")

    def contribute(self, client: Coordinator, who: str, domain: str, private: bool) -> Contribution:
        done = [x for x in client.contributions(mine=True) if x.name == domain
                and x.state in ("evaluated", "approved", "merged")]
        if done:
            self.say(f"{who}: {domain} ELM already contributed ({done[0].state})")
            return done[0]
        from btm.data import Corpus
        from btm.recipes import train_elm
        from btm.train import TrainConfig

        base = self.work / "contributors" / who / domain
        how = "computing the posterior privately" if private else "with a sample of the text"
        self.say(f"{who}: requesting a branch init for {domain} ({how})")
        b = client.request_branch(FOREST, domain, CORPUS / domain, private=private)
        parents = ", ".join(f"{p.name} {p.weight:.2f}" for p in b.parents)
        self.say(f"{who}: init {b.id} from {FOREST} v{b.version}: {parents}")
        init = client.download_init(b, base / "init")
        self.say(f"{who}: training the {domain} ELM on local data ({self.elm_steps} updates)")
        cfg = TrainConfig(steps=self.elm_steps, batch_size=8, block_size=128, lr=1e-3, progress=False)
        train_elm(init, base / "elm", [Corpus(CORPUS)[domain].split_path("train")], cfg, domain=domain, name=domain,
                  data={"source": f"btm/demo_corpus/{domain}/train.jsonl"}, cache_dir=self.work / "tokens")
        c = client.submit(base / "elm")
        self.say(f"{who}: submitted contribution {c.id}; validating and evaluating")
        c = client.follow(c.id, timeout=600)
        e = c.evaluation or {}
        if c.state != "evaluated":
            raise ClientError(f"contribution {c.id} ended {c.state}: {c.history[-1].reason}")
        self.say(f"{who}: {domain} ELM evaluated: perplexity {e['ppl']:.1f} (its init: {e['init_ppl']:.1f})")
        return c

    def approve_and_publish(self, maint: Coordinator, contribs: list[Contribution]) -> None:
        pending = [c for c in contribs if c.state == "evaluated"]
        for c in pending:
            maint.approve(c.id, "beats its branch init; welcome")
        if not pending:
            return
        job = maint.publish(FOREST, "demo round: " + ", ".join(c.name for c in pending))
        self.say(f"maintainer approved {', '.join(c.name for c in pending)}; published {FOREST} v{job.result['version']}")

    def run(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        seed = self.seed()
        self.start_coordinator()
        maint = self.account("maintainer", "admin")
        contributors = {"alice": self.account("alice"), "bob": self.account("bob")}
        self.forest(maint, seed)
        self.domains(maint, contributors)
        for rnd in ROUNDS:
            contribs = [self.contribute(contributors[who], who, dom, private) for who, dom, private in rnd]
            self.approve_and_publish(maint, contribs)
        version = maint.forest(FOREST).current_version
        self.say("waiting for the leaderboard of the latest version")
        lb = maint.wait(lambda: maint.leaderboard(FOREST, version), lambda x: len(x.domains) >= 5, timeout=600)
        return {"version": version, "leaderboard": lb}

    def stop(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()


def summary(lb: Leaderboard) -> str:
    by = {r.subject: r.ppl for r in lb.rows}
    doms = [d.name for d in lb.domains]
    subjects = [s for s in ("ensemble", "ensemble/top1", "average/posterior", "average/uniform") if s in by]
    subjects += sorted(s for s in by if "/" not in s and s != "ensemble")
    w = max(len(s) for s in subjects)
    lines = [f"{'perplexity':<{w}} " + " ".join(f"{d[:12]:>12}" for d in doms)]
    for s in subjects:
        lines.append(f"{s:<{w}} " + " ".join(f"{by[s].get(d, float('nan')):>12.1f}" for d in doms))
    return "\n".join(lines)
