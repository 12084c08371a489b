"""The reward server (`urm-jax serve`, parsed and started in `urm_jax.cli`): a tool-level
package over the scoring engine.

`batcher` (the device worker: dynamic batching into the engine's fixed shapes), `app` (the HTTP
API: FastAPI), `metrics`, `server` (uvicorn on a bound socket; `ServerThread`). Nothing in the
engine imports this package.
"""
