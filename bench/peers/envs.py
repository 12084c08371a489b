"""The peers' environments: a venv per peer under build/peers/, created on first use.

Each peer venv is layered on the environment running the bench (a `.pth` file puts its
site-packages after the venv's own), so the peer reuses the project's torch / jax / numpy builds
and pip installs only what the pins in `bench/peers/requirements-<peer>.txt` add or change
(TRL; EasyDeL with its own flax and transformers), which shadow the base versions inside that
venv only. Nothing is ever installed into the project's environment.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ROOT = REPO / "build" / "peers"


def requirements(peer: str) -> Path:
    return HERE / f"requirements-{peer}.txt"


def python(peer: str) -> Path:
    return ROOT / peer / "bin" / "python"


def ensure(peer: str, log=print) -> Path:
    """The peer venv's python, creating the venv and installing its pins when missing (or when
    the requirements file changed since the last install). Raises CalledProcessError on failure."""
    venv = ROOT / peer
    stamp = venv / ".installed"
    wanted = requirements(peer).read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return python(peer)
    log(f"[peers] creating {venv} with {requirements(peer).name} (one-off, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    own = subprocess.run([str(python(peer)), "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    base = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(own, "_urm_jax_bench_base.pth").write_text("".join(f"{p}\n" for p in base))
    subprocess.run([str(python(peer)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-r", str(requirements(peer))], check=True)
    stamp.write_text(wanted)
    return python(peer)


if __name__ == "__main__":
    for name in sys.argv[1:] or ("trl", "easydel"):
        print(ensure(name))
