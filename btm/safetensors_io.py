"""Safetensors read/write without loading whole files.

The format is 8 bytes (little-endian u64 header length N), N bytes of JSON header
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the
tensor bytes. Whether a file is well-formed is decided by the reference library
(`safetensors.safe_open`): it refuses trailing bytes, gaps, overlaps and sizes that do not
match, so what we accept is exactly what `transformers` will later load. Only after the
library has accepted a file do we read its header ourselves, for the byte offsets of each
tensor (which the library does not expose), refusing duplicate names the library would
silently merge. Writing by hand lets us stream tensors to disk one at a time: peak memory is
one tensor, not one model.

Tensors are read with positional reads into fresh buffers rather than through mmap, so the
pages of n input files never all become resident in this process at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from btm import atomic
from btm.errors import WeightsError
from btm.model_files import WEIGHTS_FILE, WEIGHTS_INDEX

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
SINGLE_FILE = WEIGHTS_FILE
INDEX_FILE = WEIGHTS_INDEX


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | os.PathLike, *, max_file_bytes: int | None = None, name: str | None = None) -> Header:
    """Check a safetensors file with the reference library, then return its tensors' offsets,
    without reading tensor data. `name` is how errors call the file (default: its path)."""
    path = Path(path)
    label = name or str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise WeightsError(f"{label}: file not found") from None
    if max_file_bytes is not None and size > max_file_bytes:
        raise WeightsError(f"{label}: {size} bytes is over the limit of {max_file_bytes} bytes")
    if size < 8:
        raise WeightsError(f"{label}: {size} bytes is too short to be a safetensors file")
    try:
        with safe_open(path, framework="pt") as f:
            library = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise WeightsError(f"{label}: {explain_refusal(path, size, str(e))}") from None
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
    try:
        obj = json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except ValueError as e:  # the library read it, so only our stricter rule can fail here
        raise WeightsError(f"{label}: {e}") from None
    obj.pop("__metadata__", None)
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for tname, info in obj.items():
        b, e = info["data_offsets"]
        dtype = info["dtype"]
        if dtype not in DTYPES:
            raise WeightsError(f"{label}: tensor {tname!r} has dtype {dtype}, which elmforest does not handle")
        tensors[tname] = TensorInfo(tname, dtype, tuple(info["shape"]), data_start + b, data_start + e)
    if {k: (t.dtype, t.shape) for k, t in tensors.items()} != library:  # never expected: two readers disagree
        raise WeightsError(f"{label}: the header reads differently to the safetensors library; refusing it")
    return Header(path, tensors, metadata, data_start)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"the header names tensor {k!r} twice (two readers could read it two ways)")
        seen[k] = v
    return seen


def explain_refusal(path: Path, size: int, error: str) -> str:
    """What is wrong with a file the safetensors library refused, in words a contributor can
    act on (the library's own message names the rule, not the defect)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        (n,) = struct.unpack("<Q", head)
        raw = fh.read(min(n, MAX_HEADER_BYTES)) if n <= size - 8 else b""
    pickle = head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"  # only a guess once the header has failed
    if pickle and (n > MAX_HEADER_BYTES or n > size - 8 or not raw.lstrip().startswith(b"{")):
        return ("the file is a pickle (or a zip of pickles, as torch.save writes), not safetensors; save the "
                "weights with safetensors (nothing was unpickled)")
    if n > MAX_HEADER_BYTES or n > size - 8:
        return (f"not a safetensors file: its first 8 bytes announce a header of {n} bytes but the file has "
                f"{size}; weights must be saved with safetensors")
    try:
        obj = json.loads(raw)
        entries = sorted(
            (tuple(v["data_offsets"]), k, v) for k, v in obj.items() if k != "__metadata__" and isinstance(v, dict)
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"the safetensors header is not valid ({error.split(': ', 1)[-1]})"
    try:
        return _explain_layout(entries, size - 8 - n) or f"not a valid safetensors file ({error.split(': ', 1)[-1]})"
    except (ValueError, TypeError):
        return f"the safetensors header is not valid ({error.split(': ', 1)[-1]})"


def _explain_layout(entries: list, have: int) -> str | None:
    """The first layout defect of a parsed header over `have` bytes of data, or None."""
    end = 0
    for (b, e), k, v in entries:
        if b > end:
            return f"a gap of {b - end} bytes before tensor {k!r} (bytes that belong to no tensor)"
        if b < end:
            return f"tensor {k!r} overlaps the tensor before it by {end - b} bytes"
        if v.get("dtype") in ITEMSIZE:
            want = math.prod(v.get("shape", [])) * ITEMSIZE[v["dtype"]]
            if e - b != want:
                return f"tensor {k!r} takes {e - b} bytes but its shape {v.get('shape')} of {v['dtype']} needs {want}"
        end = e
    if have > end:
        return f"{have - end} bytes after the last tensor (trailing data); a safetensors file ends with its last tensor"
    if have < end:
        return (f"truncated: the header describes {end} bytes of tensor data but the file holds {have} "
                "(an interrupted copy or download?)")
    return None


def read_tensor(path: str | os.PathLike, info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor with a positional read into a new buffer (no mmap)."""
    buf = bytearray(info.nbytes)
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.begin + got)
            if n == 0:
                raise WeightsError(f"{path}: unexpected end of file in tensor {info.name!r}")
            got += n
    finally:
        if own:
            os.close(fd)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


def stream_tensors(header: Header, chunks: Iterable[bytes]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a file whose header is `header`, in the order they lie in the file,
    from one sequential pass over its bytes (`chunks`, from its first byte): a file read
    once, as it streams from a store, holding one tensor at a time. The file must be one the
    reference library accepted (read_header): tensors back to back, nothing after the last."""
    order = sorted(header.tensors.values(), key=lambda t: (t.begin, t.end))
    it = iter(chunks)
    pending = memoryview(b"")
    pos = 0  # file offset of pending[0]

    def take(n: int) -> bytearray:
        nonlocal pending, pos
        out, got = bytearray(n), 0
        while got < n:
            if not pending:
                try:
                    pending = memoryview(next(it))
                except StopIteration:
                    raise WeightsError(f"{header.path}: unexpected end of file") from None
                continue
            k = min(n - got, len(pending))
            out[got:got + k] = pending[:k]
            pending, pos, got = pending[k:], pos + k, got + k
        return out

    take(header.data_start)  # the header itself
    for info in order:
        if info.begin != pos:  # never expected of a file the library accepted
            raise WeightsError(f"{header.path}: tensor {info.name!r} is not where the file's order puts it")
        buf = take(info.nbytes)
        if info.nbytes == 0:
            yield info.name, torch.empty(info.shape, dtype=DTYPES[info.dtype])
        else:
            yield info.name, torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


# --------------------------------------------------------------------------- model directories


@dataclass(frozen=True)
class WeightsIndex:
    """Where each tensor of a model directory lives (single file or sharded)."""

    files: dict[str, Header]  # file name -> header
    location: dict[str, str]  # tensor name -> file name

    def info(self, name: str) -> TensorInfo:
        return self.files[self.location[name]].tensors[name]

    def path(self, name: str) -> Path:
        return self.files[self.location[name]].path

    @property
    def names(self) -> list[str]:
        return list(self.location)

    @property
    def metadata(self) -> dict[str, str]:
        return next(iter(self.files.values())).metadata if self.files else {}

    def signature(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: (self.info(n).dtype, self.info(n).shape) for n in self.location}


def weights_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory (the single file, or every shard)."""
    d = Path(model_dir)
    if (d / SINGLE_FILE).exists():
        return [d / SINGLE_FILE]
    if (d / INDEX_FILE).exists():
        index = json.loads((d / INDEX_FILE).read_text())
        return [d / f for f in sorted(set(index["weight_map"].values()))]
    raise WeightsError(
        f"{d}: no {SINGLE_FILE} or {INDEX_FILE}; an ELM directory holds its weights as safetensors"
    )


def open_weights(model_dir: str | os.PathLike) -> WeightsIndex:
    d = Path(model_dir)
    files: dict[str, Header] = {}
    location: dict[str, str] = {}
    if (d / SINGLE_FILE).exists():
        h = read_header(d / SINGLE_FILE)
        files[SINGLE_FILE] = h
        location = {n: SINGLE_FILE for n in h.tensors}
    elif (d / INDEX_FILE).exists():
        try:
            weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{d / INDEX_FILE}: malformed index (no weight_map)") from None
        for fname in sorted(set(weight_map.values())):
            if "/" in fname or fname.startswith("."):
                raise WeightsError(f"{d / INDEX_FILE}: shard name {fname!r} leaves the directory")
            files[fname] = read_header(d / fname)
        for name, fname in weight_map.items():
            if name not in files[fname].tensors:
                raise WeightsError(f"{d / fname}: index lists {name!r} but the shard lacks it")
            location[name] = fname
    else:
        weights_files(d)  # raises the explanatory error
    return WeightsIndex(files, location)


# --------------------------------------------------------------------------- streaming writer


class ShardedWriter:
    """Write tensors one at a time into a model directory as safetensors.

    The layout (names, dtypes, shapes, and so the header) is known up front, so each tensor
    is written straight to its final offset and freed. Files go to `*.tmp` and are renamed
    into place on `close()`; an exception leaves no partial weights file behind.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        layout: Iterable[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        max_shard_bytes: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        layout = list(layout)
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in layout:
            nbytes = math.prod(entry[2]) * ITEMSIZE[entry[1]]
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        self.sharded = len(shards) > 1
        n = len(shards)
        self.names = [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" if self.sharded else SINGLE_FILE
            for i in range(n)
        ]
        self._where: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        self._files = []
        self.total_bytes = 0
        for si, entries in enumerate(shards):
            header: dict[str, object] = {"__metadata__": self.metadata}
            off = 0
            for name, dtype, shape in entries:
                nbytes = math.prod(shape) * ITEMSIZE[dtype]
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            for name, dtype, shape in entries:
                b = header[name]["data_offsets"][0]  # type: ignore[index]
                self._where[name] = (si, start + b, dtype, shape)
            f = open(self.out_dir / (self.names[si] + ".tmp"), "wb")
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + off)
            self._files.append(f)
            self.total_bytes += off
        self._written: set[str] = set()
        self._elements: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, offset, dtype, shape = self._where[name]
        if tuple(tensor.shape) != shape or DTYPE_NAMES[tensor.dtype] != dtype:
            raise WeightsError(
                f"tensor {name!r}: got {DTYPE_NAMES.get(tensor.dtype)} {tuple(tensor.shape)}, "
                f"layout says {dtype} {shape}"
            )
        t = tensor.detach().contiguous().cpu()
        f = self._files[si]
        f.seek(offset)
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._written.add(name)

    def write_range(self, name: str, element_offset: int, tensor: torch.Tensor) -> None:
        """Write a 1-d run of elements of tensor `name`, starting at element_offset (chunked
        writers call this until every element is written)."""
        si, offset, dtype, shape = self._where[name]
        if DTYPE_NAMES[tensor.dtype] != dtype:
            raise WeightsError(f"tensor {name!r}: got {DTYPE_NAMES.get(tensor.dtype)}, layout says {dtype}")
        t = tensor.detach().reshape(-1).contiguous().cpu()
        total = math.prod(shape)
        if element_offset + t.numel() > total:
            raise WeightsError(f"tensor {name!r}: elements {element_offset}..{element_offset + t.numel()} of {total}")
        f = self._files[si]
        f.seek(offset + element_offset * ITEMSIZE[dtype])
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).numpy()))
        done = self._elements.get(name, 0) + t.numel()
        self._elements[name] = done
        if done >= total:
            self._written.add(name)

    def close(self) -> list[str]:
        missing = set(self._where) - self._written
        if missing:
            self.abort()
            raise WeightsError(f"writer closed with {len(missing)} tensors unwritten: {sorted(missing)[:5]}")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for fname in self.names:
            os.replace(self.out_dir / (fname + ".tmp"), self.out_dir / fname)
        if self.sharded:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {n: self.names[w[0]] for n, w in self._where.items()},
            }
            atomic.write_text(self.out_dir / INDEX_FILE, json.dumps(index, indent=2))
        return self.names

    def abort(self) -> None:
        for f in self._files:
            f.close()
        for fname in self.names:
            (self.out_dir / (fname + ".tmp")).unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_state_dict(
    state: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    layout = [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in state.items()]
    with ShardedWriter(out_dir, layout, metadata, max_shard_bytes) as w:
        for n, t in state.items():
            w.write(n, t)
    return w.names


def iter_tensors(index: WeightsIndex) -> Iterator[tuple[str, torch.Tensor]]:
    fds: dict[str, int] = {}
    try:
        for name in index.names:
            fname = index.location[name]
            if fname not in fds:
                fds[fname] = os.open(index.files[fname].path, os.O_RDONLY)
            yield name, read_tensor(index.files[fname].path, index.info(name), fds[fname])
    finally:
        for fd in fds.values():
            os.close(fd)
