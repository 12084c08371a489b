"""The reward server's HTTP side (FastAPI/Starlette): request limits, parsing, responses.

Endpoints
* ``POST /score`` (native): ``{"items": [item, ...], "std_penalty": s}`` (``std_penalty``
  optional; or ``?std_penalty=s`` in the URL, not both: 422). An item is a `urm-jax score` input line (``{"messages": [...]}``,
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
  parameter (``--remote_rm_url http://host:port/get_reward?std_penalty=0.5``; both at once:
  422), else by the server's default; ``urm_reward`` is always the raw reward.
* ``GET /health``: 503 while loading or compiling (body: state and progress), 200 when ready.
* ``GET /metrics``: JSON counters, batch fill, queue/latency/device-time quantiles.

Errors are ``{"error": message, "item": index}`` (``item`` when one item is at fault): 400 bad
JSON or a body the client did not finish sending, 401 missing/wrong bearer token, 408 body too
slow, 413 body or item count over the limit, 422 a well-formed request with a bad item or field,
503 not ready / busy / shutting down (with Retry-After). Responses are standard JSON: a non-finite model output
(NaN, +-inf: broken weights, an fp16 overflow) is written as ``null`` and counted in
``/metrics`` (``non_finite_values``), never as NaN/Infinity. An item whose tokens do not end with
the template's end-of-turn token (an RLHF sample cut at the generation limit) is scored at its
last token, as `urm-jax score` does, and counted (``items_without_end_of_turn``).

Shutdown (`drain`, run by `urm_jax.serve.server` before uvicorn's own): stop accepting, refuse
new requests on open connections (503), let queued and in-flight requests finish for up to
``drain_timeout_s``, then answer what is still queued with 503 + Retry-After (never computed);
the dispatch already on the devices completes and is answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from urm_jax.api import encode_item
from urm_jax.data.tokenization import TooManyTokens, end_of_turn_id
from urm_jax.rewards import penalized_reward
from urm_jax.jsonl import json_safe
from urm_jax.serve.batcher import Batcher, NotReady, ServerBusy
from urm_jax.serve.metrics import CLIENT_GONE

OPEN_PATHS = ("/health",)  # answered without the bearer token (load balancers, probes)
INLINE_FORMAT_ITEMS = 64  # answers of up to this many items are built on the event loop
# Requests parsed and tokenised at once (HF fast tokenizers release the GIL while encoding): a
# request with a huge text holds up one of these threads, never the requests behind it.
TOKENIZE_THREADS = 4
DRAIN_TIMEOUT_S = 30.0  # at shutdown, how long queued requests may still wait to be scored
TRUNCATION_ADVICE = "the server drops tokens from the start instead when started with --truncation left"
ENDPOINTS = {"/score": "score", "/get_reward": "get_reward", "/health": "health", "/metrics": "metrics"}
logger = logging.getLogger("urm_jax.serve")


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
    without_end_of_turn: int = 0  # items whose last token is not the template's end-of-turn


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


def _std_penalty(value: Any, where: str, *, from_url: bool = False) -> float:
    """A penalty: a JSON number in the body (a string there is a client bug: 422), text in the URL."""
    if from_url:
        try:
            value = float(value)
        except ValueError:
            raise RequestError(422, f"{where} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        kind = "" if from_url else f" (a JSON number; got a JSON {type(value).__name__})"
        raise RequestError(422, f"{where} must be a finite number >= 0{kind}, got {value!r}")
    return float(value)


def _penalty(obj: dict, query: dict, default: float | None) -> float | None:
    """The request's std_penalty: from the body or the URL query (both: 422, rather than a silent
    precedence rule), else `default`."""
    body, url = obj.get("std_penalty"), query.get("std_penalty")
    if body is not None and url is not None:
        raise RequestError(422, "std_penalty is given both in the URL and in the body; give it once")
    if body is not None:
        return _std_penalty(body, "'std_penalty'")
    if url is not None:
        return _std_penalty(url, "the URL parameter std_penalty", from_url=True)
    return default


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


def _encode_all(batcher: Batcher, items: list, to_example: Callable[[int, Any], dict]) -> tuple[list, list, int]:
    """(token ids, left-truncated flags, items not ending with the end-of-turn token)."""
    sequences, truncated = [], []
    for i, item in enumerate(items):
        try:
            ids, cut = encode_item(batcher.ensemble, to_example(i, item))
        except TooManyTokens as err:  # name the server's flag, not the Python argument
            raise RequestError(422, f"item {i}: {err.with_advice(TRUNCATION_ADVICE)}", item=i) from None
        except ValueError as err:
            raise RequestError(422, f"item {i}: {err}", item=i) from None
        sequences.append(ids)
        truncated.append(cut)
    eot = end_of_turn_id(batcher.ensemble.tokenizer)
    without = 0 if eot is None else sum(1 for ids in sequences if ids[-1] != eot)
    return sequences, truncated, without


def parse_score(batcher: Batcher, limits: Limits, body: bytes, query: dict) -> _Parsed:
    """A ``POST /score`` body -> token ids per item (RequestError on anything wrong)."""
    obj = _load_json(body)
    items = _list_field(obj, "items", limits, example='{"items": [{"messages": [...]}, ...]}')
    unknown = sorted(set(obj) - {"items", "std_penalty"})
    if unknown:
        raise RequestError(422, f"unknown request field(s) {unknown}; expected 'items' and optional 'std_penalty'")
    penalty = _penalty(obj, query, None)

    def example(i, item):
        if not isinstance(item, dict):
            raise ValueError(f"must be a JSON object, got a JSON {type(item).__name__}")
        return item

    sequences, truncated, without = _encode_all(batcher, items, example)
    return _Parsed(sequences, truncated, [item.get("id", _NO_ID) for item in items], penalty, without)


def parse_get_reward(batcher: Batcher, limits: Limits, body: bytes, query: dict) -> _Parsed:
    """An OpenRLHF ``POST /get_reward`` body -> token ids per query text."""
    obj = _load_json(body)
    queries = _list_field(obj, "query", limits, example='{"query": ["<rendered chat>", ...]}')
    penalty = _penalty(obj, query, limits.default_std_penalty)

    def example(i, text):
        if not isinstance(text, str):
            raise ValueError(f"query[{i}] must be a string (a rendered chat), got a JSON {type(text).__name__}")
        return {"text": text}

    sequences, truncated, without = _encode_all(batcher, queries, example)
    return _Parsed(sequences, truncated, [_NO_ID] * len(queries), penalty, without)


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
    """ASGI middleware: every path but `OPEN_PATHS` needs ``Authorization: Bearer <api_key>``
    (the scheme name in any case, as RFC 7235 says; the token compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope, receive, send):
        """ASGI entry: an HTTP request outside `OPEN_PATHS` without the exact bearer token (compared in
        constant time) gets 401 with `WWW-Authenticate: Bearer`; everything else passes to the app."""
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._expected)):
                response = json_response({"error": "missing or wrong bearer token (Authorization: Bearer <api key>)"},
                                         401, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RecordResponses:
    """ASGI middleware, outermost: records every answered request once in `Metrics` (endpoint,
    status, and for the scoring endpoints the latency), whatever answered it (a handler, the
    bearer check, a 404, an unexpected exception: 500). The one source of the outcome counters."""

    def __init__(self, app, metrics):
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope, receive, send):
        """ASGI entry: pass the request on and record its final status (499 when the client left) once."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), None

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            endpoint = ENDPOINTS.get(scope["path"], "other")
            latency = time.monotonic() - started if endpoint in ("score", "get_reward") else None
            self._metrics.response(endpoint, status or 500, latency)


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


def create_app(batcher: Batcher, *, limits: Limits = Limits(), api_key: str | None = None,
               drain_timeout_s: float = DRAIN_TIMEOUT_S) -> FastAPI:
    """The FastAPI app over a (not yet started) `Batcher`: the app's lifespan starts the device
    worker and, at shutdown, joins it. JSON parsing and tokenisation run on `TOKENIZE_THREADS`
    helper threads, and so does building answers of more than `INLINE_FORMAT_ITEMS` items, so
    the event loop only moves bytes. ``app.state.drain`` is the shutdown drain (module
    docstring), run by `urm_jax.serve.server`'s uvicorn server once it stops accepting."""
    metrics = batcher.metrics
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="urm-tokenize")
    active = [0]  # requests being handled (event loop only)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            # Join the worker (it finishes its dispatch; the drain failed what was queued): the
            # process must not exit while it is inside an XLA computation.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, batcher.stop)
            await loop.run_in_executor(None, pool.shutdown)

    async def drain() -> None:
        batcher.drain()
        deadline = time.monotonic() + drain_timeout_s
        while active[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if active[0]:
            dropped = batcher.fail_queued(NotReady(
                f"the server is shutting down and its drain time ({drain_timeout_s:g} s) ran out "
                "before this request was scored"))
            if dropped:
                logger.warning(f"shutting down: {dropped} queued sequences answered 503 (drain time "
                               f"{drain_timeout_s:g} s ran out)")
        while active[0]:  # the dispatch on the devices, and bodies still arriving (--body-timeout)
            await asyncio.sleep(0.05)

    app = FastAPI(title="urm-jax reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.drain = drain
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(RecordResponses, metrics=metrics)  # added last: the outermost

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return json_response({"error": str(err.detail)}, err.status_code, getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        logger.error(f"internal error on {request.url.path}: {type(err).__name__}: {err}")
        return json_response({"error": f"internal error: {type(err).__name__}: {err}"}, 500)

    async def handle(endpoint: str, request: Request, parse, fmt) -> Response:
        loop = asyncio.get_running_loop()
        metrics.add_gauge("in_flight_requests", 1)
        active[0] += 1
        try:
            if batcher.draining:
                raise RequestError(503, "the server is shutting down", headers={"Retry-After": "5"})
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
                logger.error(f"{endpoint}: scoring failed: {type(err).__name__}: {err}")
                raise RequestError(500, f"scoring failed: {type(err).__name__}: {err}") from None
            if len(parsed.sequences) <= INLINE_FORMAT_ITEMS:  # microseconds: a thread hop costs more
                payload, non_finite = fmt(parsed, scores)
            else:
                payload, non_finite = await loop.run_in_executor(pool, fmt, parsed, scores)
            metrics.count("items", len(parsed.sequences))
            metrics.count("tokens", sum(len(s) for s in parsed.sequences))
            if parsed.without_end_of_turn:
                metrics.count("items_without_end_of_turn", parsed.without_end_of_turn)
            if non_finite:
                metrics.count("non_finite_values", non_finite)
            return json_response(payload)
        except RequestError as err:
            return json_response(err.body(), err.status, err.headers)
        except _ClientGone:  # recorded as 499; nothing reaches the client
            return json_response({"error": "the client disconnected before the request was answered"},
                                 CLIENT_GONE)
        except Exception as err:  # a bug, not the client's fault: say so, keep serving
            logger.error(f"internal error on /{endpoint}: {type(err).__name__}: {err}")
            return json_response({"error": f"internal error: {type(err).__name__}: {err}"}, 500)
        finally:
            active[0] -= 1
            metrics.add_gauge("in_flight_requests", -1)

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
