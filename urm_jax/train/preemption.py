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
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = 143  # what a shell reports for a process ended by SIGTERM (128 + 15)


class TrainingPreempted(Exception):
    """The run stopped on SIGTERM after checkpointing its current step."""


class PreemptionWatch:
    """When a preempted run should checkpoint and stop. Single-process: a SIGTERM handler (installed from
    the main thread only, restored by `close`) sets a flag read at the next step boundary.
    Multi-process: JAX's preemption sync point, so every process stops at the same step."""
    def __init__(self):
        self.requested = False
        self.distributed = jax.distributed.is_initialized()
        self._previous = None
        if not self.distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True  # acted on at the next step boundary

    def reached(self, step: int) -> bool:
        """Whether to checkpoint this step and stop (the same answer on every process)."""
        if self.distributed:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                return False
        return self.requested

    def close(self) -> None:
        """Restore the SIGTERM handler that was in place before (idempotent)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
