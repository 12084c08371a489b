"""The reward server (`urm-jax serve`): a tool over the scoring engine.

`batcher` (the device worker: dynamic batching into the engine's fixed shapes), `app` (the HTTP
API: FastAPI), `metrics`, `server` (uvicorn on a bound socket; `ServerThread`), `command` (the
CLI options and handler). Nothing in the engine imports this package.
"""

from urm_jax.serve.command import add_serve_parser, run_serve

__all__ = ["add_serve_parser", "run_serve"]
