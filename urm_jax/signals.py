"""SIGTERM as an exception: a command stopped by SIGTERM (a scheduler's preemption, `kill`)
unwinds like Ctrl-C, so every atomic writer (`urm_jax.io_utils`) removes its temporary on the
way out, and the command prints one `error:` line and exits 143. Standard library only: the
`python -m convert` tool uses it without loading JAX."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

SIGTERM_EXIT_CODE = 143  # what a shell reports for a process ended by SIGTERM (128 + 15)
INTERRUPTED_EXIT_CODE = 130  # ... and by SIGINT (Ctrl-C, 128 + 2)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread where it was between two Python steps. A BaseException,
    like KeyboardInterrupt, so no `except Exception` swallows it and every atomic writer
    (`urm_jax.io_utils`) on the way out removes its temporary."""


class SigtermRaiser:
    """While installed, SIGTERM raises Terminated in the main thread, wherever it is. Python runs
    a signal handler between any two steps of the main thread, a finalizer (`__del__`, a weakref
    or gc callback) included, and an exception cannot leave a finalizer: Python reports it as
    "ignored" and the command goes on (in a blocking read: forever). So a Terminated that ends
    up there is sent again, from a timer thread, to land in the code that comes next; sends
    repeat until one lands, and stop before the previous handler is back."""

    RESEND_S = 0.05  # how long after a swallowed Terminated it is sent again (not a deadline)

    def __enter__(self):
        self.done = False
        self.in_hook = False
        self.timers: list[threading.Timer] = []
        self.previous = signal.signal(signal.SIGTERM, self.on_sigterm)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self.on_unraisable
        return self

    def on_sigterm(self, signum, frame):
        """The SIGTERM handler: raise Terminated here (or, inside the hook, send it again)."""
        if self.in_hook:  # raised inside the hook it would be lost too: send it once more
            self.resend()
            return
        raise Terminated

    def on_unraisable(self, unraisable):
        """`sys.unraisablehook`: a Terminated a finalizer swallowed is sent again; others pass on."""
        if not isinstance(unraisable.exc_value, Terminated):
            self.previous_hook(unraisable)
            return
        self.in_hook = True
        try:
            self.resend()
        finally:
            self.in_hook = False

    def resend(self):
        """SIGTERM to the main thread again after RESEND_S seconds, from a timer thread."""
        def send():
            if not self.done:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        timer = threading.Timer(self.RESEND_S, send)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def __exit__(self, *exc):
        self.done = True
        for timer in self.timers:
            timer.cancel()
            timer.join()
        signal.signal(signal.SIGTERM, self.previous)
        sys.unraisablehook = self.previous_hook


def run_until_sigterm(run: Callable[[], int], outputs: list[str]) -> int:
    """`run()` with SIGTERM raising Terminated: the command's temporaries are removed, one
    `error:` line names the `outputs` that were not written, exit 143 (128 + SIGTERM). A command
    that handles SIGTERM itself (train's checkpoint, serve's drain) installs its own handler over
    this one while it runs. Python runs the handler between two of its steps: a SIGTERM that
    arrives while native code runs (an XLA computation, a compile, a large copy) takes effect when
    that returns; one that lands in a finalizer is raised again after it (`SigtermRaiser`)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return run()
    try:
        with SigtermRaiser():
            return run()
    except Terminated:
        kept = f"; nothing written to {', '.join(outputs)}" if outputs else ""
        print(f"error: stopped by SIGTERM{kept}", file=sys.stderr, flush=True)
        return SIGTERM_EXIT_CODE
