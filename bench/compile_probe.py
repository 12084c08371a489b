"""Where a command's compile seconds go, program by program: runs `urm-jax ARGS...` in this
process with JAX's compile events recorded and writes them as JSON.

    python bench/compile_probe.py OUT.json score --model M --input I --output O ...

Per program (in the order JAX met them): the function traced and its tracing seconds, the
module lowered to StableHLO and its lowering seconds, then the backend stage split into the
persistent-cache key computation, the cache read + deserialisation, and an XLA compile on a miss.
Also the totals per phase, the seconds `CompileMeter` would report, and the process's wall and
CPU seconds. An investigation tool (it wraps private JAX functions to time the key and the read);
the product's own figures come from `urm_jax.compile_cache.CompileMeter`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
from jax._src import compiler  # noqa: E402

EVENTS: list[dict] = []
STARTED = time.perf_counter()


def _now() -> float:
    return time.perf_counter() - STARTED


def _on_duration(name: str, seconds: float, **kw) -> None:
    if name.startswith(("/jax/core/compile/", "/jax/compilation_cache/", "/urm_jax/")):
        EVENTS.append({"t": round(_now(), 4), "event": name.rsplit("/", 1)[-1], "s": seconds,
                       "fun": str(kw.get("fun_name", ""))})


def _on_event(name: str, **kw) -> None:
    if name.startswith("/jax/compilation_cache/"):
        EVENTS.append({"t": round(_now(), 4), "event": name.rsplit("/", 1)[-1]})


def _timed(fn, label):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append({"t": round(_now(), 4), "event": label, "s": time.perf_counter() - start})
    return wrapper


def summarise(events: list[dict]) -> dict:
    phase = {"jaxpr_trace_duration": "trace", "jaxpr_to_mlir_module_duration": "lower",
             "backend_compile_duration": "backend", "cache_key": "cache_key", "cache_read": "cache_read",
             "xla_compile": "xla_compile", "load_duration": "store_load", "save_duration": "store_save"}
    totals = {v: 0.0 for v in phase.values()}
    counts = {"hits": 0, "misses": 0, "programs": 0, "traces": 0}
    for e in events:
        if e["event"] in phase:
            totals[phase[e["event"]]] += e["s"]
        counts["hits"] += e["event"] in ("cache_hits", "load_duration")
        counts["misses"] += e["event"] == "cache_misses"
        counts["programs"] += e["event"] == "backend_compile_duration"
        counts["traces"] += e["event"] == "jaxpr_trace_duration"
    totals["meter"] = (totals["trace"] + totals["lower"] + totals["backend"] + totals["store_load"]
                       + totals["store_save"])
    return {k: round(v, 3) for k, v in totals.items()} | counts


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)
    compiler._get_cache_key = _timed(compiler._get_cache_key, "cache_key")
    compiler._cache_read = _timed(compiler._cache_read, "cache_read")
    compiler.backend_compile_and_load = _timed(compiler.backend_compile_and_load, "xla_compile")
    from urm_jax import cli

    code = 1
    try:
        code = cli.main(argv)
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.write_text(json.dumps({"argv": argv, "code": code, "wall_s": round(_now(), 3),
                                   "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                                   "loadavg": os.getloadavg(), "summary": summarise(EVENTS),
                                   "events": EVENTS}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
