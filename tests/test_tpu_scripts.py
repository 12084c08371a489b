"""tpu_scripts/*.sh: the exact gcloud commands each prints under --dry-run (parsed back as a shell
would), clear failures on missing or unknown flags, shellcheck, and the worker-side commands of
launch/status/logs/stop run for real against a local stand-in for `gcloud` (one fake worker)."""

import os
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
NAMES = ("create", "setup", "launch", "status", "logs", "stop", "delete")
CONFIG = "configs/hardware/v5p-8.yaml"
LOC = ["--zone=us-east5-a"]
BASH = shutil.which("bash")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "urm-pod", "--worker=all", *LOC]


TRIPWIRE = r'''#!/usr/bin/env bash
echo "the real gcloud was called: $*" >&2
exit 99
'''


@pytest.fixture(scope="session")
def tripwire_path(tmp_path_factory):
    """A PATH whose `gcloud` fails loudly: no test ever reaches the real one."""
    bin_dir = tmp_path_factory.mktemp("tripwire")
    (bin_dir / "gcloud").write_text(TRIPWIRE)
    (bin_dir / "gcloud").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.fixture(autouse=True)
def _no_real_gcloud(tripwire_path, monkeypatch):
    monkeypatch.setenv("PATH", tripwire_path)


CEILING_S = 900.0  # the most a script or a wait may take: generous for a loaded machine


def run(name, *args, cwd=None, env=None):
    """Run tpu_scripts/NAME.sh; from a foreign directory by default (the scripts find the repo)."""
    return subprocess.run([BASH, str(SCRIPTS / f"{name}.sh"), *args], cwd=cwd or "/",
                          env=env, capture_output=True, text=True, timeout=CEILING_S)


def dry(name, *args):
    done = run(name, "--dry-run", "--name", "urm-pod", "--zone", "us-east5-a", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    return lines, [shlex.split(line) for line in lines]


def remote(argv):
    """The --command=... of a `gcloud ... ssh` argv."""
    [command] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    return command


# --- create ---------------------------------------------------------------------------------

def test_create_on_demand_exact_text():
    lines, _ = dry("create", "--type", "v5p-8")
    assert lines == ["gcloud compute tpus tpu-vm create urm-pod --zone=us-east5-a "
                     "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5"]


@pytest.mark.parametrize("args, argv", [
    (["--type", "v6e-64", "--spot"],
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "urm-pod", *LOC, "--accelerator-type=v6e-64",
      "--version=v2-alpha-tpuv6e", "--spot"]),
    (["--type", "v5p-32", "--queued"],
     ["gcloud", "compute", "tpus", "queued-resources", "create", "urm-pod", "--node-id=urm-pod", *LOC,
      "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5"]),
    (["--type", "v6e-8", "--queued", "--spot", "--project", "my-proj"],
     ["gcloud", "compute", "tpus", "queued-resources", "create", "urm-pod", "--node-id=urm-pod", *LOC,
      "--project=my-proj", "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot"]),
    (["--type=v5p-8", "--version=v2-alpha-tpuv5-custom"],
     ["gcloud", "compute", "tpus", "tpu-vm", "create", "urm-pod", *LOC, "--accelerator-type=v5p-8",
      "--version=v2-alpha-tpuv5-custom"]),
], ids=["spot", "queued", "queued-spot-project", "version"])
def test_create_variants(args, argv):
    _, parsed = dry("create", *args)
    assert parsed == [argv]


@pytest.mark.parametrize("args, message", [
    (["--type", "v4-8"], "no default runtime for v4-8: pass --version"),
    (["--type", "v5p"], "is not an accelerator type"),
])
def test_create_rejects_bad_types(args, message):
    done = run("create", "--name", "n", "--zone", "z", *args, "--dry-run")
    assert done.returncode == 2 and message in done.stderr


# --- setup ----------------------------------------------------------------------------------

def test_setup_copies_this_checkout_to_every_worker():
    _, parsed = dry("setup")
    tarball = "build/tpu/urm-jax-src.tar.gz"
    assert parsed[0] == ["mkdir", "-p", "build/tpu"]
    assert parsed[1][:3] == ["tar", "-czf", tarball] and parsed[1][-1] == "."
    assert parsed[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "urm-pod:urm-jax-src.tar.gz",
                         "--worker=all", *LOC]
    assert parsed[3][:-1] == SSH and len(parsed) == 4
    cmd = remote(parsed[3])
    assert "tar -xzf ~/urm-jax-src.tar.gz -C ~/urm-jax" in cmd
    assert "python3.11 -m venv .venv" in cmd and "sudo DEBIAN_FRONTEND=noninteractive apt-get install" in cmd
    assert ".venv/bin/pip install -q -e '.[tpu]'" in cmd


