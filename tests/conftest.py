"""Test-wide setup: 8 simulated CPU devices (mesh tests), float32 matmuls at full precision, and
a private cache for the built tokenizer so tests never touch the home directory."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The persistent compilation cache (on in every urm-jax command) goes to a fresh temporary
# directory per test process and the subprocesses it starts: never the home directory.
if "URM_JAX_COMPILATION_CACHE" not in os.environ:
    os.environ["URM_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="urm-jax-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["URM_JAX_COMPILATION_CACHE"], ignore_errors=True)
sys.path.insert(0, str(Path(__file__).parent))

# `make test` installs libtpu into a side directory and names it here: the TPU-compiler tests
# (tests/test_plan.py) then run in subprocesses that alone see it. Named but missing is an error,
# never a silent skip.
_LIBTPU = os.environ.get("URM_JAX_LIBTPU_PATH")
if _LIBTPU and not (Path(_LIBTPU) / "libtpu").is_dir():
    raise RuntimeError(f"URM_JAX_LIBTPU_PATH={_LIBTPU} holds no libtpu package (make test installs it)")
