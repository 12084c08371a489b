"""SIGTERM as an exception: a command stopped by SIGTERM (a scheduler's preemption, `kill`)
unwinds like Ctrl-C, so every atomic writer (`urm_jax.io_utils`) removes its temporary on the
way out, and the command prints one `error:` line and exits 143. Standard library only: the
`python -m convert` tool uses it without loading JAX."""

from __future__ import annotations

import os
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
    """While installed, SIGTERM raises Terminated in the main thread, wherever it is, and a Ctrl-C
    is never lost. Python runs a signal handler between any two steps of the main thread, a
    finalizer (`__del__`, a weakref or gc callback; tqdm's bar has one) included, and an
    exception cannot leave a finalizer: Python reports it as "ignored" and the command goes on
    (in a blocking read: forever; at the end: exit 0 as if nothing happened). So a Terminated or
    KeyboardInterrupt that ends up there is sent again, from a timer thread, to land in the code
    that comes next; sends repeat until one lands, and stop before the previous handler is
    back. A swallowed Ctrl-C none of whose resends landed before the block ended is raised as
    the block ends (when no other exception leaves it): the command reports Ctrl-C, not
    success. SIGINT is watched only while it has Python's default handler (a command with its
    own, like train's, keeps it)."""

    RESEND_S = 0.05  # how long after a swallowed signal it is sent again (not a deadline)

    def __enter__(self):
        self.done = False
        self.in_hook = False
        self.lost_interrupt = False  # a swallowed Ctrl-C not raised again yet
        self.timers: list[threading.Timer] = []
        self.previous = signal.signal(signal.SIGTERM, self.on_sigterm)
        self.previous_int = None
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous_int = signal.signal(signal.SIGINT, self.on_sigint)
        self.previous_hook, sys.unraisablehook = sys.unraisablehook, self.on_unraisable
        return self

    def on_sigterm(self, signum, frame):
        """The SIGTERM handler: raise Terminated here (or, inside the hook, send it again)."""
        if self.in_hook:  # raised inside the hook it would be lost too: send it once more
            self.resend(signal.SIGTERM)
            return
        raise Terminated

    def on_sigint(self, signum, frame):
        """The SIGINT handler: raise KeyboardInterrupt here, as Python's own does (or, inside the
        hook, send it again)."""
        if self.in_hook:
            self.resend(signal.SIGINT)
            return
        self.lost_interrupt = False  # this one is raised where code can see it
        raise KeyboardInterrupt

    def on_unraisable(self, unraisable):
        """`sys.unraisablehook`: a Terminated or KeyboardInterrupt a finalizer swallowed is sent
        again; others pass on."""
        sent = {Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}.get(
            type(unraisable.exc_value))
        if sent is None or (sent == signal.SIGINT and self.previous_int is None):
            self.previous_hook(unraisable)
            return
        self.in_hook = True
        try:
            self.lost_interrupt |= sent == signal.SIGINT
            self.resend(sent)
        finally:
            self.in_hook = False

    def resend(self, signum: int):
        """Signal `signum` to the main thread again after RESEND_S seconds, from a timer thread."""
        def send():
            if not self.done:
                signal.pthread_kill(threading.main_thread().ident, signum)
        timer = threading.Timer(self.RESEND_S, send)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def __exit__(self, exc_type, *exc):
        self.done = True
        for timer in self.timers:
            timer.cancel()
            timer.join()
        signal.signal(signal.SIGTERM, self.previous)
        if self.previous_int is not None:
            signal.signal(signal.SIGINT, self.previous_int)
        sys.unraisablehook = self.previous_hook
        if self.lost_interrupt and exc_type is None:
            raise KeyboardInterrupt  # a Ctrl-C a finalizer swallowed: the command did not succeed


def output_ids(outputs: list[str]) -> dict[str, tuple[int, int] | None]:
    """(device, inode) of each output path, None where it does not exist: taken before a command
    runs, it tells afterwards which outputs it renamed into place (`stopped_note`)."""
    ids = {}
    for path in outputs:
        try:
            st = os.stat(path)
            ids[path] = (st.st_dev, st.st_ino)
        except OSError:
            ids[path] = None
    return ids


def stopped_note(before: dict[str, tuple[int, int] | None]) -> str:
    """What a stopped command's `error:` line says of its outputs (`before`: `output_ids` taken
    when it started): the ones renamed into place before the signal came are complete (an
    output is renamed only when whole), the others were not written (an existing one is kept)."""
    now = output_ids(list(before))
    written = [p for p in before if now[p] is not None and now[p] != before[p]]
    kept = [p for p in before if p not in written]
    notes = []
    if written:
        notes.append(f"{', '.join(written)} was written in full before it stopped")
    if kept:
        notes.append(f"nothing written to {', '.join(kept)}")
    return "".join(f"; {n}" for n in notes)


def run_until_sigterm(run: Callable[[], int], outputs: list[str]) -> int:
    """`run()` with SIGTERM raising Terminated: the command's temporaries are removed, one
    `error:` line names the `outputs` that were not written, exit 143 (128 + SIGTERM). A command
    that handles SIGTERM itself (train's checkpoint, serve's drain) installs its own handler over
    this one while it runs. Python runs the handler between two of its steps: a SIGTERM that
    arrives while native code runs (an XLA computation, a compile, a large copy) takes effect when
    that returns; one that lands in a finalizer is raised again after it (`SigtermRaiser`)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return run()
    before = output_ids(outputs)
    try:
        with SigtermRaiser():
            return run()
    except Terminated:
        print(f"error: stopped by SIGTERM{stopped_note(before)}", file=sys.stderr, flush=True)
        return SIGTERM_EXIT_CODE
