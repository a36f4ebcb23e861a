"""The forest's top-k ensemble as a transformers model, so `generate()` and everything built on
it (stop strings, repetition penalty, batched prompts, lm-evaluation-harness) drives it.

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) w_j(t),    w_j(t) ∝ prior_j · p_j(x_<t)

Which k experts run is the router's choice (btm.routing), made for each sequence of a batch
on its own: from the prompt when generating (two rows of one batch may run different
experts), and for each position from the text before it when a whole text is scored. With
the `prior` router, or k = n, every row runs the same experts.

Each expert keeps its own KV cache over the rows that chose it; the cumulative prefix
log-likelihood of every chosen expert is kept per row (padding excluded) and updated with
every token, so the weights follow each sequence's own prefix. The head's log-softmax and the
mixture are fp32. On the prompt every chosen expert's head runs at every position (its
log-likelihood of the prompt is its weight); the normaliser is taken one expert at a time and
the mixture only where it is asked for (generate() asks for the last position), so a prompt
costs about k prompts (n for the prompt router, which must score the prompt under every ELM;
the centroid router adds one seed pass). The logits returned are the mixture's
log-probabilities; with one expert they are that expert's own logits, so a one-expert forest
generates exactly what the expert does.

Each expert prepares its inputs with its own `prepare_inputs_for_generation`, so caching,
slicing and masking are the expert family's own, whatever the family.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

# siblings only, imported relatively: an exported forest ships this file and these as its remote code
from .errors import BTMError
from .model_files import CONFIG, FOREST_HUB_PATTERNS, max_positions
from .routing import (
    Centroids,
    check_router,
    choose,
    chosen_mask,
    log_weights,
    prefix_vectors,
    text_vectors,
)
from .weights import normalise_weights, select_top_k


class ForestConfig(PretrainedConfig):
    """Which expert directories, the forest's prior over them, how many run (`experts_top_k`:
    not `top_k`, which transformers reads as a sampling setting) and how they are chosen
    (`router`: prior, prompt or centroid; the centroid router needs `routing_vectors`, one
    per expert, and the `seed` directory)."""

    model_type = "elmforest"

    def __init__(self, experts: list[str] | None = None, names: list[str] | None = None,
                 prior: list[float] | None = None, experts_top_k: int | None = None, router: str = "prior",
                 routing_vectors: list[list[float]] | None = None, seed: str | None = None,
                 vocab_size: int | None = None, max_position_embeddings: int | None = None, **kwargs):
        self.experts = list(experts or [])
        self.names = list(names or [Path(e).name for e in self.experts])
        self.prior = list(prior) if prior is not None else None
        self.experts_top_k = experts_top_k
        self.router = router
        self.routing_vectors = routing_vectors
        self.seed = seed
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


@dataclass
class Route:
    """The experts one sequence runs and its routing weights over them (they sum to 1)."""

    experts: list[str]
    weights: list[float]

    def __str__(self) -> str:
        return ", ".join(f"{n} ({w:.2f})" for n, w in zip(self.experts, self.weights, strict=True))


class ForestCache:
    """What decoding keeps between steps: which experts each row runs (`slots`: (B, k) indices
    into the forest), one cache per chosen expert over the rows that chose it, the rows' prior
    over their experts, each expert's cumulative log-likelihood of every row's prefix and its
    log-probabilities at the last position."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        self.caches: dict[int, Any] = {}  # expert -> its cache, over self.rows[expert]
        self.rows: dict[int, torch.Tensor] = {}  # expert -> the batch rows that run it
        self.slots: torch.Tensor | None = None  # (B, k)
        self.log_prior: torch.Tensor | None = None  # (k, B) float64
        self.prefix: torch.Tensor | None = None  # (k, B) float64
        self.last_lp: torch.Tensor | None = None  # (k, B, V) float32

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return next(iter(self.caches.values())).get_seq_length() if self.caches else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beams of one prompt chose the same experts, so each expert's rows stay its rows."""
        B = self.slots.shape[0]
        for j, rows in self.rows.items():
            where = torch.full((B,), -1, dtype=torch.long)
            where[rows] = torch.arange(len(rows))
            src = where[beam_idx.cpu()[rows]]
            if (src < 0).any():
                raise BTMError("beam search moved a beam to a sequence that runs other experts")
            self.caches[j].reorder_cache(src.to(beam_idx.device))
        self.slots = self.slots[beam_idx.cpu()]
        for name in ("log_prior", "prefix", "last_lp"):
            t = getattr(self, name)
            setattr(self, name, t.index_select(1, beam_idx.to(t.device)))


class ForestForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ForestConfig
    base_model_prefix = "experts"
    _no_split_modules: list[str] = []
    _supports_sdpa = True

    def __init__(self, config: ForestConfig, experts: Sequence[PreTrainedModel] | None = None,
                 seed: PreTrainedModel | None = None):
        super().__init__(config)
        experts = _experts_of(config, experts)
        self.experts = nn.ModuleList(experts)
        n = len(experts)
        prior = config.prior or [1.0 / n] * n
        self.register_buffer("log_prior", torch.log(torch.tensor(prior, dtype=torch.float64)), persistent=False)
        self.router = check_router(config.router)
        self.k = _experts_per_row(self.router, config.experts_top_k, n)
        self.centroids = _centroids(config, seed, self.router, self.k, n)
        self.seed_lm = seed if self.centroids is not None else None
        self.routes: list[Route] = []  # each row's experts and weights, from the last prompt routed
        self.fixed: list[int] | None = None  # experts every row runs for now (fixed_experts)
        self.generation_config.update(**_special_token_ids(experts[0]))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # it makes its own: one cache per expert
        return False

    @classmethod
    def from_experts(cls, experts: Sequence[str | os.PathLike | PreTrainedModel], prior: Sequence[float] | None = None,
                     top_k: int | None = None, names: Sequence[str] | None = None, device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float32, router: str = "prior",
                     routing_vectors: Sequence[Sequence[float]] | None = None,
                     seed: str | os.PathLike | PreTrainedModel | None = None) -> ForestForCausalLM:
        """The experts (directories are loaded) and the forest's prior (default uniform). With the
        `prior` router only its top-k are loaded and run (renormalised); with `prompt` or
        `centroid` every expert is held and each sequence's top-k run."""
        router = check_router(router)
        prior = _checked_prior(prior, len(experts))
        idx, w = _experts_to_load(prior, top_k, router)
        loaded = [_load(experts[i], dtype) for i in idx]
        ref = loaded[0].config
        seed_lm = _load(seed, dtype) if router == "centroid" and seed is not None else None
        config = ForestConfig(
            experts=[str(experts[i]) for i in idx], names=_names_of(experts, names, idx), prior=[float(x) for x in w],
            experts_top_k=top_k, router=router, routing_vectors=_vectors_of(routing_vectors, idx),
            seed=str(seed) if isinstance(seed, (str, os.PathLike)) else None,
            vocab_size=ref.get_text_config().vocab_size, max_position_embeddings=max_positions(ref),
            bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id, pad_token_id=ref.pad_token_id,
        )
        model = cls(config, loaded, seed_lm)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def from_forest(cls, forest, top_k: int | None = None, prior: Sequence[float] | None = None,
                    target: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    block_size: int = 256, max_blocks: int = 100, router: str | None = None) -> ForestForCausalLM:
        """A forest's ensemble. The prior: given, or the cached prior of `target` (text of the
        target domain), or uniform. The router: `prior` where a prior or target is given, else
        `centroid` where every ELM has a routing vector, else `prompt` (btm.recipes.routing)."""
        try:  # a forest directory: elmforest's own reader (an exported forest needs none of it)
            from btm.forest import Forest
            from btm.recipes import routing
        except ImportError as e:
            raise ImportError("reading a forest directory needs elmforest installed; an exported forest loads "
                              "without it") from e

        f = forest if isinstance(forest, Forest) else Forest.load(forest)
        r = routing(f, router=router, prior=prior, target=target, block_size=block_size, max_blocks=max_blocks)
        return cls.from_experts(r.paths, r.prior, top_k, names=r.names, device=device, router=r.router,
                                routing_vectors=r.vectors, seed=r.seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, top_k: int | None = None, router: str | None = None,
                        **kwargs) -> ForestForCausalLM:
        """A forest directory (forest.json) or a directory whose config.json is a ForestConfig
        naming its experts' directories (relative to it), e.g. an exported forest, on disk or
        a Hub repository id (fetched whole: config, code, safetensors)."""
        path = _local(path, kwargs.get("revision"))
        if (path / "forest.json").exists() and not (path / CONFIG).exists():
            return cls.from_forest(path, top_k=top_k, router=router)
        config = ForestConfig.from_pretrained(str(path))
        experts = [e if Path(e).is_absolute() else path / e for e in config.experts]
        seed = config.seed if config.seed is None or Path(config.seed).is_absolute() else path / config.seed
        return cls.from_experts(experts, config.prior, top_k or config.experts_top_k, names=config.names,
                                device=_one_device(kwargs.get("device_map")), router=router or config.router,
                                routing_vectors=config.routing_vectors, seed=seed)

    # -------------------------------------------------------------------- transformers plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.experts[0].get_input_embeddings()

    @property
    def n(self) -> int:
        return len(self.experts)

    @property
    def routed(self) -> bool:
        """Whether sequences choose their experts (else every row runs the same ones)."""
        return self.k < self.n and self.fixed is None

    def _same_for_all(self) -> list[int]:
        """The experts every row runs when not routed: the fixed ones, else all held."""
        return self.fixed if self.fixed is not None else list(range(self.n))

    @contextmanager
    def fixed_experts(self, experts: Sequence[int]) -> Iterator[None]:
        """Run these experts (indices into the forest) for every row until the block ends: a
        choice made elsewhere, e.g. from an lm-eval request's context alone."""
        old, self.fixed = self.fixed, sorted(int(j) for j in experts)
        try:
            yield
        finally:
            self.fixed = old

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The experts (B, k) each row's text chooses; `routes` then holds their names and weights."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        scores = None
        if not self.routed:
            slots = torch.tensor(self._same_for_all()).expand(input_ids.shape[0], -1)
        else:
            if self.router == "centroid":
                scores = self._centroid_scores(input_ids, mask)
            else:
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                loglik = [_prompt_loglik(m(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                           **_accepted(m, position_ids=positions)).logits.float(), input_ids, mask)
                          for m in self.experts]
                scores = self.log_prior.cpu()[None] + torch.stack(loglik, dim=1).cpu()
            slots = choose(scores, self.k)
        self._set_routes(slots, scores)
        return slots

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      past_key_values: ForestCache | None = None,
                                      attention_mask: torch.LongTensor | None = None,
                                      is_first_iteration: bool | None = False, **kwargs) -> dict[str, Any]:
        # everything goes to forward as it is (position ids too): each expert prepares its own inputs there
        return {**kwargs, "input_ids": input_ids, "next_sequence_length": next_sequence_length,
                "past_key_values": past_key_values, "attention_mask": attention_mask,
                "is_first_iteration": is_first_iteration, "use_cache": kwargs.get("use_cache", True)}

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: ForestCache | None = None,
                use_cache: bool | None = None, next_sequence_length: int | None = None,
                is_first_iteration: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = True, **kwargs) -> CausalLMOutputWithPast:
        # (taking position_ids makes generate() derive them from the attention mask, as it does
        # for every expert family that takes them: left padding then shifts positions alike.
        # logits_to_keep: generate() asks for the last position only; 0 is every position.)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if past_key_values is None and not use_cache:  # scoring a whole sequence
            out = self._score(input_ids, attention_mask, mask, position_ids, logits_to_keep)
            return CausalLMOutputWithPast(loss=self._loss(out, labels), logits=out)
        step = dict(next_sequence_length=next_sequence_length, is_first_iteration=is_first_iteration,
                    attention_mask=attention_mask, position_ids=position_ids)
        cache = past_key_values
        if cache is None:  # the prompt (prefill): route each row, then run its experts
            cache = ForestCache()
            out = self._route_and_prefill(input_ids, mask, cache, logits_to_keep, step)
        else:  # one or more new tokens after the cached ones
            logits = self._run_cached(input_ids, cache, self._keep(logits_to_keep), step)
            new = logits.shape[2]
            out = self._mix_step(logits, input_ids[:, -new:], mask[:, -new:], cache)
        return CausalLMOutputWithPast(loss=self._loss(out, labels), logits=out, past_key_values=cache)

    def _keep(self, logits_to_keep: int) -> int:
        # the experts' weights need each expert's log-likelihood of every input token, so with
        # k > 1 every position's logits; one expert keeps only what was asked, as it would alone
        return logits_to_keep if self._k_now() == 1 else 0

    def _k_now(self) -> int:
        """How many experts each row runs now."""
        return self.k if self.routed else len(self._same_for_all())

    # -------------------------------------------------------------------- routing

    def _row_prior(self, slots: torch.Tensor) -> torch.Tensor:
        """(k, B) each row's prior over its chosen experts, renormalised."""
        lp = self.log_prior.to(slots.device)[slots]  # (B, k)
        return (lp - torch.logsumexp(lp, dim=-1, keepdim=True)).T.contiguous()

    def _set_routes(self, slots: torch.Tensor, scores: torch.Tensor | None) -> None:
        """What each row chose, with its routing weights over the chosen (the router's scores,
        renormalised: the prompt's posterior for the prompt router, the prior otherwise)."""
        s = (self.log_prior[slots.cpu()] if scores is None else scores.double().cpu().gather(1, slots.cpu()))
        w = torch.softmax(s.double(), dim=-1)
        names = self.config.names
        self.routes = [Route([names[int(j)] for j in row], [float(x) for x in ws]) for row, ws in zip(slots, w, strict=True)]

    def _centroid_scores(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n) each row's centroid scores, from one seed pass over its real tokens."""
        v = text_vectors(self.seed_lm, input_ids, mask)
        return self.centroids.scores(v, self.log_prior.cpu())

    # -------------------------------------------------------------------- prefill and decode

    def _route_and_prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: ForestCache, logits_to_keep: int,
                 step: dict) -> torch.Tensor:
        B = input_ids.shape[0]
        keep = self._keep(logits_to_keep)
        scores = None
        if self.routed and self.router == "prompt":  # every expert scores the prompt; its choice keeps its rows
            every = torch.arange(B)
            cache.rows = {j: every for j in range(self.n)}
            full = self._run_cached(input_ids, cache, 0, step, slots=False)
            loglik = torch.stack([_prompt_loglik(x.float(), input_ids, mask).cpu() for x in full], dim=1)  # (B, n)
            scores = self.log_prior.cpu()[None] + loglik  # the prompt's log posterior (unnormalised)
            cache.slots = choose(scores, self.k)
            self._keep_chosen(cache)
            logits = self._gather_slots({j: full[j][cache.rows[j].to(full[j].device)] for j in cache.rows}, cache)
            logits = logits[:, :, -keep:] if keep else logits
        else:
            if self.routed:  # the centroid router: one seed pass chooses each row's experts
                scores = self._centroid_scores(input_ids, mask)
                cache.slots = choose(scores, self.k)
            else:
                cache.slots = torch.tensor(self._same_for_all()).expand(B, -1)
            cache.rows = _rows_of(cache.slots, self.n)
            logits = self._run_cached(input_ids, cache, keep, step)
        cache.log_prior = self._row_prior(cache.slots).to(input_ids.device)
        self._set_routes(cache.slots, scores)
        return self._mix_prompt(logits, input_ids, mask, logits_to_keep, cache.log_prior, cache)

    def _keep_chosen(self, cache: ForestCache) -> None:
        """After the prompt router's pass over every row: each expert keeps the rows that chose it."""
        rows = _rows_of(cache.slots, self.n)
        for j in list(cache.caches):
            if j in rows:
                cache.caches[j].batch_select_indices(rows[j].to(self.log_prior.device))
            else:
                del cache.caches[j]
        cache.rows = rows

    def _run_cached(self, input_ids: torch.Tensor, cache: ForestCache, keep: int, step: dict,
                    slots: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Each chosen expert on its rows, with its own cache; the logits by slot (k, B, T, V),
        or (slots=False) by expert."""
        out = {}
        for j, rows in cache.rows.items():
            m = self.experts[j]
            if j not in cache.caches:
                cache.caches[j] = DynamicCache(config=m.config.get_text_config(decoder=True))
            r = rows.to(input_ids.device)
            sub = {k: (v[r] if isinstance(v, torch.Tensor) else v) for k, v in step.items()}
            inputs = m.prepare_inputs_for_generation(
                input_ids[r], next_sequence_length=sub["next_sequence_length"], past_key_values=cache.caches[j],
                attention_mask=sub["attention_mask"], is_first_iteration=sub["is_first_iteration"], use_cache=True,
                **_accepted(m, position_ids=sub["position_ids"]))
            out[j] = m(**inputs, **_accepted(m, logits_to_keep=keep), return_dict=True).logits
        if not slots:
            return [out[j] for j in range(self.n)]
        return self._gather_slots(out, cache)

    def _gather_slots(self, by_expert: dict[int, torch.Tensor], cache: ForestCache) -> torch.Tensor:
        """(k, B, T, V): slot s of row b holds the logits of the expert in cache.slots[b, s]."""
        first = next(iter(by_expert.values()))
        B, k = cache.slots.shape
        out = first.new_empty((k, B) + tuple(first.shape[1:]))
        for j, x in by_expert.items():
            rows = cache.rows[j]
            slot = (cache.slots[rows] == j).int().argmax(-1)
            out[slot.to(x.device), rows.to(x.device)] = x
        return out

    # -------------------------------------------------------------------- scoring a whole text

    def _score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor,
               position_ids: torch.Tensor | None, logits_to_keep: int) -> torch.Tensor:
        """Every position's mixture with its experts chosen from the text before it (a fixed set
        when not routed)."""
        chosen = None
        run = self._same_for_all() if not self.routed else range(self.n)
        if self.routed and self.router == "centroid":
            scores = self.centroids.scores(prefix_vectors(self.seed_lm, input_ids), self.log_prior.cpu())  # (B, T, n)
            chosen = chosen_mask(scores, self.k).movedim(-1, 0).to(input_ids.device)  # (n, B, T)
            run = [j for j in range(self.n) if chosen[j].any()]
        keep = 0 if self.routed else self._keep(logits_to_keep)
        logits = {j: self.experts[j](input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     **_accepted(self.experts[j], position_ids=position_ids, logits_to_keep=keep)).logits
                  for j in run}
        if not self.routed:
            slots = torch.tensor(run)
            return self._mix_prompt(torch.stack([logits[j] for j in run]), input_ids, mask, logits_to_keep,
                                    self._row_prior(slots[None].expand(input_ids.shape[0], -1)))
        return self._mix_routed(logits, input_ids, mask, logits_to_keep, chosen)

    def _mix_routed(self, logits: dict[int, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, keep: int,
                    chosen: torch.Tensor | None) -> torch.Tensor:
        """Per position: the k experts chosen there (by `chosen`, or by the prompt router's
        posterior over the text so far), mixed with their prefix weights."""
        T = ids.shape[1]
        keep = keep or T
        prefix = torch.zeros((self.n,) + tuple(ids.shape), dtype=torch.float64, device=ids.device)
        lp = {}
        for j, x in logits.items():
            prefix[j], lp[j] = _prefix_and_lp(x.float(), ids, mask, keep)
        if chosen is None:
            scores = self.log_prior.to(ids.device)[:, None, None] + prefix
            chosen = chosen_mask(scores.movedim(0, -1), self.k).movedim(-1, 0)
        logw = log_weights(self.log_prior.to(ids.device), prefix, chosen)[..., -keep:].float()
        out = None
        for j, x in lp.items():  # one expert at a time: memory of two (B, T, V) tensors
            term = x + logw[j, ..., None]
            out = term if out is None else torch.logaddexp(out, term)
        return out

    # -------------------------------------------------------------------- the mixture

    def _mix(self, lp: torch.Tensor, prefix: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """Mixture log-probabilities; lp: (k, B, T, V) each slot's, prefix: (k, B, T) log p_j(x_<=t),
        log_prior: (k,) or (k, B)."""
        logw = log_weights(log_prior.to(prefix.device), prefix).float()
        out = lp[0] + logw[0, ..., None]
        for j in range(1, lp.shape[0]):  # one expert at a time: memory of two (B, T, V) tensors, not k
            out = torch.logaddexp(out, lp[j] + logw[j, ..., None])
        return out

    def _mix_prompt(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keep: int,
                    log_prior: torch.Tensor, cache: ForestCache | None = None) -> torch.Tensor:
        """The mixture at the last `keep` positions of a sequence (every position if 0), from
        each slot's logits at every position (k, B, T, V). One slot at a time: its
        log-normaliser, the log-probability of each given token and the log-probabilities at
        the kept positions, so a long prompt never holds k full (B, T, V) tensors."""
        B, T = ids.shape
        keep = keep or T
        if logits.shape[0] == 1:  # the expert's own logits: the same distribution, bit for bit the same choices
            x = logits[0][:, -keep:].float()
            if cache is not None:  # one expert's weight is 1 whatever its prefix
                cache.prefix = torch.zeros(1, B, dtype=torch.float64, device=x.device)
                cache.last_lp = torch.log_softmax(x[:, -1], dim=-1)[None]
            return x
        prefix, lp = zip(*(_prefix_and_lp(x.float(), ids, mask, keep) for x in logits), strict=True)
        prefix, lp = torch.stack(prefix), torch.stack(lp)  # (k, B, T), (k, B, keep, V)
        if cache is not None:
            cache.prefix, cache.last_lp = prefix[..., -1], lp[:, :, -1]
        return self._mix(lp, prefix[..., -keep:], log_prior)

    def _mix_step(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  cache: ForestCache) -> torch.Tensor:
        lp = torch.log_softmax(logits.float(), dim=-1)  # (k, B, n, V) for the n new tokens
        k = lp.shape[0]
        if k == 1:
            cache.last_lp = lp[:, :, -1]
            return logits[0].float()
        prev = torch.cat([cache.last_lp[:, :, None], lp[:, :, :-1]], dim=2)  # what predicted each new token
        tok = prev.gather(-1, ids[None, :, :, None].expand(k, -1, -1, 1)).squeeze(-1).double()
        prefix = cache.prefix[..., None] + torch.cumsum(tok * mask[None].to(tok.dtype), dim=-1)  # (k, B, n)
        cache.prefix, cache.last_lp = prefix[..., -1], lp[:, :, -1]
        return self._mix(lp, prefix, cache.log_prior)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)


def _experts_of(config: ForestConfig, experts: Sequence[PreTrainedModel] | None) -> Sequence[PreTrainedModel]:
    """The experts given, else loaded from the config's directories; an ensemble has at least one."""
    if experts is None:
        experts = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32) for e in config.experts]
    if not experts:
        raise BTMError("an ensemble needs at least one expert")
    return experts


