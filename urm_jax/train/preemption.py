"""Stop cleanly when the machine is being taken away.

A spot/preemptible TPU or GPU VM gets SIGTERM shortly before it is reclaimed, and
`tpu_scripts/stop.sh` sends SIGTERM too. Instead of dying mid-step (and losing everything since
the last periodic checkpoint), the run finishes the step it is on, checkpoints it, and stops;
the same command resumes from exactly there.

Multi-process runs (`jax.distributed` initialised) use JAX's preemption sync point: JAX's own
SIGTERM notifier plus the coordination service make every process agree on one step to stop at,
so all hosts save the same step. A single process without `jax.distributed` installs its own
SIGTERM handler (it would otherwise replace JAX's notifier, so it does not in the multi-process
case).

Ctrl-C (SIGINT) is a stop request too, handled the same way (the current step is checkpointed)
but reported as an interruption (exit 130). In a multi-process run it is passed on as SIGTERM to
this process, so JAX's notifier and the sync point handle it like a preemption. A second Ctrl-C
while the first is being handled raises KeyboardInterrupt at once (the command reports it in one
line, exit 130; a step checkpoint it cut short is removed when the same command resumes).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from urm_jax.signals import INTERRUPTED_EXIT_CODE, SIGTERM_EXIT_CODE as PREEMPTED_EXIT_CODE  # noqa: E402,F401


class TrainingPreempted(Exception):
    """The run stopped on SIGTERM or SIGINT after checkpointing its current step; `exit_code`
    is the shell's status for that signal (143 or 130)."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionWatch:
    """Notes SIGTERM / SIGINT while installed (main thread only; `close` restores the previous
    handlers); `reached(step)` says whether to checkpoint that step and stop, `signal_name` and
    `exit_code` which signal asked."""

    def __init__(self):
        self.requested = False
        self.interrupted = False  # SIGINT (Ctrl-C) asked, rather than SIGTERM
        self.distributed = jax.distributed.is_initialized()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            if not self.distributed:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True  # acted on at the next step boundary

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True
        if self.distributed:  # JAX's notifier and the sync point act on SIGTERM only
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.requested = True

    @property
    def signal_name(self) -> str:
        """The signal that asked to stop: 'SIGINT (Ctrl-C)' or 'SIGTERM'."""
        return "SIGINT (Ctrl-C)" if self.interrupted else "SIGTERM"

    @property
    def exit_code(self) -> int:
        """The exit status for that signal: 130 (SIGINT) or 143 (SIGTERM)."""
        return INTERRUPTED_EXIT_CODE if self.interrupted else PREEMPTED_EXIT_CODE

    def reached(self, step: int) -> bool:
        """Whether to checkpoint this step and stop (the same answer on every process)."""
        if self.distributed:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                return False
        return self.requested

    def close(self) -> None:
        """Restore the SIGTERM/SIGINT handlers that were in place before (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
