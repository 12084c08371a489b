"""The reward server's HTTP side (FastAPI/Starlette): request limits, parsing, responses.

Endpoints
* ``POST /score`` (native): ``{"items": [item, ...], "std_penalty": s}`` (``std_penalty``
  optional). An item is a `urm-jax score` input line (``{"messages": [...]}``,
  ``{"prompt", "response"}``, ``{"input_ids": [...]}``) or ``{"text": rendered_chat}``, with an
  optional ``"id"`` passed through. Answer: ``{"results": [...]}``, one record per item in order,
  exactly `urm-jax score`'s output line (``reward``; ``mean``, ``log_std``, ``variance``,
  ``gate`` by attribute; ``uncertainty``; ``num_tokens``; ``truncated``; an ensemble's record
  has ``max_reward_gap``, ``max_cov_frobenius`` and ``members``), plus ``penalized_reward`` =
  reward - std_penalty * sqrt(uncertainty) when ``std_penalty`` is given.
* ``POST /get_reward`` (OpenRLHF's remote reward model): ``{"query": [text, ...]}`` (its
  ``prompts`` / ``labels`` are accepted and ignored), texts already rendered by the chat
  template (see `urm_jax.data.tokenization.text_ids` for the BOS rule). Answer: ``{"rewards":
  [...], "scores": [...], "extra_logs": {"urm_reward": [...], "urm_uncertainty": [...]}}``;
  rewards (= scores) are penalised when ``std_penalty`` is given in the body or as a URL query
  parameter (``--remote_rm_url http://host:port/get_reward?std_penalty=0.5``), else by the
  server's default; ``urm_reward`` is always the raw reward.
* ``GET /health``: 503 while loading or compiling (body: state and progress), 200 when ready.
* ``GET /metrics``: JSON counters, batch fill, queue/latency/device-time quantiles.

Errors are ``{"error": message, "item": index}`` (``item`` when one item is at fault): 400 bad
JSON or a body the client did not finish sending, 401 missing/wrong bearer token, 408 body too
slow, 413 body or item count over the limit, 422 a well-formed request with a bad item or field,
503 not ready / busy (with Retry-After). Responses are standard JSON: a non-finite model output
(NaN, +-inf: broken weights, an fp16 overflow) is written as ``null`` and counted in
``/metrics`` (``non_finite_values``), never as NaN/Infinity.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import math
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from urm_jax.api import encode_item
from urm_jax.rewards import penalized_reward
from urm_jax.jsonl import json_safe
from urm_jax.serve.batcher import Batcher, NotReady, ServerBusy

OPEN_PATHS = ("/health",)  # answered without the bearer token (load balancers, probes)
INLINE_FORMAT_ITEMS = 64  # answers of up to this many items are built on the event loop
STOP_TIMEOUT_S = 60.0  # at shutdown, how long to wait for the device worker to finish


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request limits. ``max_items``: items per request; ``max_body_bytes``: request body size,
    checked from Content-Length before reading and while reading; ``body_timeout_s``: seconds
    to receive the whole body; ``default_std_penalty``: /get_reward's penalty when the request
    names none."""

    max_items: int = 1024
    max_body_bytes: int = 64 << 20
    body_timeout_s: float = 60.0
    default_std_penalty: float = 0.0


class RequestError(Exception):
    """A request the server refuses: HTTP status and one message (naming the item, if any)."""

    def __init__(self, status: int, message: str, item: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.item, self.headers = status, message, item, headers or {}

    def body(self) -> dict:
        """The JSON error body: {"error": message}, plus "item" (the index of the item) when one is named."""
        return {"error": self.message} if self.item is None else {"error": self.message, "item": self.item}


class _ClientGone(Exception):
    """The client disconnected before the response."""


@dataclasses.dataclass
class _Parsed:
    sequences: list[list[int]]
    truncated: list[bool]
    ids: list  # per item: its "id", or _NO_ID
    std_penalty: float | None


_NO_ID = object()


def json_response(payload: Any, status: int = 200, headers: dict | None = None) -> Response:
    """Standard JSON only: `allow_nan=False` fails loudly rather than write NaN/Infinity."""
    return Response(json.dumps(payload, allow_nan=False, separators=(",", ":")).encode(),
                    status_code=status, media_type="application/json", headers=headers)


# --- parsing (runs on the tokenizer thread, never on the event loop) ----------------------------


def _load_json(body: bytes) -> Any:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=reject)
    except UnicodeDecodeError as err:
        raise RequestError(400, f"request body is not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"request body is not valid JSON: {err.msg} at line {err.lineno} "
                                f"column {err.colno}") from None
    except ValueError as err:
        raise RequestError(400, f"request body is not standard JSON: {err}") from None