def _experts_per_row(router: str, top_k: int | None, n: int) -> int:
    """How many experts each row runs: its top-k, or under the prior router all n (from_experts
    loaded only the prior's top-k)."""
    return min(top_k or n, n) if router != "prior" else n


def _centroids(config: ForestConfig, seed: PreTrainedModel | None, router: str, k: int, n: int) -> Centroids | None:
    """The centroid router's vectors where it has a choice to make (k < n); it embeds prompts with the seed."""
    if router == "centroid" and k < n:
        if seed is None or not config.routing_vectors:
            raise BTMError("the centroid router needs the seed and one routing vector per expert")
        return Centroids(config.routing_vectors)
    return None


def _special_token_ids(expert: PreTrainedModel) -> dict[str, Any]:
    """The expert's bos, eos and pad ids, which generate() reads from the ensemble's own config."""
    return {k: v for k, v in expert.generation_config.to_dict().items()
            if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}


def _checked_prior(prior: Sequence[float] | None, n: int) -> list[float]:
    """The prior over n experts: given (one weight per expert), else uniform."""
    prior = list(prior) if prior is not None else [1.0 / n] * n
    if len(prior) != n:
        raise BTMError(f"{n} experts but {len(prior)} prior weights")
    return prior


def _experts_to_load(prior: list[float], top_k: int | None, router: str) -> tuple[np.ndarray, np.ndarray]:
    """The experts to load and their weights: the prior's top-k (renormalised) under the prior
    router, which routes every row alike; every expert under a router that chooses per row."""
    if router == "prior":
        return select_top_k(prior, top_k)
    w, _ = normalise_weights(prior, "prior")
    return np.arange(len(prior)), w


