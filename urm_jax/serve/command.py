"""`urm-jax serve`: its command-line options and handler (wired into `urm_jax.cli`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

API_KEY_ENV = "URM_JAX_API_KEY"
DEFAULT_MAX_LENGTH = 4096


def _at_least(minimum: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value
    return parse


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an argparse subparsers object; returns its parser."""
    from urm_jax.model.attention import IMPLEMENTATIONS  # imports jax: only when parsers are built

    p = subparsers.add_parser(
        "serve", help="HTTP reward server: native JSON API, OpenRLHF's /get_reward, dynamic batching",
        description="Serve a URM (or a URME ensemble) over HTTP. POST /score (native), POST /get_reward "
        "(OpenRLHF --remote_rm_url), GET /health (200 once loaded and compiled), GET /metrics.")
    model = p.add_argument_group("model (as in `urm-jax score`)")
    model.add_argument("--model", required=True, action="append", metavar="PATH",
                       help="HF directory or urm-jax checkpoint; several for a URME ensemble")
    model.add_argument("--max-length", type=_at_least(1), default=DEFAULT_MAX_LENGTH,
                       help="longest sequence in tokens; every length bucket up to it is compiled at "
                       f"start (default {DEFAULT_MAX_LENGTH})")
    model.add_argument("--truncation", choices=["error", "left"], default="error",
                       help="over --max-length: reject the item (422), or drop tokens from the start keeping BOS")
    model.add_argument("--batch-size", type=_at_least(1), default=8,
                       help="rows per device batch (rounded up to a multiple of the device count); "
                       "one row per device gives one compiled shape per length bucket")
    model.add_argument("--batch-tokens", type=_at_least(1), default=None,
                       help="token budget per device batch: long buckets get fewer rows")
    model.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                       help="default: the checkpoint's backbone dtype")
    model.add_argument("--gate-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="default: the checkpoint's gate dtype")
    model.add_argument("--attention", choices=IMPLEMENTATIONS, default="reference",
                       help="attention implementation (see `urm-jax score --help`)")
    model.add_argument("--no-warmup", action="store_true",
                       help="turn ready right after loading; each batch shape then compiles on first use")
    model.add_argument("--compilation-cache", default=None, metavar="DIR",
                       help="JAX persistent compilation cache: a restart reuses the compiled shapes")

    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    net.add_argument("--port", type=_at_least(0), default=8000, help="TCP port (0: any free port)")
    net.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' (all but /health); default: ${API_KEY_ENV}")

    batching = p.add_argument_group("batching and limits")
    batching.add_argument("--max-batch-items", type=_at_least(1), default=64,
                          help="sequences per device dispatch; a larger request is split and reassembled")
    batching.add_argument("--max-wait-ms", type=_at_least(0, float), default=5.0,
                          help="how long a queued request may wait for requests still arriving to share "
                          "its dispatch (none arriving: no wait)")
    batching.add_argument("--max-items", type=_at_least(1), default=1024, help="items per request (413 beyond)")
    batching.add_argument("--max-body-bytes", type=_at_least(1), default=64 << 20,
                          help="request body size (413 beyond; checked before reading it)")
    batching.add_argument("--body-timeout", type=_at_least(0.001, float), default=60.0,
                          help="seconds for a request body to arrive (408 beyond)")
    batching.add_argument("--max-queued-items", type=_at_least(1), default=16384,
                          help="queued sequences beyond which requests get 503 + Retry-After")
    batching.add_argument("--std-penalty", type=_at_least(0, float), default=0.0,
                          help="/get_reward's default penalty: reward - S * sqrt(uncertainty)")

    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn access log)")
    p.add_argument("--no-progress", action="store_true", help="no warm-up progress bar on stderr")
    return p


def run_serve(args) -> int:
    """Handle `urm-jax serve`: bind, print the URL, load and compile on the device worker while
    /health answers 503, serve until SIGINT/SIGTERM (graceful: in-flight requests finish).
    Returns 0 (also after SIGINT/SIGTERM); a model that fails to load stops the server and its
    error is raised (the CLI prints it as one `error:` line, exit 2, for bad input)."""
    # Imported here, not at the top: the web stack and the engine load only for this command,
    # so `urm-jax --help` and the other commands stay light.
    from urm_jax.scoring import Ensemble
    from urm_jax.serve.app import Limits, create_app
    from urm_jax.serve.batcher import Batcher
    from urm_jax.serve.server import bind_socket, is_loopback, socket_url, uvicorn_server

    for path in args.model:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such model directory")
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              f"(--api-key or ${API_KEY_ENV})", file=sys.stderr)

    def log(message: str) -> None:
        print(f"urm-jax serve: {message}", file=sys.stderr, flush=True)

    def load() -> Ensemble:
        return Ensemble.load(args.model, compute_dtype=args.compute_dtype, gate_dtype=args.gate_dtype,
                             batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                             max_length=args.max_length, truncation=args.truncation,
                             attention=args.attention)

    batcher = Batcher(load, max_batch_items=args.max_batch_items, max_wait_s=args.max_wait_ms / 1000,
                      max_queued_items=args.max_queued_items, warmup=not args.no_warmup,
                      log=log, progress=not args.no_progress)
    limits = Limits(max_items=args.max_items, max_body_bytes=args.max_body_bytes,
                    body_timeout_s=args.body_timeout, default_std_penalty=args.std_penalty)
    sock = bind_socket(args.host, args.port)
    server = uvicorn_server(create_app(batcher, limits=limits, api_key=api_key),
                            log_level=args.log_level, access_log=args.access_log)
    batcher.on_failure = lambda err: setattr(server, "should_exit", True)
    print(f"listening on {socket_url(sock)}", flush=True)
    log("GET /health answers 503 until the model is loaded and compiled, then 200")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was installed before it: this one notes it, so a requested stop exits 0 (no
    # KeyboardInterrupt traceback, no death by signal).
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if batcher.error is not None:
        raise batcher.error
    log("stopped" + (f" ({signal.Signals(received[0]).name})" if received else ""))
    return 0
