"""Test-wide setup: 8 simulated CPU devices (mesh tests), float32 matmuls at full precision, and
a private cache for the built tokenizer so tests never touch the home directory."""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