def _names_of(experts: Sequence, names: Sequence[str] | None, idx: np.ndarray) -> list[str]:
    """The loaded experts' names: given, else their directories' names."""
    return [(names[i] if names else Path(str(experts[i])).name) for i in idx]


def _vectors_of(routing_vectors: Sequence[Sequence[float]] | None, idx: np.ndarray) -> list[list[float]] | None:
    return [list(map(float, routing_vectors[i])) for i in idx] if routing_vectors else None


def _prefix_and_lp(x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From one expert's fp32 logits (B, T, V): log p_j(x_<=t) at every position (B, T; padding
    excluded) and its log-probabilities at the last `keep` positions (B, keep, V)."""
    B = ids.shape[0]
    valid = (mask[:, 1:] * mask[:, :-1]).double()  # both tokens real (not padding)
    norm = torch.logsumexp(x, dim=-1, keepdim=True)  # (B, T, 1)
    # log p_j(x_t | x_<t) of each given token (t >= 1), summed into log p_j(x_<=t)
    tok = (x[:, :-1].gather(-1, ids[:, 1:, None]) - norm[:, :-1]).squeeze(-1).double()
    prefix = torch.cat([tok.new_zeros(B, 1), torch.cumsum(tok * valid, dim=-1)], dim=-1)
    return prefix, x[:, -keep:] - norm[:, -keep:]


def _prompt_loglik(x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) one expert's log-likelihood of each row's prompt (its real tokens)."""
    return _prefix_and_lp(x, ids, mask, 1)[0][:, -1]


