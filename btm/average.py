"""Parameter averaging, streamed chunk by chunk.

    theta = sum_j w_j theta_j      (w uniform, one-hot on the argmax, or the cached posterior)

Each tensor is averaged in chunks of CHUNK_BYTES (of fp32): the chunk is read from every
input in turn (positional reads into reused buffers, no mmap), accumulated in fp32 and
written at its place in the output file, reads and writes overlapping the arithmetic. Peak
memory is a few chunks (two fp32 accumulators and two read buffers, some 200 MiB) whatever
the model's size or the number of inputs; only integer tensors (copied from the first input,
not averaged) are read whole. The inputs' pages never pile up in this process.
`average_in_memory`, the reference the streamed average is tested against, holds every
input at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from btm.errors import WeightsError
from btm.family import Card, check_family, copy_aux_files, family_of, load_config, write_card
from btm.model_files import CARD, CONFIG, WEIGHTS_GLOB
from btm.safetensors_io import (
    DTYPES,
    ITEMSIZE,
    ShardedWriter,
    WeightsIndex,
    open_weights,
    read_header,
    read_tensor,
)
from btm.tokenizer import load_tokenizer
from btm.weights import normalise_weights

METHODS = ("uniform", "argmax", "posterior")


def method_weights(method: str, posterior: Sequence[float] | None, n: int) -> list[float]:
    """The averaging weights of a method: uniform, argmax (one-hot) or posterior."""
    if method == "uniform":
        return [1.0 / n] * n
    if posterior is None:
        raise ValueError(f"the {method} average needs a posterior (a cached prior for the target)")
    p = list(posterior)
    if method == "argmax":
        best = max(range(n), key=lambda i: p[i])
        return [1.0 if i == best else 0.0 for i in range(n)]
    if method == "posterior":
        return p
    raise ValueError(f"unknown averaging method {method!r}; methods: {', '.join(METHODS)}")


def check_compatible(sources: Sequence[Path]) -> list[WeightsIndex]:
    """Open every source and check it is of the first one's family: config, tokenizer and
    tensor layout. Floating-point precisions may differ: each input is read in its own."""
    indexes = [open_weights(s) for s in sources]
    ref = family_of(sources[0])
    for src in sources[1:]:
        check_family(src, ref, str(src), str(sources[0]))
    return indexes


CHUNK_BYTES = 32 << 20  # elements are averaged this many bytes (of fp32) at a time


def average_weights(
    indexes: Sequence[WeightsIndex],
    weights: Sequence[float],
    out_dir: Path,
    metadata: dict[str, str] | None = None,
    out_dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Stream the weighted sum of aligned safetensors weights into out_dir.

    Each tensor is processed in chunks of CHUNK_BYTES: for every input, the chunk's bytes
    are read (positional reads into reused buffers, the next input's read overlapping this
    one's arithmetic) and accumulated in fp32, then the chunk is written at its place in the
    output. Memory is a few chunks whatever the model's or the forest's size; every element
    sees exactly the operations of the in-memory average, so the results are identical."""
    ref = indexes[0]
    layout = [(n, out_dtype or ref.info(n).dtype, ref.info(n).shape) for n in ref.names]
    live = [(idx, float(w)) for idx, w in zip(indexes, weights, strict=True) if w != 0.0]
    stream = _ChunkedAverage(live)
    try:
        with ShardedWriter(out_dir, layout, metadata, max_shard_bytes) as w:
            for name, dtype, shape in layout:
                if DTYPES[ref.info(name).dtype].is_floating_point:
                    stream.average_tensor(w, name, dtype, math.prod(shape))
                else:
                    # integer buffers (e.g. position ids) must agree; they are copied, not averaged.
                    # Written from this thread: the writer thread's chunks must be done first, or
                    # the two interleave their seeks and writes on the same file
                    stream.wait_for_writes()
                    w.write(name, stream.read_whole(ref, name).to(DTYPES[dtype]))
            stream.wait_for_writes()  # every chunk on disk before the writer renames its files
    finally:
        stream.close()
    return w.names


