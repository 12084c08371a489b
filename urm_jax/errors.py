"""Exceptions that mean "bad input", reported as one `error:` line and a non-zero exit rather
than a traceback. Programming errors are not listed here and still show their traceback."""

from urm_jax.checkpoint import CheckpointError
from urm_jax.config import ConfigError
from urm_jax.io_utils import OutputExistsError


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory for a batch (said in one line: which batch, what to lower)."""


# OSError: unreadable input, an HF dir without weights, an unwritable output, disk full.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ConfigError, OutputExistsError,
                                                OSError, ValueError, DeviceMemoryError)
