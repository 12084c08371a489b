"""Exceptions that mean "bad input", reported as one `error:` line and a non-zero exit rather
than a traceback. Programming errors are not listed here and still show their traceback."""

import contextlib
import sys
import warnings
from typing import Iterator

from urm_jax.checkpoint import CheckpointError
from urm_jax.config import ConfigError
from urm_jax.io_utils import OutputExistsError


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory for a batch (said in one line: which batch, what to lower)."""


# OSError: unreadable input, an HF dir without weights, an unwritable output, disk full.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ConfigError, OutputExistsError,
                                                OSError, ValueError, DeviceMemoryError)


def describe(err: BaseException) -> str:
    """A user error's text for its `error:` line. An OSError that carries only the operating
    system's words (`[Errno 13] Permission denied: 'x'`) reads `x: Permission denied (errno 13)`,
    the style of every other error line (the file first)."""
    text = str(err)
    if isinstance(err, OSError) and err.errno is not None and err.strerror and text.startswith("[Errno"):
        names = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{names + ': ' if names else ''}{err.strerror} (errno {err.errno})"
    return text


def _cache_entry_line(message: str) -> str | None:
    """compile_cache.entry_warning's line for JAX's warning `message`, None for any other. Only a
    process that loaded JAX can get one, and commands that never compile (the converters) must
    not pay JAX's import for asking."""
    if "jax" not in sys.modules:
        return None
    from urm_jax import compile_cache
    return compile_cache.entry_warning(message)


class NoticeWarning(UserWarning):
    """A library warning that commands show as one `warning:` line (e.g. pad id == eos id)."""


@contextlib.contextmanager
def warning_lines() -> Iterator[None]:
    """Within: each NoticeWarning prints as one `warning: ...` line on stderr, JAX's warnings
    about compilation-cache entries it could not read or write as one line for the whole run
    (they repeat per program, with JAX's source lines); other warnings show as Python shows them."""
    with warnings.catch_warnings():
        original = warnings.showwarning
        cache_reported = []

        def show(message, category, filename, lineno, file=None, line=None):
            cache_line = _cache_entry_line(str(message)) if category is UserWarning else None
            if issubclass(category, NoticeWarning):
                print(f"warning: {message}", file=sys.stderr)
            elif cache_line is not None:
                if not cache_reported:
                    cache_reported.append(True)
                    print(f"warning: {cache_line}", file=sys.stderr)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
