"""The contributor's workflow as functions of a client, as scripts and tests call them:
each is one method of the typed API (`contributor_client.api.Coordinator`), which they take
as their first argument (an http.Client is used as one). Also the plain-text tables the
CLI prints of a version's values and of a merge preview."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contributor_client.api import SETTLED, Coordinator
from contributor_client.http import Client
from contributor_client.local import local_files, sample_file, set_init_vector
from contributor_client.records import (
    BranchInit,
    Contribution,
    ContributorValues,
    MergePreview,
    Moe,
    VersionValues,
)

__all__ = ["SETTLED", "local_files", "sample_file", "set_init_vector"]

Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def _api(client: Client) -> Coordinator:
    return Coordinator.of(client)


def download_files(client: Client, files: dict[str, str], urls: dict[str, str], dest: Path, log: Log = _quiet) -> Path:
    return client.download_files(files, urls, dest, log)


def download_forest(client: Client, forest: str, dest: Path, version: int | None = None, log: Log = _quiet) -> Path:
    return _api(client).download_forest(forest, dest, version, log)


def register_seed(client: Client, name: str, seed_dir: Path, description: str = "", progress=None):
    return _api(client).register_seed(name, seed_dir, description, progress)


def register_baseline(client: Client, forest: str, name: str, model_dir: Path, description: str = "",
                      progress=None):
    return _api(client).register_baseline(forest, name, model_dir, description, progress)


def request_branch(client: Client, forest: str, domain: str, data: Path | None = None, private: bool = False,
                   method: str = "posterior", wait: bool = True, log: Log = _quiet,
                   max_sample_bytes: int = 1 << 20) -> BranchInit:
    return _api(client).request_branch(forest, domain, data, private, method, wait, log, max_sample_bytes)


def download_init(client: Client, branch: BranchInit | dict, dest: Path, log: Log = _quiet) -> Path:
    return _api(client).download_init(branch, dest, log)


def submit(client: Client, elm_dir: Path, forest: str | None = None, branch_init_id: int | None = None,
           name: str | None = None, progress: Callable[[int, int], None] | None = None,
           log: Log = _quiet) -> Contribution:
    return _api(client).submit(elm_dir, forest, branch_init_id, name, progress, log)


def import_checkpoint(client: Client, forest: str, source: str, domain: str, name: str | None = None,
                      revision: str | None = None, progress: Callable[[int, int], None] | None = None,
                      log: Log = _quiet) -> Contribution:
    return _api(client).import_checkpoint(forest, source, domain, name, revision, progress, log)


def follow(client: Client, cid: int, until: set[str] | None = None, timeout: float = 3600,
           on_change: Callable[[Contribution], None] | None = None) -> Contribution:
    return _api(client).follow(cid, until, timeout, on_change)


def download_average(client: Client, forest: str, method: str, domain: str | None, dest: Path,
                     version: int | None = None, log: Log = _quiet) -> Path:
    return _api(client).download_average(forest, dest, method, domain, version, log)


def moe_export(client: Client, forest: str, version: int | None = None, experts_per_token: int | None = None,
               backbone: str = "uniform", domain: str | None = None, log: Log = _quiet) -> Moe:
    return _api(client).moe_export(forest, version, experts_per_token, backbone, domain, log)


def download_moe(client: Client, forest: str, dest: Path, version: int | None = None,
                 experts_per_token: int | None = None, backbone: str = "uniform", domain: str | None = None,
                 moe_id: int | None = None, log: Log = _quiet) -> Moe:
    return _api(client).download_moe(forest, dest, version, experts_per_token, backbone, domain, moe_id, log)


def tune_router(client: Client, forest: str, steps: int, version: int | None = None, whole: bool = False,
                batch_size: int = 8, block_size: int = 128, lr: float = 1e-3, experts_per_token: int | None = None,
                backbone: str = "uniform", domain: str | None = None, moe_id: int | None = None,
                log: Log = _quiet) -> Moe:
    return _api(client).tune_router(forest, steps, version, whole, batch_size, block_size, lr, experts_per_token,
                                    backbone, domain, moe_id, log)


def values(client: Client, forest: str, version: int | None = None, contributors: bool = False,
           wait: float = 0, log: Log = _quiet) -> VersionValues | ContributorValues:
    api = _api(client)
    return (api.contributor_values if contributors else api.values)(forest, version, wait, log)


# ----------------------------------------------------------------------------- tables


def values_table(rep: VersionValues) -> str:
    """Plain-text tables of a version's values: per ELM the leave-one-out change (%) and the
    Shapley value (nats per token, ± standard error) on each domain, and their means."""
    doms = rep.domains
    w = max([12, *(len(e.name) for e in rep.elms)])
    head = f"{'ELM':<{w}} " + " ".join(f"{d.name[:16]:>16}" for d in doms) + f" {'mean':>9}"
    cell = {(x.elm, d.name): x for d in doms for x in d.elms}
    lines = [f"forest {rep.forest} v{rep.version}: leave-one-out (ppl without / ppl with - 1) and Shapley "
             f"value (nats/token over the seed, {rep.permutations} orderings, ± s.e.)", "", head]
    for e in rep.elms:
        row = []
        for d in doms:
            x = cell.get((e.name, d.name))
            row.append(f"{x.loo * 100:+6.2f}% {x.shapley:+.3f}" if x is not None else f"{'':>16}")
        lines.append(f"{e.name:<{w}} " + " ".join(f"{c:>16}" for c in row) + f" {e.shapley_mean:+9.4f}")
    lines.append(f"{'forest ppl':<{w}} " + " ".join(f"{d.forest_ppl:>16.2f}" for d in doms))
    lines.append(f"{'seed ppl':<{w}} " + " ".join(f"{d.seed_ppl:>16.2f}" for d in doms))
    lines.append(f"{'improvement':<{w}} " + " ".join(f"{d.improvement:>+16.4f}" for d in doms))
    return "\n".join(lines)


def contributors_table(rep: ContributorValues) -> str:
    lines = [f"forest {rep.forest} v{rep.version}: each contributor's ELMs together (mean over domains)", "",
             f"{'contributor':<20} {'ELMs':>4} {'Shapley':>10} {'leave-one-out':>14}"]
    for c in rep.contributors:
        lines.append(f"{c.name:<20} {len(c.elms):>4} {c.shapley_mean:>+10.4f} {c.loo_mean * 100:>+13.2f}%")
    if rep.wanted:
        lines += ["", "wanted domains (where the forest is weakest against the baseline):"]
        for x in rep.wanted:
            lines.append(f"  {x.domain:<20} forest {x.forest_ppl:.2f} vs {x.baseline} {x.baseline_ppl:.2f}"
                         + ("  (behind)" if x.behind else ""))
    return "\n".join(lines)


def preview_table(p: MergePreview) -> str:
    lines = [f"merging contribution {p.contribution_id} into version {p.forest_version} "
             f"(own domain {p.own_domain}):", "", f"{'domain':<20} {'before':>9} {'after':>9} {'change':>9}"]
    for dn, x in sorted(p.domains.items(), key=lambda kv: (kv[0] != p.own_domain, kv[0])):
        lines.append(f"{dn:<20} {x.before_ppl:>9.2f} {x.after_ppl:>9.2f} {x.change * 100:>+8.2f}%")
    return "\n".join(lines)
