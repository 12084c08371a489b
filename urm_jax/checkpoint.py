"""The JAX checkpoint: one directory holding

    urm_jax.json   format marker + layout version (checked on load) + each tensor's dtype
                   + each stored chunk's xxh3-64 checksum (checked by every reader)
    config.json    the HF-style model config (source of truth for shapes and RoPE)
    params/        Orbax tree of parameters in the stacked-layer layout
    tokenizer files, when the source had them

`params/` is what `orbax.checkpoint.StandardCheckpointer` writes with `use_ocdbt=False`: one zarr
(v2) array per parameter named by its dotted path, plus Orbax's `_METADATA` tree file. We write
that layout ourselves, one chunk at a time, because Orbax's save takes whole arrays and a stacked
8B parameter (gate_proj: 32 x 4096 x 14336 bf16 = 3.8 GB) does not fit the memory budget of a
conversion. Chunks are one layer of a stacked array, or up to CHUNK_BYTES of rows of another
(the embedding), stored uncompressed (bf16 weights barely compress and zstd would dominate
conversion time). Orbax
restores it unchanged (`load_params`), sharded or not; `ParamsReader` reads single chunks back,
from this layout or from any Orbax `StandardCheckpointer` params dir (OCDBT, zarr3).

A layout change bumps LAYOUT_VERSION, and loading an older or newer layout fails loudly instead
of loading wrong numbers (MaxText's scanned/unscanned and Linen/NNX drift). The storage details
above (chunking, OCDBT or not) are not part of the layout: Orbax and `ParamsReader` read both."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
import xxhash

from urm_jax.config import ModelConfig
from urm_jax.finite import check_finite, check_tree_finite
from urm_jax import io_utils
from urm_jax.io_utils import atomic_dir
from urm_jax.validate import Fields, MetadataError, read_json

# JAX, Flax and the model are imported by the functions that need them (Orbax restores, in-memory
# saves of jax arrays): the streaming converters write and read checkpoints with numpy alone, and
# those imports would be a third of a conversion's time.

FORMAT = "urm-jax"
LAYOUT_VERSION = 1
MARKER = "urm_jax.json"
PARAMS_DIR = "params"
ORBAX_METADATA = "_METADATA"
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
CHUNK_BYTES = 64 * 2**20
CHECKSUM = "xxh3_64"  # per-chunk digests in the marker; checkpoints without them still load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "generation_config.json")


def chunk_digest(data) -> str:
    """The checksum of one stored chunk's bytes (the rows it holds, without zarr's padding):
    xxh3-64 as 16 hex digits, ~10 GB/s on one core, so checking costs little next to reading."""
    return xxhash.xxh3_64_hexdigest(data)


class CheckpointError(MetadataError):
    """A urm-jax checkpoint that is missing, of another layout, or whose files are corrupt; the
    message names the file (and the field or parameter)."""


def is_jax_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a urm-jax checkpoint directory (it holds `urm_jax.json`)."""
    return (Path(path) / MARKER).is_file()


