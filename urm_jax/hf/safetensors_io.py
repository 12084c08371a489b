"""Safetensors I/O for HF checkpoints, streamed both ways.

Reading: every file's header is parsed and validated up front (so a truncated shard, a corrupt
header or an index naming a missing shard fails before anything is written); tensor data is then
read with `os.pread` into a private buffer, a whole tensor or a range of its rows at a time. No
mmap: mapped file pages count towards the process's resident memory, and touching a 5 GB shard
through a mapping would make peak RSS depend on the model's size.

Writing: every shard's header is computed from the planned tensors and its data space reserved up
front; tensors (or row ranges of them) are then filled in a buffer and written into place with
pwrite(2), from any thread and in any order, so only what is being written is resident, whatever
--max-shard-size says.

Pickle-based `.bin` weights are refused: unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from urm_jax import io_utils
from urm_jax.validate import Fields, MetadataError, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
DTYPE_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 2**20  # what the safetensors library accepts


class WeightsError(MetadataError):
    """A checkpoint that cannot be read as it claims to be."""


def np_dtype_of(name: str) -> np.dtype:
    """numpy dtype of a numpy-style name, taking bfloat16 and the float8 types from ml_dtypes
    ('bfloat16' -> ml_dtypes.bfloat16, 'float32' -> float32). TypeError for an unknown name."""
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: the shard `file`, numpy-style `dtype` name, `shape`, and the
    absolute byte `offset` of its data in the file."""
    file: Path
    dtype: str  # numpy-style name: 'bfloat16', 'float16', ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (elements x itemsize)."""
        return math.prod(self.shape) * np_dtype_of(self.dtype).itemsize

    def span(self, rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
        """(shape, absolute byte offset, nbytes) of the tensor, or of rows [start, stop) of its
        first dimension (contiguous on disk)."""
        if rows is None:
            return self.shape, self.offset, self.nbytes
        row_bytes = np_dtype_of(self.dtype).itemsize * math.prod(self.shape[1:])
        return ((rows[1] - rows[0], *self.shape[1:]), self.offset + rows[0] * row_bytes,
                (rows[1] - rows[0]) * row_bytes)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header the way the safetensors library does: sane
    length, valid JSON, known dtypes, offsets that match the shapes and tile the data region
    exactly, and a file long enough to hold it (a truncated download fails here)."""
    def bad(why: str) -> WeightsError:
        return WeightsError(f"{file}: corrupt or truncated safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad("shorter than 8 bytes")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER, size - 8):
            raise bad(f"header length {length} past the end of a {size}-byte file")
        try:
            header = json.loads(handle.read(length), object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"header is not JSON: {err}") from None
        except _DuplicateKey as err:
            raise bad(f"tensor {err} is listed twice in the header") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise bad(f"__metadata__ must be an object of strings, got {metadata!r}")
    infos, spans = {}, []
    for key, meta in header.items():
        dtype, shape, (begin, end) = _entry_fields(key, meta, bad)
        info = TensorInfo(file, dtype, shape, 8 + length + begin)
        if end - begin != info.nbytes:
            raise bad(f"tensor {key}: shape {list(shape)} {dtype} needs {info.nbytes} bytes, "
                      f"offsets give {end - begin}")
        infos[key] = info
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad(f"tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if 8 + length + position != size:  # the safetensors library refuses both (truncated / not fully covered)
        raise bad(f"data needs {8 + length + position} bytes, the file has {size}")
    return infos


def _is_count(value) -> bool:
    # JSON's true/false parse as Python bools, which are ints; "8" and 8.0 are not integers either
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_fields(key: str, meta, bad: Callable[[str], WeightsError]):
    """(dtype name, shape, (begin, end)) of header entry `key`, each field's JSON type checked
    the way the safetensors library's strict parser does: `dtype` one of its names, `shape` a
    list of non-negative integers, `data_offsets` two non-negative integers, begin <= end.
    WeightsError (from `bad`) names the tensor and the field."""
    if not isinstance(meta, dict):
        raise bad(f"tensor {key}: entry must be an object with dtype, shape and data_offsets, "
                  f"got {meta!r}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in meta:
            raise bad(f"tensor {key}: {field} is missing")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"tensor {key}: dtype must be one of {', '.join(SAFETENSORS_DTYPES)}, got {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"tensor {key}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"tensor {key}: data_offsets must be two non-negative integers [begin, end] "
                  f"with begin <= end, got {offsets!r}")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), tuple(offsets)


class _DuplicateKey(Exception):
    """A JSON object key seen twice (json.loads would keep the last silently)."""


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def shard_name_inside(name: str) -> bool:
    """Whether an index's shard name is a relative path that stays inside the model directory
    (`model-00001-of-00004.safetensors`, `sub/x.safetensors`), judged on the name alone:
    a shard that is a symlink into a cache (the HF hub cache's snapshot layout) is fine."""
    path = PurePosixPath(name)
    return (bool(name) and "\\" not in name and not path.is_absolute()
            and ".." not in path.parts)


def check_not_dangling(file: Path) -> None:
    """WeightsError naming `file` when it is a symlink whose target does not exist."""
    if file.is_symlink() and not file.exists():
        raise WeightsError(f"{file}: dangling symlink (points to {os.readlink(file)}, which does "
                           "not exist)")


class HFWeights:
    """Lazy, validated view of an HF directory's safetensors weights (thread-safe reads)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.info: dict[str, TensorInfo] = {}
        index, single = self.dir / INDEX_NAME, self.dir / SINGLE_NAME
        for file in (index, single):
            check_not_dangling(file)
        if index.is_file():
            self._open_index(index)
        elif single.is_file():
            self.info = read_header(single)
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            bins = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
                p.name for p in self.dir.glob("*.pt"))
            if bins:
                raise WeightsError(
                    f"{self.dir}: only pickle weights ({', '.join(bins)}); refusing to unpickle "
                    "untrusted files. Convert them where you trust them, e.g. "
                    "`model = AutoModel...from_pretrained(dir); model.save_pretrained(out, "
                    "safe_serialization=True)`, or torch.load + safetensors.torch.save_file")
            if found:
                raise WeightsError(f"{self.dir}: safetensors files {found} but neither "
                                   f"{SINGLE_NAME} nor {INDEX_NAME}")
            raise WeightsError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}")
        self._fds = {file: os.open(file, os.O_RDONLY) for file in {i.file for i in self.info.values()}}

    def _open_index(self, index: Path) -> None:
        weight_map = Fields(read_json(index, WeightsError, what="safetensors index"), str(index),
                            error=WeightsError).str_map("weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:  # before any shard is opened: an index never reaches outside its dir
            if not shard_name_inside(name):
                key = next(k for k, v in weight_map.items() if v == name)
                raise WeightsError(f"{index}: field weight_map.{key}: shard {name!r} is not a "
                                   f"file inside {self.dir} (absolute paths and '..' are refused)")
        for name in files:
            check_not_dangling(self.dir / name)
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise WeightsError(f"{index}: names missing shard(s) {', '.join(missing)}")
        seen: dict[str, TensorInfo] = {}
        for name in files:
            for key, info in read_header(self.dir / name).items():
                if key in seen:
                    raise WeightsError(f"tensor {key} appears in both {seen[key].file.name} and {name}")
                seen[key] = info
        for key, name in weight_map.items():
            if key not in seen:
                raise WeightsError(f"{index}: lists {key} in {name}, but no shard holds it")
            if seen[key].file != self.dir / name:
                raise WeightsError(f"{index}: lists {key} in {name}, but it is in "
                                   f"{seen[key].file.name}")
        extra = sorted(set(seen) - set(weight_map))
        if extra:
            raise WeightsError(f"{index}: shards hold tensors the index does not list: {extra[:5]}")
        self.info = seen

    def close(self) -> None:
        """Close the shard file descriptors (idempotent; reads after it fail)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self) -> list[str]:
        """Tensor names of every shard, in header order (shards sorted by name)."""
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def _info(self, key: str) -> TensorInfo:
        if key not in self.info:
            raise WeightsError(f"{self.dir}: tensor {key} missing")
        return self.info[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` from the header (no data read); WeightsError if it is absent."""
        return self._info(key).shape

    def dtype(self, key: str) -> str:
        """numpy-style dtype name from the header (no data read): 'bfloat16', 'float16', ..."""
        return self._info(key).dtype

    def read(self, key: str, rows: tuple[int, int] | None = None, alloc=np.empty) -> np.ndarray:
        """A tensor, or rows [start, stop) of its first dimension (contiguous on disk), into
        `alloc(shape, dtype)`."""
        info = self._info(key)
        shape, offset, _ = info.span(rows)
        out = alloc(shape, np_dtype_of(info.dtype))
        if not io_utils.pread_full(self._fds[info.file], out, offset):
            raise WeightsError(f"{info.file}: truncated while reading tensor {key}")
        return out

    @contextlib.contextmanager
    def view(self, key: str, rows: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """A tensor (or rows of it) as a read-only array mapped from the file, valid inside the
        block: transposing or checking it costs no copy into this process first."""
        info = self._info(key)
        shape, offset, nbytes = info.span(rows)
        with io_utils.mapped(info.file, offset, nbytes, writable=False) as raw:
            yield raw.view(np_dtype_of(info.dtype)).reshape(shape)

    def prefetch(self, key: str, rows: tuple[int, int] | None = None) -> None:
        """Ask the kernel to start reading a tensor (or rows) into the page cache now, so the disk
        keeps streaming while threads transpose and write (page cache, not this process's memory)."""
        info = self._info(key)
        _, start, length = info.span(rows)
        if hasattr(os, "posix_fadvise") and length:
            os.posix_fadvise(self._fds[info.file], start, length, os.POSIX_FADV_WILLNEED)

    def get(self, key: str) -> np.ndarray:
        """Tensor `key` whole, as a new numpy array in its stored dtype (see `read`)."""
        return self.read(key)

    def where(self, key: str) -> str:
        """Name of the shard file holding `key`, for error messages (the directory when the key is absent)."""
        return self.info[key].file.name if key in self.info else str(self.dir)


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20 (HF's convention: GB is decimal, GiB binary).
    ValueError naming `flag` for text that is not a size, or a size under one byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not match:
            raise ValueError(f"{flag}: cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
        number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
        size = int(number * scale)
    if size <= 0:
        raise ValueError(f"{flag}: expected a positive size (e.g. 5GB), got {text!r}")
    return size


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one
    (a tensor larger than the limit gets a shard of its own, as transformers does)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def _header(specs: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """Safetensors header for tensors laid out in the given order, padded to 8 bytes, and each
    tensor's data offset in the file (the one layout both the header and the writes use)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    position, starts = 0, {}
    for key, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_CODES[dtype.name], "shape": list(shape),
                       "data_offsets": [position, position + nbytes]}
        starts[key] = position
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    return head, {key: len(head) + start for key, start in starts.items()}


class SafetensorsWriter:
    """`model.safetensors` or `model-0000k-of-0000n.safetensors` + index, written in place.

    Shards are planned from (key, dtype name, shape) in order; `create` writes every header and
    reserves the data (so a full disk fails at once). Then `region(key, first_row, rows)` gives a
    buffer for a tensor's bytes (or some of its rows) to fill, written into place when the block
    ends, from any thread, in any order;
    `finish` checks every byte was written and writes the index."""

    def __init__(self, out_dir: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 max_shard_size: int):
        self.dir = Path(out_dir)
        self.specs = {key: (np_dtype_of(dtype), tuple(shape)) for key, dtype, shape in specs}
        size_of = {key: math.prod(shape) * dtype.itemsize for key, (dtype, shape) in self.specs.items()}
        shards = plan_shards(size_of.items(), max_shard_size)
        n = len(shards)
        self.names = ([SINGLE_NAME] if n == 1 else
                      [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self.where: dict[str, tuple[Path, int]] = {}  # key -> (file, data offset)
        self.headers: dict[Path, tuple[bytes, int]] = {}
        for name, keys in zip(self.names, shards):
            header, offsets = _header([(k, *self.specs[k]) for k in keys])
            self.where.update((key, (self.dir / name, offsets[key])) for key in keys)
            self.headers[self.dir / name] = (header, sum(size_of[k] for k in keys))
        self.total = sum(size_of.values())
        self.todo = dict(size_of)
        self._lock = threading.Lock()

    def create(self) -> None:
        """Create every shard with its header and its data space reserved (fallocate): a full disk fails here
        with OSError naming the file, before any tensor is written. Files must not exist yet."""
        for file, (header, nbytes) in self.headers.items():
            io_utils.create_output(file, nbytes, header)

    @contextlib.contextmanager
    def region(self, key: str, first_row: int = 0, rows: int | None = None,
               alloc: Callable = np.empty) -> Iterator[np.ndarray]:
        """Rows [first_row, first_row + rows) of tensor `key` (all of it by default) as a
        writable array from `alloc(shape, dtype)` (a converter's pooled buffer) for the caller
        to fill; written into its place in the shard (`io_utils.write_at`) and counted as
        written when the block exits cleanly (nothing is written when it fails)."""
        dtype, shape = self.specs[key]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        rows = (shape[0] if shape else 1) - first_row if rows is None else rows
        block = alloc((rows, *shape[1:]) if shape else (), dtype)
        yield block
        self._write(key, first_row * row_bytes, block)

    def append(self, key: str, piece: np.ndarray) -> None:
        """Write `piece` (any shape, C order) right after the bytes of `key` written so far."""
        dtype, _ = self.specs[key]
        if piece.dtype != dtype:
            raise AssertionError(f"{key}: piece is {piece.dtype}, the tensor {dtype}")
        self._write(key, math.prod(self.specs[key][1]) * dtype.itemsize - self.todo[key], piece)

    def _write(self, key: str, start: int, values: np.ndarray) -> None:
        """Write `values`' bytes at byte `start` of tensor `key`'s data; count them written."""
        file, offset = self.where[key]
        io_utils.write_at(file, offset + start, np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        with self._lock:
            self.todo[key] -= values.nbytes

    def finish(self) -> None:
        """Check every byte of every tensor was written (AssertionError naming the first five that were not),
        then write `model.safetensors.index.json` (with `metadata.total_size` in bytes) when sharded."""
        unwritten = [key for key, left in self.todo.items() if left]
        if unwritten:
            raise AssertionError(f"tensors not (fully) written: {unwritten[:5]}")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {key: file.name for key, (file, _) in self.where.items()}}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def write_sharded(out_dir: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                  pieces: Iterable[tuple[str, np.ndarray]], max_shard_size: int,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write tensors that arrive in order as (key, array) pieces: each key's bytes in one or
    more consecutive pieces (C order; the piece's shape does not matter). One piece is resident
    at a time. `progress(nbytes, tensors_finished)` after each piece."""
    writer = SafetensorsWriter(out_dir, specs, max_shard_size)
    writer.create()
    for key, piece in pieces:
        writer.append(key, piece)
        if progress:
            progress(piece.nbytes, int(writer.todo[key] == 0))
    writer.finish()
    return writer.names
