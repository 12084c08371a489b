"""Multi-host start-up: one JAX process per host (TPU pods, GPU clusters) or several CPU
processes on loopback (tests). On a TPU pod `jax.distributed.initialize()` finds its peers by
itself; elsewhere the coordinator address, process count and id come from flags or environment.

A dead or hung peer must surface as an error, not a silent hang: the coordination service's
heartbeat timeout (default 60 s here, `URM_JAX_HEARTBEAT_TIMEOUT`) makes every survivor fail
when one process stops answering (`urm_jax.train.supervisor` turns that into one error line).
"""

from __future__ import annotations

import os

import jax

ENV_ENABLE = "URM_JAX_DISTRIBUTED"
ENV_COORDINATOR = "URM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "URM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "URM_JAX_PROCESS_ID"
ENV_HEARTBEAT = "URM_JAX_HEARTBEAT_TIMEOUT"


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> tuple[bool, str | None, int | None, int | None]:
    """(requested, coordinator, num_processes, process_id): the flags completed from the
    environment, and whether they ask for a multi-process run (any flag, or
    URM_JAX_DISTRIBUTED=1 on a TPU pod, where JAX finds the rest itself)."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    return explicit or os.environ.get(ENV_ENABLE) == "1", coordinator, num_processes, process_id


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, heartbeat_timeout_s: int | None = None,
                     init_timeout_s: int = 300) -> bool:
    """Initialise jax.distributed when asked to (flags, or URM_JAX_DISTRIBUTED=1 for pods);
    returns whether this is a multi-process run. Must run before any other JAX call."""
    requested, coordinator, num_processes, process_id = settings(coordinator, num_processes, process_id)
    if not requested:
        return False
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit and None in (coordinator, num_processes, process_id):
        raise ValueError("multi-process runs need --coordinator HOST:PORT, --num-processes N and "
                         "--process-id K together (or none of them on a TPU pod with "
                         f"{ENV_ENABLE}=1)")
    heartbeat = heartbeat_timeout_s or int(os.environ.get(ENV_HEARTBEAT, "60"))
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat)
    return jax.process_count() > 1