def copy_tokenizer_files(src: str | Path | None, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files (`TOKENIZER_FILES`) that exist in `src` into `dst`;
    returns the names copied (none when `src` is None). OSError if a copy fails."""
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def keystr(path: tuple[str, ...]) -> str:
    """The name `jax.tree_util.keystr` gives a leaf of a nested dict: "['gate']['fc0']['bias']"."""
    return "".join(f"[{name!r}]" for name in path)


def chunk_file_name(first_row: int, rows: int, ndim: int) -> str:
    """zarr v2's name of the chunk holding `first_row` (chunks split the first dim only)."""
    return f"{first_row // rows}{'.0' * (ndim - 1)}"


def chunk_rows(shape: tuple[int, ...], dtype, stacked: bool = False) -> int:
    """Rows of the first dim per chunk: one layer of a stacked array (conversions and partial
    reads work a layer at a time), else as many rows as fit in CHUNK_BYTES (the embedding)."""
    if stacked:
        return 1
    row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    return max(1, min(shape[0], CHUNK_BYTES // max(row_bytes, 1)))


def stacked_paths(cfg: ModelConfig) -> set[tuple[str, ...]]:
    """Parameters whose first axis is the `layers` axis (from the model's logical axes)."""
    import jax

    from urm_jax.model.urm import abstract_model, param_logical_axes

    axes = param_logical_axes(abstract_model(cfg))
    return {tuple(str(k.key) for k in path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                axes, is_leaf=lambda x: isinstance(x, tuple))[0] if leaf[:1] == ("layers",)}


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str  # '<f4': zarr v2 wants the order


class ParamsWriter:
    """Writes Orbax's `use_ocdbt=False` params layout chunk by chunk. Thread-safe across chunks.

    An uncompressed zarr v2 chunk is the chunk's C-order bytes in a file named by its chunk
    index ("3.0.0"); the last chunk along the first dim is padded to full size, as zarr requires.
    Each chunk is filled in memory (`chunk`) and written whole with write(2)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True)
        self.arrays: dict[tuple[str, ...], dict] = {}
        self._lock = threading.Lock()
        self._started = time.time_ns()

    def add(self, path: tuple[str, ...], shape: tuple[int, ...], dtype, rows: int) -> None:
        """Declare a parameter stored in chunks of `rows` rows (see `chunk_rows`)."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        if not shape:
            raise CheckpointError(f"{keystr(path)}: scalars are not parameters")
        array_dir = self.dir / ".".join(path)
        array_dir.mkdir()
        zarray = {"chunks": [rows, *shape[1:]], "compressor": None, "dimension_separator": ".",
                  "dtype": _zarr_dtype(dtype), "fill_value": None, "filters": None, "order": "C",
                  "shape": list(shape), "zarr_format": 2}
        (array_dir / ".zarray").write_text(json.dumps(zarray))
        self.arrays[path] = {"shape": shape, "dtype": dtype, "rows": rows, "dir": array_dir,
                             "todo": set(range(0, shape[0], rows)), "digests": {}}

    @contextlib.contextmanager
    def chunk(self, path: tuple[str, ...], start: int, alloc=np.empty) -> Iterator[np.ndarray]:
        """The chunk holding rows from `start` (a multiple of the chunk rows), as a writable
        array of the rows it holds, taken from `alloc(shape, dtype)` (a converter's pooled
        buffer): filled by the caller, then written to its new file and counted as written
        when the block succeeds (nothing is written when it fails)."""
        meta = self.arrays[path]
        shape, rows = meta["shape"], meta["rows"]
        if start % rows or not 0 <= start < shape[0]:
            raise AssertionError(f"{keystr(path)}: no chunk starts at row {start}")
        block = alloc((min(rows, shape[0] - start), *shape[1:]), meta["dtype"])
        yield block
        self._store(path, start, block)

    def _store(self, path: tuple[str, ...], start: int, block: np.ndarray) -> None:
        """Write the chunk starting at row `start` from `block` (C-contiguous, the rows it
        holds) with write(2) into a new file, padded to full size as zarr requires (the padding
        is zero), and record its digest. write(2) from memory costs half the CPU of filling a
        fresh shared file mapping (a page fault per 4 KB page, on pages the kernel first
        zeroes) and ENOSPC is an error, not a SIGBUS."""
        meta = self.arrays[path]
        shape, rows = meta["shape"], meta["rows"]
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        digest = chunk_digest(data)  # of the rows held, while they are in cache
        padding = (rows - block.shape[0]) * math.prod(shape[1:]) * meta["dtype"].itemsize
        io_utils.create_output(meta["dir"] / chunk_file_name(start, rows, len(shape)), padding,
                               head=data)
        with self._lock:
            meta["todo"].discard(start)
            meta["digests"][start // rows] = digest

    def write(self, path: tuple[str, ...], start: int, block: np.ndarray) -> None:
        """Write rows [start, start + len(block)) of a parameter from memory (cast to the dtype
        it was declared with); whole chunks."""
        rows, shape = self.arrays[path]["rows"], self.arrays[path]["shape"]
        for first in range(start, start + block.shape[0], rows):
            part = block[first - start:first - start + rows]
            if start % rows or part.shape != (min(rows, shape[0] - first), *shape[1:]):
                raise AssertionError(f"{keystr(path)}: block rows {start}+{block.shape[0]} "
                                     f"do not cover whole chunks of {rows} rows")
            self._store(path, first, np.asarray(part, self.arrays[path]["dtype"]))  # stored bytes

    def write_array(self, path: tuple[str, ...], value, stacked: bool = False) -> None:
        """Declare and write a whole in-memory array (numpy or a fully addressable jax.Array),
        one chunk at a time: a sharded jax.Array is gathered chunk by chunk, never whole."""
        jax = sys.modules.get("jax")  # a jax.Array exists only once JAX is loaded
        if jax is not None and isinstance(value, jax.Array) and not value.is_fully_addressable:
            raise CheckpointError(f"{keystr(path)}: spans several hosts; gather it first, or save "
                                  "with an Orbax CheckpointManager")
        rows = chunk_rows(value.shape, value.dtype, stacked)
        self.add(path, value.shape, value.dtype, rows)
        for start in range(0, value.shape[0], rows):
            self.write(path, start, np.asarray(value[start:start + rows]))

    def checksums(self) -> dict:
        """The marker's `checksums`: each chunk's digest (CHECKSUM), by parameter, in chunk order."""
        return {"algorithm": CHECKSUM, "chunks": {
            ".".join(path): [meta["digests"][k] for k in sorted(meta["digests"])]
            for path, meta in sorted(self.arrays.items())}}

    def finish(self) -> dict[str, str]:
        """Check every chunk was written, write Orbax's tree metadata; returns each dtype."""
        for path, meta in self.arrays.items():
            if meta["todo"]:
                raise AssertionError(f"{keystr(path)}: rows {sorted(meta['todo'])[:4]}... not written")
        tree = {str(path): {"key_metadata": [{"key": name, "key_type": 2} for name in path],
                            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                for path in self.arrays}  # key_type 2: a dict key
        metadata = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.dir / ORBAX_METADATA).write_text(json.dumps(metadata))
        # What StandardCheckpointer writes beside the tree metadata; without it Orbax warns on
        # every restore that the checkpoint metadata file does not exist.
        now = time.time_ns()
        (self.dir / ORBAX_CHECKPOINT_METADATA).write_text(json.dumps({
            "item_handlers": STANDARD_HANDLER, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": self._started, "commit_timestamp_nsecs": now,
            "custom_metadata": {}}))
        return {keystr(path): meta["dtype"].name for path, meta in sorted(self.arrays.items())}


@contextlib.contextmanager
def checkpoint_writer(out_dir: str | Path, hf_config: dict, *, tokenizer_dir: str | Path | None = None,
                      overwrite: bool = False) -> Iterator[ParamsWriter]:
    """Yield a ParamsWriter inside a temporary sibling of `out_dir`; when the block finishes, add
    config, tokenizer and, last, the marker, then rename into place. An error or a kill leaves no
    `out_dir` (and the temporary has no marker until everything else is written)."""
    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ParamsWriter(tmp / PARAMS_DIR)
        yield writer
        dtypes = writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        copy_tokenizer_files(tokenizer_dir, tmp)
        marker = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "layers": "stacked",
                  "rope": "rotate_half", "kernels": "[in, out]", "dtypes": dtypes,
                  "checksums": writer.checksums()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))


def save_checkpoint(out_dir: str | Path, params: dict, cfg: ModelConfig, *,
                    tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                    hf_config: dict | None = None) -> Path:
    """Write an in-memory params tree (numpy or jax arrays) + config + tokenizer atomically."""
    import jax

    with checkpoint_writer(out_dir, hf_config or cfg.hf_config, tokenizer_dir=tokenizer_dir,
                           overwrite=overwrite) as writer:
        stacked = stacked_paths(cfg)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = tuple(str(k.key) for k in path)
            writer.write_array(path, leaf, stacked=path in stacked)
    return Path(out_dir).absolute()


def read_marker(path: str | Path) -> dict:
    """The checkpoint's `urm_jax.json`, validated: a JSON object whose `format` is urm-jax's and
    whose `layout_version` this release reads. CheckpointError names the file and the field."""
    file = Path(path) / MARKER
    if not file.is_file() and not file.is_symlink():
        raise CheckpointError(f"{path}: not a urm-jax checkpoint ({MARKER} missing)")
    fields = Fields(read_json(file, CheckpointError), str(file), error=CheckpointError)
    if fields.str("format") != FORMAT:
        raise CheckpointError(f"{file}: format {fields.data['format']!r}, expected {FORMAT!r}")
    version = fields.int("layout_version", minimum=1)
    if version != LAYOUT_VERSION:
        raise CheckpointError(
            f"{file}: layout version {version}, this urm-jax reads "
            f"version {LAYOUT_VERSION}; convert it with the urm-jax release that wrote it")
    for key in ("layers", "rope", "kernels"):
        fields.str(key, None)
    fields.str_map("dtypes", None)
    checksums = fields.object("checksums", None)
    if checksums is not None:
        checksums.str("algorithm", choices=(CHECKSUM,))
        chunks = checksums.object("chunks")
        for name in chunks.data:
            chunks.str_list(name)
    return fields.data


def read_orbax_metadata(params_dir: Path) -> dict:
    """Orbax's tree metadata (`_METADATA`) of a params dir, validated before Orbax parses it
    (Orbax's own error for a corrupt file names neither file nor field)."""
    file = params_dir / ORBAX_METADATA
    fields = Fields(read_json(file, CheckpointError, what="Orbax tree metadata"), str(file),
                    error=CheckpointError)
    tree = fields.object("tree_metadata")
    for key in tree.data:
        tree.object(key)
    fields.bool("use_ocdbt", None, null_ok=True)
    fields.bool("use_zarr3", None, null_ok=True)
    return fields.data


def weights_fingerprint(path: str | Path) -> str | None:
    """What identifies a checkpoint's weights: the sha256 of its marker's per-chunk checksums
    (a digest of every stored byte, in parameter and chunk order), hex; None for a directory
    that is not a urm-jax checkpoint or one written before checksums existed. Two checkpoints
    with the same fingerprint hold the same parameters, stored the same way."""
    if not is_jax_checkpoint(path):
        return None
    checksums = read_marker(path).get("checksums")
    if not checksums:
        return None
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a urm-jax checkpoint: CheckpointError when `urm_jax.json` is missing or of
    another format/layout version, ConfigError naming the field of a bad config.json."""
    read_marker(path)
    return ModelConfig.from_hf_dir(path)


# The JSON files Orbax reads back when restoring a CheckpointManager step (each a JSON object);
# checked first, because Orbax's own error for a corrupt one names no file.
ORBAX_JSON_FILES = (ORBAX_CHECKPOINT_METADATA, ORBAX_METADATA, "_sharding", "metadata")


def check_orbax_step(step_dir: str | Path) -> None:
    """Validate the JSON metadata of an Orbax CheckpointManager step (a training checkpoint):
    `_CHECKPOINT_METADATA`, and in each item `_METADATA`, `_sharding`, `array_metadatas/*` and
    a JSON item's `metadata`. CheckpointError names the file (missing step, not JSON, not an
    object), before Orbax parses them."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"{step_dir}: checkpoint step missing")
    read_json(step_dir / ORBAX_CHECKPOINT_METADATA, CheckpointError, what="Orbax checkpoint metadata")
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        files = [item / name for name in ORBAX_JSON_FILES[1:]]
        if (item / "array_metadatas").is_dir():
            files += sorted((item / "array_metadatas").iterdir())
        for file in files:
            if file.exists() or file.is_symlink():
                read_json(file, CheckpointError, what="Orbax metadata")
        if (item / ORBAX_METADATA).exists():
            read_orbax_metadata(item)


# TensorStore's wording for an OCDBT value it could not read (truncated, missing or corrupt data
# file): `Error reading "<array>/<chunk>" in OCDBT database at local file "<dir>": <reason>`.
_OCDBT_READ = re.compile(r'Error reading "([^"]+)" in OCDBT database at [^"]*"([^"]+)":\s*(.*)')


def orbax_read_error(step_dir: str | Path, err: BaseException) -> CheckpointError | None:
    """The CheckpointError to report when Orbax failed to read a training step's data (None if
    `err` is not such a failure: re-raise it). It names the step, the array, the step's data
    files that fit TensorStore's complaint (a file of the size it found), and the reason."""
    found = None
    while err is not None and found is None:
        found = _OCDBT_READ.search(str(err))
        err = err.__cause__ or err.__context__
    if found is None:
        return None
    array, database, reason = found.group(1), Path(found.group(2)), found.group(3).splitlines()[0]
    size = re.search(r"value of size (\d+)", reason)
    files = sorted(database.glob("ocdbt.process_*/d/*")) + sorted(database.glob("d/*"))
    suspects = [f for f in files if size and f.stat().st_size == int(size.group(1))]
    where = (f"data file {', '.join(map(str, suspects))}" if suspects else
             f"a data file under {database} (missing, truncated or corrupt)")
    return CheckpointError(f"{step_dir}: training step {Path(step_dir).name} cannot be read: array "
                           f"{array} is damaged in {where}: {reason}; export or resume from another kept step")


def _params_dir(path: str | Path) -> tuple[Path, dict, dict]:
    """(the checkpoint's params dir, its Orbax metadata, its marker), both validated."""
    marker = read_marker(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing")
    checkpoint_metadata = params_dir / ORBAX_CHECKPOINT_METADATA
    if checkpoint_metadata.exists() or checkpoint_metadata.is_symlink():  # optional, but Orbax reads it
        read_json(checkpoint_metadata, CheckpointError, what="Orbax checkpoint metadata")
    return params_dir, read_orbax_metadata(params_dir), marker


def verify_checksums(path: str | Path) -> int:
    """Check every chunk of a checkpoint against the digests its writer recorded in the marker
    (each chunk file mapped and hashed in place; it also warms the page cache for the restore
    that follows). CheckpointError names the chunk file whose bytes changed. A checkpoint
    written before checksums existed has none: nothing to check. Returns the chunks checked."""
    reader = ParamsReader(path, allow_nonfinite=True)
    checked = 0
    for name in reader.digests:
        meta = reader.array(tuple(name.split(".")))
        for first in range(0, meta["shape"][0], meta["rows"]):
            reader.verify_chunk(meta, first)
            checked += 1
    return checked


def stored_param_metadata(path: str | Path) -> dict:
    """Tree of jax.ShapeDtypeStruct with each tensor's stored shape and dtype."""
    import jax
    import orbax.checkpoint as ocp  # lazily: 1.5 s of imports the streaming converters skip

    meta = ocp.StandardCheckpointer().metadata(_params_dir(path)[0]).item_metadata
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


NONFINITE_HINT = ("the checkpoint is damaged or holds a diverged training step; nothing is scored, "
                  "trained or exported from it (`python -m convert to_hf/verify --allow-nonfinite` "
                  "can still read it)")


def load_params(path: str | Path, shardings=None, *, allow_nonfinite: bool = False) -> dict:
    """Restore params with their stored dtypes: numpy arrays on the host, or jax arrays placed
    directly on their shards when `shardings` (a matching tree of NamedSharding) is given.
    A parameter holding NaN/Inf raises NonFiniteError naming it (unless `allow_nonfinite`), a
    chunk whose bytes differ from its recorded checksum CheckpointError naming the file (on one
    process; a multi-host job's processes each restore only their shards, and reading every
    chunk on every host to hash it would multiply the job's reads by its host count)."""
    import jax
    import orbax.checkpoint as ocp

    target = stored_param_metadata(path)
    if jax.process_count() == 1:
        verify_checksums(path)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              target, shardings)
    params = ocp.StandardCheckpointer().restore(Path(path).absolute() / PARAMS_DIR, target)
    if not allow_nonfinite:
        check_tree_finite(params, f"{Path(path) / PARAMS_DIR}", hint=NONFINITE_HINT)
    return params


class ParamsReader:
    """Reads row ranges of single parameters from a checkpoint's Orbax params dir, never the
    whole tree. Arrays in this package's layout (uncompressed zarr v2 chunked along the first
    dim) are read with `os.pread`, only the rows asked for (TensorStore's copy path reads a
    layer at ~0.4 GB/s, pread at disk speed). Anything else Orbax's StandardCheckpointer writes
    (OCDBT, zarr3, compression) is read with TensorStore, whole chunks at a time, so memory
    follows that checkpoint's chunking (Orbax's own saves chunk by device shard)."""

    def __init__(self, path: str | Path, *, allow_nonfinite: bool = False):
        self.allow_nonfinite = allow_nonfinite
        self.dir, metadata, marker = _params_dir(path)
        self.digests: dict[str, list[str]] = (marker.get("checksums") or {}).get("chunks", {})
        self.ocdbt = bool(metadata.get("use_ocdbt", (self.dir / "manifest.ocdbt").exists()))
        self.zarr3 = bool(metadata.get("use_zarr3", False))
        self._arrays: dict = {}
        self._lock = threading.Lock()

    def _raw(self, name: str) -> dict | None:
        """shape/dtype/rows of an array in our raw layout, or None."""
        if self.ocdbt or self.zarr3:
            return None
        file = self.dir / name / ".zarray"
        if not file.is_file():
            return None  # not zarr v2: TensorStore opens it (or names what is wrong)
        fields = Fields(read_json(file, CheckpointError), str(file), error=CheckpointError)
        shape = tuple(fields.int_list("shape", minimum=0))
        chunks = tuple(fields.int_list("chunks", minimum=1))
        zarray = fields.data
        plain = (zarray.get("compressor") is None and not zarray.get("filters")
                 and zarray.get("order") == "C" and zarray.get("dimension_separator", ".") == "."
                 and len(shape) >= 1 and chunks[1:] == shape[1:])
        if not plain:
            return None
        dtype = zarray.get("dtype")
        try:
            dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        except TypeError:
            return None
        return {"shape": shape, "dtype": dtype, "rows": chunks[0], "name": name}

    def array(self, path: tuple[str, ...]) -> dict:
        """{'shape', 'dtype', 'rows' (per chunk), and 'store' (TensorStore) unless raw}."""
        with self._lock:
            if path not in self._arrays:
                self._arrays[path] = self._open(".".join(path))
            return self._arrays[path]

    def _open(self, name: str) -> dict:
        raw = self._raw(name)
        if raw is not None:
            return raw
        import tensorstore as ts

        kvstore = ({"driver": "ocdbt", "base": f"file://{self.dir}/", "path": name}
                   if self.ocdbt else {"driver": "file", "path": str(self.dir / name)})
        spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": kvstore}
        try:
            store = ts.open(spec, open=True, read=True,
                            context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result()
        except ValueError as err:
            raise CheckpointError(f"{self.dir}: cannot open parameter {name} ({err})") from None
        return {"shape": tuple(store.shape), "dtype": np.dtype(store.dtype.numpy_dtype),
                "rows": int(store.chunk_layout.read_chunk.shape[0]), "store": store, "name": name}

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        """Shape of the parameter at `path` from its metadata (no data read)."""
        return self.array(path)["shape"]

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        """numpy dtype of the parameter at `path` as stored (bfloat16 from ml_dtypes)."""
        return self.array(path)["dtype"]

    def chunk_rows(self, path: tuple[str, ...]) -> int:
        """Rows of the first dim per stored chunk (reads aligned to these touch each chunk once)."""
        return self.array(path)["rows"]

    def _chunk_file(self, meta: dict, first: int) -> Path:
        return self.dir / meta["name"] / chunk_file_name(first, meta["rows"], len(meta["shape"]))

    def prefetch(self, path: tuple[str, ...], start: int, stop: int) -> None:
        """Start reading the chunks holding rows [start, stop) into the page cache (raw layout)."""
        meta = self.array(path)
        if "store" in meta or not hasattr(os, "posix_fadvise"):
            return
        for first in range(start - start % meta["rows"], stop, meta["rows"]):
            with contextlib.suppress(OSError):
                with open(self._chunk_file(meta, first), "rb", buffering=0) as handle:
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    def read(self, path: tuple[str, ...], start: int, stop: int, alloc=np.empty) -> np.ndarray:
        """Rows [start, stop) of a parameter (into `alloc(shape, dtype)` on the raw path)."""
        meta = self.array(path)
        name = ".".join(path)
        if "store" in meta:
            try:
                out = alloc((stop - start, *meta["shape"][1:]), meta["dtype"])
                out[...] = meta["store"][start:stop].read().result()
            except ValueError as err:
                raise CheckpointError(f"{self.dir}: cannot read parameter {name} rows "
                                      f"{start}:{stop} ({err})") from None
            self._check(out, f"{self.dir / name}: parameter {name}", start)
            return out
        shape, rows = meta["shape"], meta["rows"]
        out = alloc((stop - start, *shape[1:]), meta["dtype"])
        flat = out.reshape(stop - start, -1).view(np.uint8)
        row_bytes = flat.shape[1]
        for first in range(start - start % rows, stop, rows):  # each chunk the range touches
            lo, hi = max(start, first), min(stop, first + rows)
            file = self._chunk_file(meta, first)
            want = memoryview(flat[lo - start:hi - start].reshape(-1))
            try:
                with open(file, "rb", buffering=0) as handle:
                    if not io_utils.pread_full(handle.fileno(), want, (lo - first) * row_bytes):
                        raise CheckpointError(f"{file}: truncated chunk of parameter {name}")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: chunk of parameter {name} missing") from None
            if (lo, hi) == (first, min(first + rows, shape[0])):  # a whole chunk: its digest
                self._check_digest(meta, first, want, file)
            self._check(out[lo - start:hi - start], f"{file}: parameter {name}", lo)
        return out

    def _check_digest(self, meta: dict, first: int, data, file: Path) -> None:
        digests = self.digests.get(meta["name"])
        if digests is None:
            return
        k = first // meta["rows"]
        want = digests[k] if k < len(digests) else None
        got = chunk_digest(data)
        if got != want:
            raise CheckpointError(f"{file}: chunk of parameter {meta['name']} is corrupt (checksum "
                                  f"{got}, the writer recorded {want}); re-create the checkpoint")

    def verify_chunk(self, meta: dict, first: int) -> None:
        """Check one stored chunk (raw layout) against its recorded digest, mapped in place."""
        if "store" in meta:
            return
        row_bytes = math.prod(meta["shape"][1:]) * meta["dtype"].itemsize
        held = min(meta["rows"], meta["shape"][0] - first)
        file = self._chunk_file(meta, first)
        if not file.is_file():
            raise CheckpointError(f"{file}: chunk of parameter {meta['name']} missing")
        if file.stat().st_size < held * row_bytes:
            raise CheckpointError(f"{file}: truncated chunk of parameter {meta['name']}")
        with io_utils.mapped(file, 0, held * row_bytes, writable=False) as data:
            self._check_digest(meta, first, data, file)

    def _check(self, values: np.ndarray, what: str, first_row: int) -> None:
        if not self.allow_nonfinite:
            check_finite(values, what, hint="pass --allow-nonfinite to read it anyway",
                         first_row=first_row)