def test_setup_tarball_holds_the_package_not_the_environment(tmp_path):
    """The printed mkdir + tar lines, run as printed: the tarball has what `pip install -e` needs."""
    lines, _ = dry("setup")
    out = tmp_path / "src.tar.gz"
    tar_line = lines[1].replace("build/tpu/urm-jax-src.tar.gz", shlex.quote(str(out)))
    done = subprocess.run(["bash", "-c", tar_line], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = {n.removeprefix("./") for n in tarfile.open(out).getnames()}
    assert {"pyproject.toml", "urm_jax/memory.py", "tpu_scripts/launch.sh", CONFIG} <= names
    assert not any(n.split("/")[0] in {".git", ".venv", "build", "logs"} or "__pycache__" in n for n in names)


def test_setup_from_a_git_repository():
    _, parsed = dry("setup", "--repo", "https://github.com/acme/urm-jax.git", "--ref", "v0.1")
    assert len(parsed) == 1 and parsed[0][:-1] == SSH  # nothing copied from here
    cmd = remote(parsed[0])
    assert "git clone -q https://github.com/acme/urm-jax.git ~/urm-jax" in cmd
    assert "fetch -q https://github.com/acme/urm-jax.git v0.1" in cmd and "checkout -q --detach FETCH_HEAD" in cmd
    assert ".venv/bin/pip install -q -e '.[tpu]'" in cmd


# --- launch / status / logs / stop / delete ---------------------------------------------------

def train_argv(cmd):
    """The `urm-jax train ...` words of launch's worker command, as the worker's shell sees them."""
    words = shlex.split(cmd)
    start = words.index(".venv/bin/urm-jax")
    return words[start:words.index(">", start)], words[:start]


def test_launch_runs_the_same_training_command_on_every_worker():
    tricky = ["model=gs://bucket/urm init", "output_dir=/runs/it's $HOME", "optim.learning_rate=1e-5"]
    _, parsed = dry("launch", "--config", CONFIG, "--run", "s1", "--", *tricky)
    assert len(parsed) == 2 and parsed[1][:-1] == SSH
    # First the plan, here: the recipe with the same overrides, compiled for its TPU topology.
    assert parsed[0] == [".venv/bin/python", "-m", "urm_jax.cli", "plan", CONFIG, *tricky]
    cmd = remote(parsed[1])
    argv, before = train_argv(cmd)
    assert argv == [".venv/bin/urm-jax", "train", CONFIG, *tricky]  # quoted through two shells
    assert before[-3:] == ["URM_JAX_DISTRIBUTED=1", "JAX_PLATFORMS=tpu", "nohup"]
    assert "URM_JAX_DISTRIBUTED=1 JAX_PLATFORMS=tpu nohup .venv/bin/urm-jax train" in cmd
    assert "> ~/urm-logs/s1/$(hostname).log 2>&1 < /dev/null &" in cmd
    assert "echo $! > $pid" in cmd and "pid=~/urm-logs/s1/$(hostname).pid" in cmd
    assert "cd ~/urm-jax" in cmd


def test_launch_plan_can_be_skipped_or_use_another_python():
    _, parsed = dry("launch", "--config", CONFIG, "--no-plan")
    assert len(parsed) == 1 and parsed[0][:-1] == SSH
    _, parsed = dry("launch", "--config", CONFIG, "--plan-python", "/opt/tpu venv/bin/python", "--", "remat=full")
    assert parsed[0] == ["/opt/tpu venv/bin/python", "-m", "urm_jax.cli", "plan", CONFIG, "remat=full"]
    assert parsed[1][:-1] == SSH


def test_status_logs_stop_delete_commands():
    _, status = dry("status", "--run", "s1")
    assert status[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "urm-pod", *LOC,
                         "--format=table(name.basename(),acceleratorType,state,health,runtimeVersion)"]
    assert status[1][:-1] == SSH and "tail -n 3 ~/urm-logs/s1/$(hostname).log" in remote(status[1])
    _, queued = dry("status", "--queued")
    assert queued[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "urm-pod", *LOC,
                         "--format=value(state.state)"]
    assert "~/urm-logs/train/" in remote(queued[2])  # default run name
    _, logs = dry("logs", "--run", "s1")
    assert logs == [["mkdir", "-p", "logs/s1"],
                    ["gcloud", "compute", "tpus", "tpu-vm", "scp", "urm-pod:urm-logs/s1/*.log", "logs/s1/",
                     "--worker=all", *LOC]]
    _, logs = dry("logs", "--dest", "/tmp/my logs")
    assert logs[1][5:7] == ["urm-pod:urm-logs/train/*.log", "/tmp/my logs/"]
    _, stop = dry("stop", "--run", "s1")
    assert len(stop) == 1 and stop[0][:-1] == SSH and 'kill "$(cat $pid)"' in remote(stop[0])
    _, delete = dry("delete")
    assert delete == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "urm-pod", *LOC]]
    _, delete = dry("delete", "--queued", "--yes", "--project", "p")
    assert delete == [["gcloud", "compute", "tpus", "queued-resources", "delete", "urm-pod", *LOC,
                       "--project=p", "--force", "--quiet"]]


