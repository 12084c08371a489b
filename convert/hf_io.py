"""Safetensors I/O for HF checkpoints: a validating lazy reader (single file or sharded with
`model.safetensors.index.json`) and a streaming sharded writer. Tensors are read one at a time
(safetensors maps the file; nothing else is resident), and every failure names the file or tensor.
Pickle-based `.bin` weights are refused: unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SINGLE_NAME = "model.safetensors"


class WeightsError(ValueError):
    """A checkpoint that cannot be read as it claims to be."""


class HFWeights:
    """Lazy, validated view of an HF directory's safetensors weights."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.key_to_file: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index, single = self.dir / INDEX_NAME, self.dir / SINGLE_NAME
        if index.is_file():
            self._open_index(index)
        elif single.is_file():
            for key in self._open(single).keys():
                self.key_to_file[key] = single
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

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise WeightsError(f"{file}: shard missing")
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except SafetensorError as err:
                raise WeightsError(f"{file}: corrupt or truncated safetensors file ({err})") from None
        return self._handles[file]

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsError(f"{index}: not a valid safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise WeightsError(f"{index}: names missing shard(s) {', '.join(missing)}")
        seen: dict[str, Path] = {}
        for name in files:
            file = self.dir / name
            for key in self._open(file).keys():
                if key in seen:
                    raise WeightsError(f"tensor {key} appears in both {seen[key].name} and {name}")
                seen[key] = file
        for key, name in weight_map.items():
            if key not in seen:
                raise WeightsError(f"{index}: lists {key} in {name}, but no shard holds it")
            if seen[key].name != name:
                raise WeightsError(f"{index}: lists {key} in {name}, but it is in {seen[key].name}")
        extra = sorted(set(seen) - set(weight_map))
        if extra:
            raise WeightsError(f"{index}: shards hold tensors the index does not list: {extra[:5]}")
        self.key_to_file = seen

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def _slice(self, key: str):
        if key not in self.key_to_file:
            raise WeightsError(f"{self.dir}: tensor {key} missing")
        return self._open(self.key_to_file[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """numpy-style dtype name from the header (no data read): 'bfloat16', 'float16', ..."""
        code = self._slice(key).get_dtype()
        return SAFETENSORS_DTYPES.get(code, code.lower())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._open(self.key_to_file[key]).get_tensor(key)
        except KeyError:
            raise WeightsError(f"{self.dir}: tensor {key} missing") from None
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{self.key_to_file[key]}: cannot read tensor {key} ({err})") from None

    def where(self, key: str) -> str:
        return self.key_to_file[key].name if key in self.key_to_file else str(self.dir)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20 (HF's convention: GB is decimal, GiB binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


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


def write_sharded(out_dir: Path, sizes: list[tuple[str, int]], produce: Callable[[str], np.ndarray],
                  max_shard_size: int, progress: Callable[[int], None] | None = None) -> list[str]:
    """Write `model.safetensors` or `model-0000k-of-0000n.safetensors` + index, one shard resident
    at a time; `produce(key)` makes each tensor on demand."""
    shards = plan_shards(sizes, max_shard_size)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for name, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            tensors[key] = produce(key)
            total += tensors[key].nbytes
            weight_map[key] = name
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        if progress:
            progress(len(keys))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names
