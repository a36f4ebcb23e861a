"""Tokenizers: train a byte-level BPE on a corpus, or take an existing HF tokenizer directory.

Every document is preceded by a beginning-of-document token (BOS). A byte-level BPE never
meets an unknown character, so any domain a contributor brings can be encoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from btm.errors import FamilyError

BOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with one special token, BOS, used as bos/eos/pad."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size {vocab_size} is below 257 (256 bytes + BOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, model_max_length=1 << 30
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (ours or any HF fast tokenizer) and make sure it has a BOS."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FamilyError(
            f"{path}: no tokenizer.json; pass a directory saved by `elmforest tokenizer train` "
            "or any Hugging Face fast tokenizer directory"
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise FamilyError(f"{path}: only fast (tokenizers-backed) tokenizers are supported")
    return tok


def bos_id(tok: PreTrainedTokenizerFast) -> int:
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    raise FamilyError("tokenizer has neither a bos nor an eos token to mark document starts")


def tokenizer_sha256(tok: PreTrainedTokenizerFast) -> str:
    """A content hash of the tokenizer's vocabulary and rules: the tokenizer half of a family."""
    canon = json.loads(tok.backend_tokenizer.to_str())
    canon.pop("truncation", None)
    canon.pop("padding", None)
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def iter_balanced_texts(
    sources: dict[str, Iterable[str]], chars_per_source: int
) -> Iterator[str]:
    """Up to `chars_per_source` characters of each source, so no domain dominates the merges."""
    for texts in sources.values():
        n = 0
        for t in texts:
            yield t
            n += len(t)
            if n >= chars_per_source:
                break