class _ChunkedAverage:
    """The machinery of one streamed average: two fp32 accumulators used in turn (one is
    filled while the other's chunk is written), two read buffers used in turn (one is read
    while the other is added), each input file opened once, and one thread each for reads
    and writes so that both overlap the arithmetic."""

    def __init__(self, live: list[tuple[WeightsIndex, float]]):
        from concurrent.futures import ThreadPoolExecutor

        self.live = live  # (input, weight), zero weights left out
        self.elems = CHUNK_BYTES // 4
        self.accs = [torch.empty(self.elems, dtype=torch.float32), torch.empty(self.elems, dtype=torch.float32)]
        self.writes: list = [None, None]  # the pending write of each accumulator
        self.read_bufs = [bytearray(CHUNK_BYTES * 2), bytearray(CHUNK_BYTES * 2)]  # up to 8-byte inputs
        self.fds: dict[Path, int] = {}
        self.reader, self.writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.slot = 0  # the accumulator the next chunk goes to

    def average_tensor(self, out: ShardedWriter, name: str, dtype: str, total: int) -> None:
        """Average one floating-point tensor chunk by chunk into `out` (an empty tensor is
        one empty chunk, so the writer still marks it written)."""
        for e0 in range(0, max(total, 1), self.elems):
            n = min(self.elems, total - e0)
            acc = self._free_accumulator(n)
            self._weighted_sum(acc, name, e0, n)
            self._write_chunk(out, name, e0, acc if dtype == "F32" else acc.to(DTYPES[dtype]))

    def _free_accumulator(self, n: int) -> torch.Tensor:
        if self.writes[self.slot] is not None:
            self.writes[self.slot].result()  # this accumulator's last chunk is on disk
        return self.accs[self.slot][:n]

    def _weighted_sum(self, acc: torch.Tensor, name: str, e0: int, n: int) -> None:
        """acc = sum_j w_j x_j over one chunk, in fp32 and in input order: the in-memory
        average's operations, element for element."""
        pending = self.reader.submit(self._read_chunk, 0, name, e0, n, 0)
        for j in range(len(self.live)):
            t = pending.result()
            if j + 1 < len(self.live):  # read the next input while this one is added
                pending = self.reader.submit(self._read_chunk, j + 1, name, e0, n, (j + 1) % 2)
            wt = self.live[j][1]
            if t.dtype != torch.float32:
                t = t.float()
            if j == 0:
                torch.mul(t, wt, out=acc)
            else:
                acc.add_(t, alpha=wt)

    def _read_chunk(self, j: int, name: str, e0: int, n: int, slot: int) -> torch.Tensor:
        """Elements e0..e0+n of input j's tensor, read into read buffer `slot` (no mmap: the
        inputs' pages never pile up in this process)."""
        idx = self.live[j][0]
        info = idx.info(name)
        item = ITEMSIZE[info.dtype]
        view = memoryview(self.read_bufs[slot])[: n * item]
        got, off = 0, info.begin + e0 * item
        f = self._fd(idx.path(name))
        while got < len(view):
            k = os.preadv(f, [view[got:]], off + got)
            if k == 0:
                raise WeightsError(f"{idx.path(name)}: unexpected end of file in tensor {name!r}")
            got += k
        return torch.frombuffer(view, dtype=DTYPES[info.dtype]) if n else torch.empty(0, dtype=DTYPES[info.dtype])

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def read_whole(self, idx: WeightsIndex, name: str) -> torch.Tensor:
        """A whole tensor (the integer ones, which are copied, not averaged)."""
        return read_tensor(idx.path(name), idx.info(name), self._fd(idx.path(name)))

    def _write_chunk(self, out: ShardedWriter, name: str, e0: int, chunk: torch.Tensor) -> None:
        self.writes[self.slot] = self.writer.submit(out.write_range, name, e0, chunk)
        self.slot = 1 - self.slot

    def wait_for_writes(self) -> None:
        for f in self.writes:
            if f is not None:
                f.result()

    def close(self) -> None:
        self.reader.shutdown()
        self.writer.shutdown()
        for f in self.fds.values():
            os.close(f)


def average_models(
    sources: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out_dir: str | os.PathLike,
    card: Card | None = None,
    names: Sequence[str] | None = None,
    out_dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write sum_j w_j theta_j as an HF model directory (config and tokenizer of sources[0]).
    Weights that do not sum to 1 are normalised and the card says so."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("nothing to average: no source models")
    w, note = normalise_weights(weights, "averaging weights")
    indexes = check_compatible(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD).unlink(missing_ok=True)
    names = list(names) if names else [s.name for s in sources]
    card = card or Card(name=out.name, kind="average")
    card.parents = [{"name": n, "weight": float(x)} for n, x in zip(names, w, strict=True) if x > 0]
    if note:
        card.data = {**card.data, "note": note}
    from btm.family import family_id

    card.family = family_id(load_config(sources[0]), load_tokenizer(sources[0]))
    for old in out.glob(WEIGHTS_GLOB):
        old.unlink()
    copy_aux_files(sources[0], out)
    average_weights(indexes, w, out, {"elmforest": card.to_json()}, out_dtype, max_shard_bytes)
    if out_dtype:
        cfg = json.loads((out / CONFIG).read_text())
        cfg["dtype"] = str(DTYPES[out_dtype]).removeprefix("torch.")
        (out / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    write_card(out, card)
    return out


def average_in_memory(sources: Sequence[str | os.PathLike], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The same average with every model loaded at once (the reference the streamed version
    must match exactly; what a naive implementation does)."""
    from btm.safetensors_io import iter_tensors

    w, _ = normalise_weights(weights)
    states = [dict(iter_tensors(open_weights(s))) for s in sources]
    out = {}
    for name in states[0]:
        acc = None
        for sd, wt in zip(states, w, strict=True):
            if wt == 0:
                continue
            t = sd[name].float()
            acc = t * float(wt) if acc is None else acc.add_(t, alpha=float(wt))
        out[name] = acc
    return out


def average_files(paths: Sequence[Path], weights: Sequence[float], out_dir: Path) -> Path:
    """Average plain safetensors files with equal layout (e.g. optimizer moments)."""
    from btm.safetensors_io import SINGLE_FILE

    indexes = []
    for p in paths:
        h = read_header(p)
        indexes.append(WeightsIndex({p.name: h}, {n: p.name for n in h.tensors}))
    w, _ = normalise_weights(weights)
    average_weights(indexes, w, out_dir)
    return out_dir / SINGLE_FILE
