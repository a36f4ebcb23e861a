"""The forest's top-k ensemble as a transformers model, so `generate()` and everything built on
it (stop strings, repetition penalty, batched prompts, lm-evaluation-harness) drives it.

    p(x_t | x_<t) = sum_j p_j(x_t | x_<t) w_j(t),    w_j(t) ∝ prior_j · p_j(x_<t)

Each expert keeps its own KV cache; the cumulative prefix log-likelihood of every expert is
kept per sequence of the batch (padding excluded) and updated with every token, so the
weights follow each sequence's own prefix. The head's log-softmax and the mixture are fp32.
On the prompt every expert's head runs at every position (its log-likelihood of the prompt
is its weight); the normaliser is taken one expert at a time and the mixture only where it
is asked for (generate() asks for the last position), so a prompt costs about k prompts.
The logits returned are the mixture's log-probabilities; with one expert they are that
expert's own logits, so a one-expert forest generates exactly what the expert does.

Each expert prepares its inputs with its own `prepare_inputs_for_generation`, so caching,
slicing and masking are the expert family's own, whatever the family.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from btm.errors import BTMError
from btm.model_files import CONFIG


class ForestConfig(PretrainedConfig):
    """Which expert directories, their prior weights and how many run (`experts_top_k`: not
    `top_k`, which transformers reads as a sampling setting)."""

    model_type = "elmforest"

    def __init__(self, experts: list[str] | None = None, names: list[str] | None = None,
                 prior: list[float] | None = None, experts_top_k: int | None = None, vocab_size: int | None = None,
                 max_position_embeddings: int | None = None, **kwargs):
        self.experts = list(experts or [])
        self.names = list(names or [Path(e).name for e in self.experts])
        self.prior = list(prior) if prior is not None else None
        self.experts_top_k = experts_top_k
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class ForestCache:
    """What decoding keeps between steps: one cache per expert, each expert's cumulative
    log-likelihood of every sequence's prefix, and its log-probabilities at the last position."""

    is_compileable = False
    is_croppable = False

    def __init__(self, caches: list):
        self.caches = caches
        self.prefix: torch.Tensor | None = None  # (k, B) float64
        self.last_lp: torch.Tensor | None = None  # (k, B, V) float32

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for c in self.caches:
            c.reorder_cache(beam_idx)
        self.prefix = self.prefix.index_select(1, beam_idx.to(self.prefix.device))
        self.last_lp = self.last_lp.index_select(1, beam_idx.to(self.last_lp.device))


class ForestForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ForestConfig
    base_model_prefix = "experts"
    _no_split_modules: list[str] = []
    _supports_sdpa = True

    def __init__(self, config: ForestConfig, experts: Sequence[PreTrainedModel] | None = None):
        super().__init__(config)
        if experts is None:
            experts = [AutoModelForCausalLM.from_pretrained(e, dtype=torch.float32) for e in config.experts]
        if not experts:
            raise BTMError("an ensemble needs at least one expert")
        self.experts = nn.ModuleList(experts)
        prior = config.prior or [1.0 / len(experts)] * len(experts)
        self.register_buffer("log_prior", torch.log(torch.tensor(prior, dtype=torch.float64)), persistent=False)
        self.generation_config.update(**{k: v for k, v in experts[0].generation_config.to_dict().items()
                                        if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None})

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # it makes its own: one cache per expert
        return False

    @classmethod
    def from_experts(cls, experts: Sequence[str | os.PathLike | PreTrainedModel], prior: Sequence[float] | None = None,
                     top_k: int | None = None, names: Sequence[str] | None = None, device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float32) -> ForestForCausalLM:
        """The top-k experts by prior (renormalised), loaded from their directories and run."""
        from btm.weights import select_top_k

        prior = list(prior) if prior is not None else [1.0 / len(experts)] * len(experts)
        if len(prior) != len(experts):
            raise BTMError(f"{len(experts)} experts but {len(prior)} prior weights")
        idx, w = select_top_k(prior, top_k)
        loaded = [AutoModelForCausalLM.from_pretrained(str(experts[i]), dtype=dtype, attn_implementation="sdpa")
                  if isinstance(experts[i], (str, os.PathLike)) else experts[i] for i in idx]
        ref = loaded[0].config
        names = [(names[i] if names else Path(str(experts[i])).name) for i in idx]
        config = ForestConfig(
            experts=[str(experts[i]) for i in idx], names=names, prior=[float(x) for x in w], experts_top_k=top_k,
            vocab_size=ref.get_text_config().vocab_size, max_position_embeddings=max_positions(ref),
            bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id, pad_token_id=ref.pad_token_id,
        )
        model = cls(config, loaded)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def from_forest(cls, forest, top_k: int | None = None, prior: Sequence[float] | None = None,
                    target: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    block_size: int = 256, max_blocks: int = 100) -> ForestForCausalLM:
        """A forest's ensemble. The prior: given, or the cached prior of `target` (text of the
        target domain), or uniform."""
        from btm.forest import Forest

        f = forest if isinstance(forest, Forest) else Forest.load(forest)
        paths = [e.path for e in f.elms]
        if not paths:
            raise BTMError(f"{f.root}: the forest has no ELMs")
        if prior is None and target is not None:
            from btm.branch import sample_blocks
            from btm.posterior import domain_prior

            prior = domain_prior(paths, sample_blocks(f, target, block_size, max_blocks)).tolist()
        return cls.from_experts(paths, prior, top_k, names=f.names(), device=device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, top_k: int | None = None, **kwargs) -> ForestForCausalLM:
        """A forest directory (forest.json) or a directory whose config.json is a ForestConfig
        naming its experts' directories (relative to it), e.g. an exported forest."""
        path = Path(path)
        if (path / "forest.json").exists() and not (path / CONFIG).exists():
            return cls.from_forest(path, top_k=top_k)
        config = ForestConfig.from_pretrained(str(path))
        experts = [e if Path(e).is_absolute() else path / e for e in config.experts]
        return cls.from_experts(experts, config.prior, top_k or config.experts_top_k, names=config.names,
                                device=kwargs.get("device_map"))

    # -------------------------------------------------------------------- transformers plumbing

    def get_input_embeddings(self) -> nn.Module:
        return self.experts[0].get_input_embeddings()

    @property
    def k(self) -> int:
        return len(self.experts)

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
        # the experts' weights need each expert's log-likelihood of every input token, so with
        # k > 1 every position's logits; one expert keeps only what was asked, as it would alone
        keep = logits_to_keep if self.k == 1 else 0
        if past_key_values is None and not use_cache:  # scoring a whole sequence
            logits = [m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        **_accepted(m, position_ids=position_ids, logits_to_keep=keep)).logits for m in self.experts]
            out = self._mix_prompt(logits, input_ids, mask, logits_to_keep)
            return CausalLMOutputWithPast(loss=self._loss(out, labels), logits=out)
        cache = past_key_values
        if cache is None:
            cache = ForestCache([DynamicCache(config=m.config.get_text_config(decoder=True)) for m in self.experts])
        logits = []
        for m, c in zip(self.experts, cache.caches, strict=True):
            inputs = m.prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                     past_key_values=c, attention_mask=attention_mask,
                                                     is_first_iteration=is_first_iteration, use_cache=True,
                                                     **_accepted(m, position_ids=position_ids))
            logits.append(m(**inputs, **_accepted(m, logits_to_keep=keep), return_dict=True).logits)
        new = input_ids.shape[1] if cache.prefix is None else logits[0].shape[1]
        if cache.prefix is None:  # the prompt (prefill)
            out = self._mix_prompt(logits, input_ids[:, -new:], mask[:, -new:], logits_to_keep, cache)
        else:  # one or more new tokens after the cached ones
            out = self._mix_step(logits, input_ids[:, -new:], mask[:, -new:], cache)
        return CausalLMOutputWithPast(loss=self._loss(out, labels), logits=out, past_key_values=cache)

    # -------------------------------------------------------------------- the mixture

    def _mix(self, lp: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Mixture log-probabilities; lp: (k, B, T, V) each expert's, prefix: (k, B, T) log p_j(x_<=t)."""
        logw = self.log_prior.to(prefix.device)[:, None, None] + prefix
        logw = (logw - torch.logsumexp(logw, dim=0, keepdim=True)).float()
        out = lp[0] + logw[0, ..., None]
        for j in range(1, self.k):  # one expert at a time: memory of two (B, T, V) tensors, not k
            out = torch.logaddexp(out, lp[j] + logw[j, ..., None])
        return out

    def _mix_prompt(self, logits: list[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, keep: int,
                    cache: ForestCache | None = None) -> torch.Tensor:
        """The mixture at the last `keep` positions of a sequence (every position if 0), from
        the experts' logits at every position. One expert at a time: its log-normaliser, the
        log-probability of each given token and the log-probabilities at the kept positions, so
        a long prompt never holds k full (B, T, V) tensors."""
        B, T = ids.shape
        keep = keep or T
        if self.k == 1:  # the expert's own logits: the same distribution, bit for bit the same choices
            x = logits[0][:, -keep:].float()
            if cache is not None:  # one expert's weight is 1 whatever its prefix
                cache.prefix = torch.zeros(1, B, dtype=torch.float64, device=x.device)
                cache.last_lp = torch.log_softmax(x[:, -1], dim=-1)[None]
            return x
        valid = (mask[:, 1:] * mask[:, :-1]).double()  # both tokens real (not padding)
        prefix, lp = [], []
        for x in logits:
            x = x.float()
            norm = torch.logsumexp(x, dim=-1, keepdim=True)  # (B, T, 1)
            # log p_j(x_t | x_<t) of each given token (t >= 1), summed into log p_j(x_<=t)
            tok = (x[:, :-1].gather(-1, ids[:, 1:, None]) - norm[:, :-1]).squeeze(-1).double()
            prefix.append(torch.cat([tok.new_zeros(B, 1), torch.cumsum(tok * valid, dim=-1)], dim=-1))
            lp.append(x[:, -keep:] - norm[:, -keep:])
        prefix, lp = torch.stack(prefix), torch.stack(lp)  # (k, B, T), (k, B, keep, V)
        if cache is not None:
            cache.prefix, cache.last_lp = prefix[..., -1], lp[:, :, -1]
        return self._mix(lp, prefix[..., -keep:])

    def _mix_step(self, logits: list[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                  cache: ForestCache) -> torch.Tensor:
        lp = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in logits])  # (k, B, n, V) for the n new tokens
        if self.k == 1:
            cache.last_lp = lp[:, :, -1]
            return logits[0].float()
        prev = torch.cat([cache.last_lp[:, :, None], lp[:, :, :-1]], dim=2)  # what predicted each new token
        tok = prev.gather(-1, ids[None, :, :, None].expand(self.k, -1, -1, 1)).squeeze(-1).double()
        prefix = cache.prefix[..., None] + torch.cumsum(tok * mask[None].to(tok.dtype), dim=-1)  # (k, B, n)
        cache.prefix, cache.last_lp = prefix[..., -1], lp[:, :, -1]
        return self._mix(lp, prefix)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)


def _accepted(model: nn.Module, **kwargs) -> dict:
    """The keyword arguments (not None) an expert's forward takes, as its own generate() would
    pass them (position_ids, logits_to_keep: not every family takes both)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in params}


def max_positions(config) -> int | None:
    """The context length of any family (transformers maps each family's own name, e.g.
    GPT-2's n_positions, to max_position_embeddings)."""
    return getattr(config, "max_position_embeddings", None)


AutoConfig.register("elmforest", ForestConfig)
AutoModelForCausalLM.register(ForestConfig, ForestForCausalLM)