def _rows_of(slots: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
    """Expert -> the rows (sorted) whose slots hold it; experts no row chose are left out."""
    slots = slots.cpu()
    return {j: rows for j in range(n) if len(rows := (slots == j).any(-1).nonzero().flatten())}


def _one_device(device_map) -> str | torch.device | None:
    """The device of a device_map as transformers' loaders pass it ("cpu", a device, or {"": device});
    the experts are not split across devices."""
    if isinstance(device_map, dict):
        return device_map.get("", None) if len(device_map) == 1 else None
    return None if device_map == "auto" else device_map


def _local(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A directory on disk, or a Hub repository's snapshot (weights as safetensors only)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), revision=revision, allow_patterns=FOREST_HUB_PATTERNS))


def _load(model: str | os.PathLike | PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    if isinstance(model, (str, os.PathLike)):
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, attn_implementation="sdpa").eval()
    return model


def _accepted(model: nn.Module, **kwargs) -> dict:
    """The keyword arguments (not None) an expert's forward takes, as its own generate() would
    pass them (position_ids, logits_to_keep: not every family takes both)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in params}


# exist_ok: an exported forest's copy of this file may be loaded as remote code beside this one
AutoConfig.register("elmforest", ForestConfig, exist_ok=True)
AutoModelForCausalLM.register(ForestConfig, ForestForCausalLM, exist_ok=True)