def _std_penalty(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RequestError(422, f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RequestError(422, f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


def _list_field(obj: Any, key: str, limits: Limits, *, example: str) -> list:
    if not isinstance(obj, dict):
        raise RequestError(422, f"the request body must be a JSON object like {example}, "
                                f"got a JSON {type(obj).__name__}")
    if key not in obj:
        raise RequestError(422, f"the request has no {key!r} field (keys: {sorted(obj)}); expected {example}")
    items = obj[key]
    if not isinstance(items, list) or not items:
        raise RequestError(422, f"{key!r} must be a non-empty list")
    if len(items) > limits.max_items:
        raise RequestError(413, f"{len(items)} items in {key!r}, more than the server's --max-items={limits.max_items}")
    return items


def _encode_all(batcher: Batcher, items: list, to_example: Callable[[int, Any], dict]) -> tuple[list, list]:
    sequences, truncated = [], []
    for i, item in enumerate(items):
        try:
            ids, cut = encode_item(batcher.ensemble, to_example(i, item))
        except ValueError as err:
            raise RequestError(422, f"item {i}: {err}", item=i) from None
        sequences.append(ids)
        truncated.append(cut)
    return sequences, truncated


def parse_score(batcher: Batcher, limits: Limits, body: bytes, query: dict) -> _Parsed:
    """A ``POST /score`` body -> token ids per item (RequestError on anything wrong)."""
    obj = _load_json(body)
    items = _list_field(obj, "items", limits, example='{"items": [{"messages": [...]}, ...]}')
    unknown = sorted(set(obj) - {"items", "std_penalty"})
    if unknown:
        raise RequestError(422, f"unknown request field(s) {unknown}; expected 'items' and optional 'std_penalty'")
    penalty = None if obj.get("std_penalty") is None else _std_penalty(obj["std_penalty"], "'std_penalty'")

    def example(i, item):
        if not isinstance(item, dict):
            raise ValueError(f"must be a JSON object, got a JSON {type(item).__name__}")
        return item

    sequences, truncated = _encode_all(batcher, items, example)
    return _Parsed(sequences, truncated, [item.get("id", _NO_ID) for item in items], penalty)


def parse_get_reward(batcher: Batcher, limits: Limits, body: bytes, query: dict) -> _Parsed:
    """An OpenRLHF ``POST /get_reward`` body -> token ids per query text."""
    obj = _load_json(body)
    queries = _list_field(obj, "query", limits, example='{"query": ["<rendered chat>", ...]}')
    if obj.get("std_penalty") is not None:
        penalty = _std_penalty(obj["std_penalty"], "'std_penalty'")
    elif query.get("std_penalty") is not None:
        penalty = _std_penalty(query["std_penalty"], "the URL parameter std_penalty")
    else:
        penalty = limits.default_std_penalty

    def example(i, text):
        if not isinstance(text, str):
            raise ValueError(f"query[{i}] must be a string (a rendered chat), got a JSON {type(text).__name__}")
        return {"text": text}

    sequences, truncated = _encode_all(batcher, queries, example)
    return _Parsed(sequences, truncated, [_NO_ID] * len(queries), penalty)


# --- responses ----------------------------------------------------------------------------------


def format_score(parsed: _Parsed, scores) -> tuple[dict, int]:
    """({"results": [...]}, number of non-finite values written as null)."""
    penalized = None if parsed.std_penalty is None else \
        penalized_reward(scores.reward, scores.uncertainty, parsed.std_penalty)
    results = []
    for i, item_id in enumerate(parsed.ids):
        record = {} if item_id is _NO_ID else {"id": item_id}
        record.update(scores.record(i))
        if penalized is not None:
            record["penalized_reward"] = float(penalized[i])
        results.append(record)
    results, bad = json_safe(results)
    return {"results": results}, bad


def format_get_reward(parsed: _Parsed, scores) -> tuple[dict, int]:
    """(OpenRLHF's {"rewards", "scores", "extra_logs"}, number of non-finite values written as
    null): rewards = scores, penalised when the request's std_penalty is > 0; extra_logs hold the
    raw reward and the uncertainty, one per query (float, from float32 / an ensemble's float64)."""
    raw = [float(r) for r in scores.reward]
    rewards = raw if not parsed.std_penalty else \
        [float(r) for r in penalized_reward(scores.reward, scores.uncertainty, parsed.std_penalty)]
    payload = {"rewards": rewards, "scores": list(rewards),
               "extra_logs": {"urm_reward": raw, "urm_uncertainty": [float(u) for u in scores.uncertainty]}}
    return json_safe(payload)


# --- the app ------------------------------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: every path but `OPEN_PATHS` needs ``Authorization: Bearer <api_key>``."""

    def __init__(self, app, api_key: str, on_reject: Callable[[], None] = lambda: None):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject

    async def __call__(self, scope, receive, send):
        """ASGI entry: an HTTP request outside `OPEN_PATHS` without the exact bearer token (compared in
        constant time) gets 401 with `WWW-Authenticate: Bearer`; everything else passes to the app."""
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                self._on_reject()
                response = json_response({"error": "missing or wrong bearer token (Authorization: Bearer <api key>)"},
                                         401, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limits.max_body_bytes:
            raise RequestError(413, f"request body is {int(declared)} bytes, more than the server's "
                                    f"--max-body-bytes={limits.max_body_bytes}")
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"request body is over the server's --max-body-bytes={limits.max_body_bytes}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except ClientDisconnect:
        raise _ClientGone() from None
    except TimeoutError:
        raise RequestError(408, f"the request body took longer than {limits.body_timeout_s:g} s to arrive") from None
    return b"".join(chunks)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _result_or_disconnect(request: Request, future: concurrent.futures.Future):
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        return result.result()
    result.cancel()  # cancels the queued pieces too: the worker skips them
    raise _ClientGone()


def create_app(batcher: Batcher, *, limits: Limits = Limits(), api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a (not yet started) `Batcher`: the app's lifespan starts the device
    worker and, at shutdown, lets it finish what is queued. Tokenisation and JSON parsing run on
    one helper thread (the tokenizer is never used by two threads at once), and so does building
    answers of more than `INLINE_FORMAT_ITEMS` items, so the event loop only moves bytes."""
    metrics = batcher.metrics
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="urm-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            # A load or compile in progress may take minutes: give up waiting after a while
            # (the worker is a daemon thread).
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop, STOP_TIMEOUT_S)
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="urm-jax reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key, on_reject=lambda: metrics.count("unauthorized"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return json_response({"error": str(err.detail)}, err.status_code, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return json_response({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    async def handle(endpoint: str, request: Request, parse, fmt) -> Response:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        metrics.add_gauge("in_flight_requests", 1)
        try:
            if not batcher.ready:
                raise RequestError(503, f"the model is not ready ({batcher.state}); see GET /health",
                                   headers={"Retry-After": "5"})
            with batcher.arriving():  # the worker waits for this request's items, briefly
                body = await _read_body(request, limits)
                parsed = await loop.run_in_executor(pool, parse, batcher, limits, body,
                                                    dict(request.query_params))
                try:
                    future = batcher.submit(parsed.sequences, parsed.truncated)
                except ServerBusy as err:
                    raise RequestError(503, f"server busy: {err}", headers={"Retry-After": "1"}) from None
                except NotReady as err:
                    raise RequestError(503, f"not serving: {err}", headers={"Retry-After": "5"}) from None
            try:
                scores = await _result_or_disconnect(request, future)
            except (NotReady, ServerBusy) as err:
                raise RequestError(503, f"not serving: {err}", headers={"Retry-After": "5"}) from None
            except Exception as err:  # the engine failed on this batch
                raise RequestError(500, f"scoring failed: {type(err).__name__}: {err}") from None
            if len(parsed.sequences) <= INLINE_FORMAT_ITEMS:  # microseconds: a thread hop costs more
                payload, non_finite = fmt(parsed, scores)
            else:
                payload, non_finite = await loop.run_in_executor(pool, fmt, parsed, scores)
            metrics.count("items", len(parsed.sequences))
            metrics.count("tokens", sum(len(s) for s in parsed.sequences))
            if non_finite:
                metrics.count("non_finite_values", non_finite)
            response = json_response(payload)
        except RequestError as err:
            metrics.count(f"rejected_{err.status}")
            response = json_response(err.body(), err.status, err.headers)
        except _ClientGone:
            metrics.count("client_disconnects")
            response = json_response({"error": "the client disconnected before the request was answered"}, 400)
        except Exception as err:  # a bug, not the client's fault: say so, keep serving
            metrics.count("internal_errors")
            response = json_response({"error": f"internal error: {type(err).__name__}: {err}"}, 500)
        finally:
            metrics.add_gauge("in_flight_requests", -1)
        metrics.response(endpoint, response.status_code, time.monotonic() - started)
        return response

    @app.post("/score")
    async def score(request: Request):
        return await handle("score", request, parse_score, format_score)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        return await handle("get_reward", request, parse_get_reward, format_get_reward)

    @app.get("/health")
    async def health():
        state = batcher.state
        body: dict[str, Any] = {"status": state}
        if state == "compiling":
            done, total = batcher.warmup_progress
            body["warmup"] = {"compiled": done, "total": total}
        elif state == "failed":
            body["error"] = f"{type(batcher.error).__name__}: {batcher.error}"
        elif state == "ready":
            body.update(batcher.describe())
        return json_response(body, 200 if state == "ready" else 503)

    @app.get("/metrics")
    async def get_metrics():
        snapshot = metrics.snapshot()
        snapshot["state"] = batcher.state
        return json_response(json_safe(snapshot)[0])

    return app
