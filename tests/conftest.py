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


# The longest files first (their share of a loaded 2-core run, `--durations`), then the rest in
# collection order. `make test` hands whole files to its two workers in this order
# (`--dist loadfile --no-loadscope-reorder`), so the long ones start at once and the short ones
# fill in around them: the last file to start is a short one, not the 10-minute real model.
LONGEST_FIRST = ("test_real_model.py", "test_multihost.py", "test_train_loop.py", "test_plan.py",
                 "test_restore_mesh.py", "test_compile_cache.py", "test_run_dir.py", "test_lora.py",
                 "test_train_step.py", "test_model_card.py", "test_resources.py", "test_serve.py")


def pytest_collection_modifyitems(session, config, items):
    """Order the collected tests longest file first (a stable sort: order within a file kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
