"""A thin parent for multi-process `urm-jax train`: a lost peer ends in one `error:` line.

When one process of a multi-host job dies (its host fails, is preempted without notice, or is
killed), JAX's coordination service notices the missing heartbeats and every survivor is
terminated with SIGABRT from a runtime thread (`LOG(FATAL)` in the distributed client, after
C++ logs and a stack trace, often after a Python traceback from a failed collective). Nothing in
the training process can turn that into a clean exit: `jax.distributed.initialize` offers no way
to replace the fatal callback, and the abort comes from a C++ thread while the main thread may be
blocked inside a collective. So a multi-process `urm-jax train` runs the training as a child
process and waits for it:

* The child's stdout is the parent's. Its stderr passes through live until the first sign of
  trouble (a Python traceback, or a runtime log line about the coordination service, heartbeats
  or a fatal check); from there on it is held back until the child ends.
* The child ends on its own (0, 2 for bad input, 143 when preempted, ...): whatever was held back
  is printed and the parent exits with the child's status.
* The child dies of a signal, or fails with the coordination service's or a collective's errors:
  the parent prints one `error:` line naming the lost process (from the coordination service's
  words) and the newest intact checkpoint to resume from, writes what was held back to
  `<output_dir>/failure-process<K>.log`, and exits PEER_LOST_EXIT_CODE.

SIGTERM, SIGINT and SIGHUP to the parent are passed to the child (preemption works as in a single
process: the child checkpoints and exits 143, or 130 for SIGINT). The child runs in its own
process group, so a terminal's Ctrl-C reaches it once, through the parent. The child dies with its parent
(PR_SET_PDEATHSIG), so killing the parent still kills that process of the job.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

PEER_LOST_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: not the input's fault; restart to resume
SUPERVISED_ENV = "URM_JAX_SUPERVISOR_PID"

_TERMINATORS = re.compile(rb"[\r\n]")
# Where held-back output starts: a Python traceback, a fatal check, or a runtime log line
# (glog: level letter, MMDD HH:MM:SS) about the job's coordination.
_TROUBLE = re.compile(
    rb"^(Traceback \(most recent call last\)|\*\*\* Check failure|Fatal Python error"
    rb"|[EFW]\d{4} \d\d:\d\d:\d\d\.\d+ .*(coordination|heartbeat|Terminating process|barrier"
    rb"|preemption_sync|distributed))")
# Signs, in the held-back text, that the job lost a process (rather than failing on its own).
_PEER_SIGNS = re.compile(r"coordination service|heartbeat|Gloo|Connection reset by peer|"
                         r"Terminating process because the JAX distributed service|leader task", re.I)


def adopt() -> None:
    """In the child: die with the supervising parent (SIGKILL when it goes, however it goes)."""
    parent = os.environ.get(SUPERVISED_ENV)
    if not parent:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(PEER_LOST_EXIT_CODE)


def is_supervised() -> bool:
    """Whether this process was started by the multi-process supervisor (URM_JAX_SUPERVISOR_PID is set)."""
    return bool(os.environ.get(SUPERVISED_ENV))


def lost_process(text: str) -> str | None:
    """The process (task) the coordination service reported lost, as a string, if it said."""
    for pattern in (r"[Tt]ask (\d+) heartbeat timeout",
                    r"stopped sending heartbeats\):\s*(\d+(?:\s*,\s*\d+)*)",
                    r"/task:(\d+)\b[^\n]*(?:heartbeat|unhealthy|crashed|failed)"):
        found = re.search(pattern, text)
        if found:
            return re.sub(r"\s+", "", found.group(1)).replace(",", ", ")
    if re.search(r"leader task|Failed to send RPC to coordination service", text):
        return "0"  # the coordinator: process 0 hosts the coordination service
    return None


def newest_checkpoint(output_dir: Path | None) -> str:
    """'step N in DIR' for the newest complete step checkpoint, or why there is none."""
    if output_dir is None:
        return "see the run's checkpoints/"
    checkpoints = output_dir / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if not steps:
        return f"none yet in {checkpoints} (the run starts again)"
    return f"step {steps[-1]} in {checkpoints} is intact"


def supervise(argv: list[str], *, process_id: int | None, num_processes: int | None,
              output_dir: Path | None) -> int:
    """Run `urm-jax <argv>` as a child and translate its death (see the module docstring).
    Returns the exit status for this process."""
    env = dict(os.environ, **{SUPERVISED_ENV: str(os.getpid())})
    # Its own process group: a terminal's Ctrl-C reaches the parent alone, which passes it on
    # once (in the parent's group the child would get it twice, and a second Ctrl-C means "stop
    # now", not "checkpoint and stop").
    child = subprocess.Popen([sys.executable, "-m", "urm_jax.cli", *argv], stderr=subprocess.PIPE,
                             env=env, process_group=0)
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda sig, frame: child.send_signal(sig)) for sig in forwarded}
    held: list[bytes] = []
    holding = False
    try:
        pending = b""
        while chunk := os.read(child.stderr.fileno(), 65536):
            pending += chunk
            pieces = _TERMINATORS.split(pending)
            ends = _TERMINATORS.findall(pending)
            pending = pieces.pop()  # an unfinished line waits for its terminator
            for piece, end in zip(pieces, ends):
                holding = holding or bool(_TROUBLE.match(piece))
                held.append(piece + end) if holding else _write(piece + end)
        if pending:
            held.append(pending) if holding else _write(pending)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # the parent itself is failing: do not leave the child behind
            child.kill()
            child.wait()
    text = b"".join(held).decode("utf-8", "replace")
    lost = lost_process(text)
    # Died of a signal (the coordination service aborts survivors), or failed naming a lost peer.
    if not (status < 0 or (status not in (0, 2, 130, 143) and lost is not None)):
        _write(text.encode())
        return status
    me = f"process {process_id}" if process_id is not None else "this process"
    log = _save_log(text, output_dir, process_id)
    if lost is not None or _PEER_SIGNS.search(text):
        who = f"process {lost}" if lost else "a process"
        job = f"the {num_processes} processes of this job" if num_processes else "this job's processes"
        message = (f"{who} of {job} was lost (it died, was preempted or stopped answering); {me} "
                   f"stopped too. Newest checkpoint: {newest_checkpoint(output_dir)}; restart every "
                   "process with the same command to resume from it")
        code = PEER_LOST_EXIT_CODE
    else:
        name = signal.Signals(-status).name if status < 0 else f"exit status {status}"
        message = (f"{me} of the job died ({name}); newest checkpoint: {newest_checkpoint(output_dir)}")
        code = 128 - status if status < 0 else status
    print(f"error: {message}" + (f" (runtime log: {log})" if log else ""), file=sys.stderr, flush=True)
    return code


def _write(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def _save_log(text: str, output_dir: Path | None, process_id: int | None) -> Path | None:
    """Keep what was held back (tracebacks, runtime logs) for whoever investigates."""
    if not text.strip() or output_dir is None or not output_dir.is_dir():
        return None
    path = output_dir / f"failure-process{process_id if process_id is not None else ''}.log"
    try:
        path.write_text(text)
    except OSError:
        return None
    return path