# --- failures -------------------------------------------------------------------------------

REQUIRED = {
    "create": ["--name", "n", "--zone", "z", "--type", "v5p-8"],
    "setup": ["--name", "n", "--zone", "z"],
    "launch": ["--name", "n", "--zone", "z", "--config", CONFIG],
    "status": ["--name", "n", "--zone", "z"],
    "logs": ["--name", "n", "--zone", "z"],
    "stop": ["--name", "n", "--zone", "z"],
    "delete": ["--name", "n", "--zone", "z"],
}


@pytest.mark.parametrize("name", NAMES)
def test_missing_required_flags_fail_clearly(name):
    args = REQUIRED[name]
    assert run(name, *args, "--dry-run").returncode == 0
    for i in range(0, len(args), 2):
        done = run(name, *args[:i], *args[i + 2:], "--dry-run")
        assert done.returncode == 2, (name, args[i])
        assert f"error: {args[i]} is required" in done.stderr and "usage:" in done.stderr
        assert done.stdout == ""  # nothing printed, nothing run


@pytest.mark.parametrize("name", NAMES)
def test_bad_flags_fail_clearly(name):
    args = REQUIRED[name]
    done = run(name, *args, "--zonee", "x", "--dry-run")
    assert done.returncode == 2 and "unknown flag --zonee" in done.stderr
    done = run(name, *args, "--dry-run", "--name")
    assert done.returncode == 2 and "--name needs a value" in done.stderr
    done = run(name, *args, "stray", "--dry-run")
    assert done.returncode == 2 and "unexpected argument 'stray'" in done.stderr
    done = run(name, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {name}.sh")


def test_launch_checks_config_and_run_name():
    done = run("launch", *REQUIRED["launch"][:4], "--config", "configs/hardware/nope.yaml", "--dry-run")
    assert done.returncode == 2 and "no such file" in done.stderr
    done = run("launch", *REQUIRED["launch"], "--run", "a b", "--dry-run")
    assert done.returncode == 2 and "--run 'a b'" in done.stderr


def test_without_gcloud_a_real_run_says_so(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with what the scripts need, and no gcloud
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    done = run("delete", *REQUIRED["delete"], env={"PATH": str(bin_dir)})
    assert done.returncode == 2 and "gcloud not found" in done.stderr


def test_scripts_are_executable_and_strict():
    for name in NAMES:
        path = SCRIPTS / f"{name}.sh"
        assert os.access(path, os.X_OK), path
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and 'source "$(dirname "$0")/common.sh"' in text
    assert "set -euo pipefail" in (SCRIPTS / "common.sh").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck); CI installs it")
def test_shellcheck_clean():
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    done = subprocess.run(["shellcheck", "-x", *scripts], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the worker side, for real, on one fake worker --------------------------------------------

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Stand-in for gcloud: `tpu-vm ssh NAME --command=CMD` runs CMD here with HOME=$FAKE_WORKER (one
# worker); `tpu-vm scp NAME:SRC DEST` copies from it. Every call is logged.
echo "$*" >> "$FAKE_WORKER.calls"
for arg; do
  case $arg in
    --command=*) cd "$FAKE_WORKER" && HOME=$FAKE_WORKER exec bash -c "${arg#--command=}" ;;
  esac
done
if [[ $4 == scp ]]; then
  src=${5#*:}
  cp "$FAKE_WORKER"/$src "$6"
fi
'''

FAKE_TRAIN = r'''#!/usr/bin/env bash
echo "argv: $*"
echo "env: URM_JAX_DISTRIBUTED=$URM_JAX_DISTRIBUTED JAX_PLATFORMS=$JAX_PLATFORMS"
echo "step 1"
exec sleep 100000  # until stop.sh (or the fixture) ends it: the test's pace never matters
'''


@pytest.fixture
def fake_worker(tmp_path):
    worker = tmp_path / "worker"
    bin_dir = tmp_path / "bin"
    (worker / "urm-jax/.venv/bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD), (worker / "urm-jax/.venv/bin/urm-jax", FAKE_TRAIN)):
        path.write_text(text)
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_WORKER=str(worker))
    yield worker, env
    for pid_file in worker.glob("urm-logs/*/*.pid"):  # end what the test started, by its pid
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def wait_for(predicate, what: str) -> None:
    """Poll until `predicate()`; fail naming what was awaited after CEILING_S."""
    end = time.monotonic() + CEILING_S
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"awaited {what} for {CEILING_S:g} s")
        time.sleep(0.05)


def test_dry_run_executes_nothing(fake_worker):
    worker, env = fake_worker
    for name in NAMES:
        assert run(name, *REQUIRED[name], "--dry-run", env=env).returncode == 0
    assert not Path(f"{worker}.calls").exists()


def test_launch_status_logs_stop_on_a_fake_worker(fake_worker, tmp_path):
    worker, env = fake_worker
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    base = ["--name", "urm-pod", "--zone", "z", "--run", "s1"]
    log = worker / "urm-logs/s1" / f"{host}.log"

    done = run("launch", *base, "--config", CONFIG, "--no-plan", "--", "model=/ckpt/a b", "output_dir=/runs/s1",
               env=env)
    assert done.returncode == 0, done.stderr
    assert f"{host}: started run s1, pid" in done.stdout
    wait_for(lambda: log.exists() and "step 1" in log.read_text(), f"'step 1' in {log}")
    text = log.read_text()
    assert f"argv: train {CONFIG} model=/ckpt/a b output_dir=/runs/s1" in text
    assert "env: URM_JAX_DISTRIBUTED=1 JAX_PLATFORMS=tpu" in text

    again = run("launch", *base, "--config", CONFIG, "--no-plan", env=env)  # one run of a name at a time
    assert again.returncode != 0 and "already running" in again.stderr

    status = run("status", *base, env=env)
    assert status.returncode == 0, status.stderr
    assert f"{host}: running" in status.stdout and "step 1" in status.stdout

    logs = run("logs", *base, "--dest", str(tmp_path / "collected"), env=env)
    assert logs.returncode == 0, logs.stderr
    assert "step 1" in (tmp_path / "collected" / f"{host}.log").read_text()

    stop = run("stop", *base, env=env)
    assert stop.returncode == 0 and f"{host}: stopped" in stop.stdout
    pid = int((worker / "urm-logs/s1" / f"{host}.pid").read_text())
    wait_for(lambda: not _alive(pid), f"the stopped run (pid {pid}) to exit")
    status = run("status", *base, env=env)
    assert f"{host}: not running" in status.stdout
    assert "not running" in run("stop", *base, env=env).stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its detached parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


FAKE_PLANNER = r'''#!/usr/bin/env bash
# Stand-in for the planning Python: records its argv, exits with $PLAN_EXIT.
echo "$*" >> "$FAKE_WORKER.plan"
echo "planned: $*"
exit "${PLAN_EXIT:-0}"
'''


@pytest.mark.parametrize("verdict", [0, 1, 3], ids=["fits", "does-not-fit", "no-libtpu"])
def test_launch_plans_first_and_a_failed_plan_takes_no_pod(fake_worker, tmp_path, verdict):
    """launch.sh runs the plan here before anything reaches a worker: a plan that fails (out of
    memory: exit 1; no TPU compiler: exit 3) stops it with a message and no gcloud call."""
    worker, env = fake_worker
    planner = tmp_path / "planner"
    planner.write_text(FAKE_PLANNER)
    planner.chmod(0o755)
    env = dict(env, PLAN_EXIT=str(verdict))
    done = run("launch", "--name", "urm-pod", "--zone", "z", "--run", "p1", "--config", CONFIG,
               "--plan-python", str(planner), "--", "remat=full", env=env)
    assert Path(f"{worker}.plan").read_text() == f"-m urm_jax.cli plan {CONFIG} remat=full\n"
    if verdict == 0:
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"planned: -m urm_jax.cli plan {CONFIG}")
        assert "started run p1" in done.stdout
    else:
        assert done.returncode == 1
        assert f"urm-jax plan did not pass for {CONFIG}" in done.stderr and "--no-plan" in done.stderr
        assert not Path(f"{worker}.calls").exists()  # no gcloud call: the pod was never touched
