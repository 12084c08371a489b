"""`urm-jax demo` (and `demo --real`) under signals: SIGTERM ends it in one `stopped:` line naming
the step, exit 143 (a demo's workdir is disposable: nothing to resume), also when training's own
handler stops first; Ctrl-C (SIGINT) is not swallowed: KeyboardInterrupt ends it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from faults import CEILING_S, ROOT, cli_env
from urm_jax.demo import DemoStopped, step, stop_on_sigterm
from urm_jax.train.preemption import TrainingPreempted



def start_demo(workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    """The demo as a user runs it, and its stdout lines as they come."""
    env = cli_env(1, PYTHONUNBUFFERED="1")  # one device, as a user's CPU run
    proc = subprocess.Popen([sys.executable, "-m", "urm_jax.cli", "demo", "--workdir", str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, []


def wait_for_line(proc: subprocess.Popen, lines: list[str], prefix: str) -> None:
    """Read stdout until a line starts with `prefix` (fails, naming it, if the demo ends first)."""
    found = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(CEILING_S) and any(line.startswith(prefix) for line in lines), (
        f"awaited a stdout line starting {prefix!r}; got {''.join(lines)[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_stops_on_sigterm_in_one_line_and_ctrl_c_is_not_swallowed(tmp_path, sig):
    proc, lines = start_demo(tmp_path / "demo")
    try:
        wait_for_line(proc, lines, "== 2.")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=CEILING_S)
    finally:
        proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
        assert len(stopped) == 1 and "stopped by SIGTERM during step '" in stopped[0], err[-3000:]
        assert f"{tmp_path / 'demo'} is disposable" in stopped[0]
    else:  # KeyboardInterrupt reaches `urm-jax`'s main: exit 130 there, or (uncaught) Python
        # ends the process by SIGINT itself, which a shell reports as 130 too
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err[-3000:])
        assert "stopped:" not in err and "DemoStopped" not in err


def test_a_preempted_training_step_becomes_one_demo_line(tmp_path):
    """Training's SIGTERM handler stops after checkpointing a step (TrainingPreempted, whose
    'run the same command to resume' does not hold for a demo): the demo reports the step."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(DemoStopped) as stop, stop_on_sigterm(tmp_path):
        step("5. urm-jax train configs/train/small_base_stage1.yaml")
        raise TrainingPreempted("SIGTERM: stopped after step 5 of 9, checkpoint 5 saved in x; "
                                "run the same command to resume from it")
    message = str(stop.value)
    assert message == ("urm-jax demo stopped by SIGTERM during step '5. urm-jax train "
                       "configs/train/small_base_stage1.yaml' (training stopped after step 5 of 9); "
                       f"{tmp_path} is disposable (a rerun starts over)")
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the demo's only within
