"""The reward server (`urm-jax serve`) and the trainer reward functions.

Servers run in this process (uvicorn on a background thread, `ServerThread`, on a free loopback
port), except one test that runs the real `urm-jax serve` command in a subprocess. Nothing here
depends on speed: every wait is on an event (a health answer, a counter, a process exit) with a
ceiling of minutes, and a timeout says what was awaited.

Bit-for-bit equality with `urm-jax score`. XLA may round a row's outputs differently when its
batch *shape* (rows x bucket length) changes (tests/test_scoring_scale.py), but within one shape
a row's outputs do not depend on the other rows or on its position (checked below, on the
engine). The test servers and `urm-jax score` run on this suite's 8 simulated CPU devices with
--batch-size 8: one row per device, so every batch of a bucket has the same per-device program
and a served score must equal the CLI's bit for bit, whatever the server packed together. With
several rows per device the server's row counts depend on timing; there each served score must
equal the engine's score of that item in one of its bucket's possible shapes
(`test_batcher_multi_row_shapes_match_per_shape`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_fixtures import make_tiny_chat_urm, make_tiny_urm
from urm_jax.api import RewardModel, penalized_reward, reward_function
from urm_jax.cli import build_parser, main as cli_main
from urm_jax.scoring import Ensemble, Scorer, Scores
from urm_jax.jsonl import json_safe
from urm_jax.serve.app import Limits, create_app, format_score
from urm_jax.serve.batcher import Batcher, warmup_shapes
from urm_jax.serve.server import ServerThread

MAX_LENGTH = 64  # buckets 16, 24, 32, 48, 64
LIMITS = Limits(max_items=50, max_body_bytes=64 << 10, body_timeout_s=60.0)
WAIT_S = 600.0  # ceiling for anything awaited (compiles on a loaded 2-core machine are slow)
REPO = Path(__file__).resolve().parents[1]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """Tiny URM with Llama-3.1's vocabulary and the real tokenizer (chat items tokenise)."""
    return make_tiny_chat_urm(tmp_path_factory.mktemp("serve_chat") / "hf",
                              tmp_path_factory.mktemp("urm_cache"))


@pytest.fixture(scope="module")
def second_member(tmp_path_factory):
    """A second URME member: same vocabulary and shapes, another seed, no tokenizer files."""
    return make_tiny_urm(tmp_path_factory.mktemp("serve_m1") / "hf", vocab=128257, pad_token_id=128256,
                         hidden=32, intermediate=64, gate_dtype="float32", seed=1)


@pytest.fixture(scope="module")
def ensemble(chat_model):
    return Ensemble.load([chat_model], max_length=MAX_LENGTH, batch_size=8)


def wait_ready(url: str, headers: dict | None = None) -> dict:
    """Poll GET /health until 200 (the model loaded and compiled); fail on 'failed'."""
    deadline = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < deadline:
        last = httpx.get(f"{url}/health", headers=headers, timeout=WAIT_S)
        if last.status_code == 200:
            return last.json()
        assert last.json()["status"] in ("loading", "compiling"), last.text
        time.sleep(0.02)
    raise AssertionError(f"awaited GET {url}/health == 200 for {WAIT_S:g} s; last: {last.status_code} {last.text}")


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"awaited {what} for {WAIT_S:g} s")


@contextlib.contextmanager
def serving(ensemble, *, gate: threading.Event | None = None, limits: Limits = LIMITS,
            api_key: str | None = None, max_batch_items: int = 16, ready: bool = True):
    """A server on a free loopback port over an already loaded ensemble; with `gate`, its
    'load' blocks until the test sets the gate (so the not-ready state can be observed)."""
    def load():
        if gate is not None:
            assert gate.wait(WAIT_S), "awaited the test's load gate"
        return ensemble

    batcher = Batcher(load, max_batch_items=max_batch_items, max_wait_s=0.005, progress=False)
    with ServerThread(create_app(batcher, limits=limits, api_key=api_key)) as server:
        if ready:
            wait_ready(server.url, {"Authorization": f"Bearer {api_key}"} if api_key else None)
        yield server, batcher


@pytest.fixture(scope="module")
def served(ensemble):
    with serving(ensemble) as (server, batcher):
        yield server, batcher


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=WAIT_S, limits=httpx.Limits(max_connections=64)) as c:
        yield c


def chat(i: int, words: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i}: " + "why " * (i % 5)},
            {"role": "assistant", "content": " ".join(f"w{i}x{k}" for k in range(words))}]


@pytest.fixture(scope="module")
def pool():
    """40 items in every input schema, 1..64 tokens (all five buckets), most with an id."""
    rng = random.Random(0)
    items = []
    for i in range(40):
        kind = i % 3
        if kind == 0:
            item = {"messages": chat(i, rng.randrange(1, 12))}
        elif kind == 1:
            item = {"prompt": f"prompt {i}", "response": " ".join(["ok"] * rng.randrange(1, 20))}
        else:
            item = {"input_ids": [rng.randrange(4, 128000) for _ in range(rng.randrange(1, MAX_LENGTH + 1))]}
        if i % 7:
            item["id"] = f"item-{i}" if i % 2 else i
        items.append(item)
    return items


def score_cli(models, items, tmp_path) -> list[dict]:
    """`urm-jax score` on `items`: its output lines, parsed."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in items))
    args = ["score", "--input", str(inp), "--output", str(out), "--max-length", str(MAX_LENGTH),
            "--batch-size", "8", "--no-progress"]
    for m in models:
        args += ["--model", str(m)]
    assert cli_main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(chat_model, pool, tmp_path_factory):
    return score_cli([chat_model], pool, tmp_path_factory.mktemp("serve_ref"))


def post(client, url, path, body, **kwargs):
    return client.post(f"{url}{path}", content=json.dumps(body), **kwargs)


def assert_error(response, status: int, *fragments: str, item: int | None = None):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()  # always JSON
    assert isinstance(body["error"], str) and set(body) <= {"error", "item"}, body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    assert body.get("item") == item, body


# --- health and readiness -----------------------------------------------------------------------


def test_health_is_503_until_loaded_and_compiled(ensemble, client):
    gate = threading.Event()
    with serving(ensemble, gate=gate, ready=False) as (server, _):
        health = client.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        assert_error(post(client, server.url, "/score", {"items": [{"input_ids": [1, 2]}]}), 503,
                     "not ready (loading)")
        assert client.get(f"{server.url}/metrics").json()["state"] == "loading"
        gate.set()
        info = wait_ready(server.url)
        # Ready means compiled: every shape the server can use was compiled before 200.
        shapes = warmup_shapes(ensemble.scorers[0], MAX_LENGTH)
        assert shapes == [(8, b) for b in (16, 24, 32, 48, 64)]  # one row per device: one per bucket
        assert info["compiled_shapes"] >= len(shapes) and info["max_length"] == MAX_LENGTH
        assert info["models"] == [ensemble.scorers[0].path] and info["ensemble"] is False
        assert info["devices"] == 8 and info["buckets"] == [16, 24, 32, 48, 64]
        assert {(8, b) for b in info["buckets"]} <= ensemble.scorers[0].compiled_shapes


# --- the native API -----------------------------------------------------------------------------


def test_native_score_equals_urm_jax_score_bit_for_bit(served, client, pool, reference):
    server, _ = served
    response = post(client, server.url, "/score", {"items": pool})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results == reference  # every field, every float, ids passed through (or absent)
    assert [r.get("id") for r in results] == [x.get("id") for x in pool]
    first = results[0]
    assert set(first) == {"id", "reward", "mean", "log_std", "variance", "gate", "uncertainty",
                          "num_tokens", "truncated"} - ({"id"} if "id" not in pool[0] else set())
    assert list(first["mean"]) == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def test_ordering_under_concurrency_and_splitting(served, client, pool, reference):
    """48 concurrent requests of 1..40 mixed-length items (some split over several dispatches:
    max_batch_items=16): each answer holds its own items, in its order, bit for bit."""
    server, _ = served
    rng = random.Random(1)
    requests = [rng.sample(range(len(pool)), rng.choice([1, 2, 3, 5, 8, 13, 17, 40])) for _ in range(48)]

    def send(idx):
        return post(client, server.url, "/score", {"items": [pool[i] for i in idx]})

    with concurrent.futures.ThreadPoolExecutor(16) as workers:
        responses = list(workers.map(send, requests))
    for idx, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [reference[i] for i in idx]
    metrics = client.get(f"{server.url}/metrics").json()
    assert metrics["gauges"]["shapes_compiled_after_ready"] == 0  # nothing compiled under load
    assert metrics["gauges"]["queued_items"] == 0 and metrics["gauges"]["in_flight_requests"] == 0


def test_std_penalty(served, client, pool, reference):
    server, _ = served
    items = pool[:6]
    results = post(client, server.url, "/score", {"items": items, "std_penalty": 0.5}).json()["results"]
    for got, want in zip(results, reference[:6]):
        assert got["penalized_reward"] == want["reward"] - 0.5 * math.sqrt(want["uncertainty"])
        assert {k: v for k, v in got.items() if k != "penalized_reward"} == want
    zero = post(client, server.url, "/score", {"items": items, "std_penalty": 0}).json()["results"]
    assert [r["penalized_reward"] for r in zero] == [r["reward"] for r in reference[:6]]
    for bad in (-1, "abc", True, [1]):
        assert_error(post(client, server.url, "/score", {"items": items, "std_penalty": bad}), 422, "std_penalty")


# --- OpenRLHF's protocol ------------------------------------------------------------------------


def test_openrlhf_get_reward(served, client, chat_model, pool, reference):
    """`query` holds chats rendered by the chat template (as OpenRLHF's vLLM rollouts decode
    them); rewards equal the native score of the same conversation bit for bit, whether or not
    the text starts with the BOS (exactly one BOS either way)."""
    server, _ = served
    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    chats = [(i, x["messages"]) for i, x in enumerate(pool) if "messages" in x]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for _, m in chats]
    texts[1] = tokenizer.bos_token + texts[1]  # a template that writes the BOS itself
    body = {"query": texts, "prompts": ["p"] * len(texts), "labels": [None] * len(texts)}
    answer = post(client, server.url, "/get_reward", body, headers={"Content-Type": "application/json"}).json()
    want = [reference[i]["reward"] for i, _ in chats]
    assert answer["rewards"] == want and answer["scores"] == want
    assert answer["extra_logs"] == {"urm_reward": want, "urm_uncertainty": [reference[i]["uncertainty"] for i, _ in chats]}
    # The penalty from the URL (an OpenRLHF --remote_rm_url carries it) or the body.
    for url, extra in ((f"{server.url}/get_reward?std_penalty=0.5", {}), (f"{server.url}/get_reward", {"std_penalty": 0.5})):
        penalised = client.post(url, content=json.dumps({"query": texts, **extra})).json()
        assert penalised["rewards"] == [reference[i]["reward"] - 0.5 * math.sqrt(reference[i]["uncertainty"])
                                        for i, _ in chats]
        assert penalised["extra_logs"]["urm_reward"] == want
    assert_error(post(client, server.url, "/get_reward", {"query": [texts[0], 7]}), 422, "item 1", "query[1]", item=1)
    assert_error(post(client, server.url, "/get_reward", {"queries": texts}), 422, "no 'query' field")


# --- bad requests -------------------------------------------------------------------------------


def _bad_cases(pool):
    long_ids = {"input_ids": [5] * (MAX_LENGTH + 1)}
    ok = pool[:3]
    return [
        # (body bytes or object, status, fragments, item)
        (b'{"items": [1,}', 400, ["not valid JSON", "line 1 column"], None),
        (b'{"items": [{"input_ids": [1]}], "std_penalty": NaN}', 400, ["NaN"], None),
        (b'\xff\xfe{}', 400, ["not UTF-8"], None),
        ([{"input_ids": [1]}], 422, ["must be a JSON object"], None),
        ({"item": ok}, 422, ["no 'items' field"], None),
        ({"items": []}, 422, ["non-empty list"], None),
        ({"items": ok, "lambda": 1}, 422, ["unknown request field(s) ['lambda']"], None),
        ({"items": [*ok, 5]}, 422, ["item 3: must be a JSON object"], 3),
        ({"items": [*ok, {"prompt": "x"}]}, 422, ["item 3: unknown example schema"], 3),
        ({"items": [{"messages": [{"role": "user", "content": "hi"}]}]}, 422, ["item 0: last message"], 0),
        ({"items": [*ok, {"input_ids": [1, 128257]}]}, 422, ["item 3: input_ids[1]"], 3),
        ({"items": [*ok, {"input_ids": [1, True]}]}, 422, ["item 3: input_ids[1] is True"], 3),
        ({"items": [*ok, long_ids]}, 422, ["item 3:", f"more than max_length={MAX_LENGTH}"], 3),
        ({"items": [*ok, {"text": "a", "input_ids": [1]}]}, 422, ["item 3: example mixes schemas"], 3),
        ({"items": [{"input_ids": [1]}] * 51}, 413, ["51 items", "--max-items=50"], None),
        ({"items": [{"input_ids": [1] * 60}] * 40, "pad": "x" * (70 << 10)}, 413, ["--max-body-bytes=65536"], None),
    ]


def test_bad_requests_get_one_clear_error_and_the_server_keeps_serving(served, client, pool, reference):
    server, _ = served
    for body, status, fragments, item in _bad_cases(pool):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert_error(client.post(f"{server.url}/score", content=content), status, *fragments, item=item)
        good = post(client, server.url, "/score", {"items": pool[:2]})
        assert good.status_code == 200 and good.json()["results"] == reference[:2]
    # A body over the limit without a Content-Length (chunked) is cut off while it streams.
    chunks = (b" " * 4096 for _ in range(20))
    assert_error(client.post(f"{server.url}/score", content=chunks), 413, "--max-body-bytes")
    # Unknown routes and methods: JSON errors too.
    assert_error(client.get(f"{server.url}/score"), 405, "Method Not Allowed")
    assert_error(client.get(f"{server.url}/nope"), 404, "Not Found")
    assert post(client, server.url, "/score", {"items": pool[:1]}).json()["results"] == reference[:1]


def _counter(client, url, name) -> int:
    return client.get(f"{url}/metrics").json()["counters"].get(name, 0)


def test_client_disconnecting_mid_body_is_counted_and_harmless(served, client, pool, reference):
    server, _ = served
    host, port = server.url.removeprefix("http://").split(":")
    before = _counter(client, server.url, "client_disconnects")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
        raw.sendall(b"POST /score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"items\": [")
    wait_for(lambda: _counter(client, server.url, "client_disconnects") > before,
             "the server to count the client that left mid-body (metrics counters.client_disconnects)")
    assert post(client, server.url, "/score", {"items": pool[:2]}).json()["results"] == reference[:2]


def test_api_key_and_slow_body(ensemble, client, pool, reference):
    """With an API key every route but /health needs the bearer token (401 otherwise). A body
    that stops arriving gets 408 after --body-timeout (1 s, on a server of its own: a whole
    request must never depend on the machine answering within 1 s; the test waits for the 408)."""
    auth = {"Authorization": "Bearer s3cret"}
    with serving(ensemble, api_key="s3cret") as (server, _):
        assert client.get(f"{server.url}/health").status_code == 200
        assert_error(post(client, server.url, "/score", {"items": pool[:1]}), 401, "bearer token")
        assert_error(post(client, server.url, "/score", {"items": pool[:1]},
                          headers={"Authorization": "Bearer wrong"}), 401, "bearer token")
        assert_error(client.get(f"{server.url}/metrics"), 401, "bearer token")
        ok = post(client, server.url, "/score", {"items": pool[:1]}, headers=auth)
        assert ok.json()["results"] == reference[:1]
        assert client.get(f"{server.url}/metrics", headers=auth).json()["counters"]["unauthorized"] == 3
    limits = Limits(max_items=50, max_body_bytes=64 << 10, body_timeout_s=1.0)
    with serving(ensemble, api_key="s3cret", limits=limits) as (server, _):
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:
            raw.sendall(b"POST /score HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer s3cret\r\n"
                        b"Content-Length: 100\r\n\r\n{\"items\"")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = raw.recv(65536)
                assert chunk, f"awaited the 408 answer, the server closed after {answer!r}"
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"longer than 1 s" in answer


def test_metrics_after_traffic(served, client, pool):
    server, _ = served
    post(client, server.url, "/score", {"items": pool[:10]})
    m = client.get(f"{server.url}/metrics").json()
    assert m["state"] == "ready" and m["requests"]["total"] >= 1
    assert m["requests"]["by_endpoint_and_status"]["score"]["200"] >= 1
    assert m["counters"]["items"] >= 10 and m["counters"]["tokens"] > m["counters"]["items"]
    assert m["counters"]["items_scored"] >= m["counters"]["items"]
    assert 0 < m["batch_fill"]["rows"] <= 1 and 0 < m["batch_fill"]["tokens"] <= 1
    for series in ("latency_s", "queue_s", "device_s"):
        s = m[series]
        assert s["count"] >= 1 and 0 <= s["p50"] <= s["p99"] <= s["max"], (series, s)
    assert m["gauges"]["compiled_shapes"] >= 5 and m["gauges"]["shapes_compiled_after_ready"] == 0


def test_non_finite_outputs_become_null():
    """A broken model's NaN/inf is written as JSON null (and counted), never as NaN/Infinity."""
    k = 5
    scores = Scores(np.array([np.nan, 1.0], np.float32), np.zeros((2, k), np.float32),
                    np.array([[np.inf] * k, [0.0] * k], np.float32), np.ones((2, k), np.float32),
                    np.array([np.inf, 5.0], np.float32), np.array([3, 4]), np.zeros(2, bool))
    from urm_jax.serve.app import _NO_ID, _Parsed

    payload, bad = format_score(_Parsed([[1]] * 2, [False] * 2, [_NO_ID, "b"], 1.0), scores)
    text = json.dumps(payload, allow_nan=False)  # standard JSON
    first, second = json.loads(text)["results"]
    assert first["reward"] is None and first["uncertainty"] is None and first["penalized_reward"] is None
    assert first["log_std"]["helpfulness"] is None and first["variance"]["verbosity"] is None
    assert second["reward"] == 1.0 and second["penalized_reward"] == 1.0 - math.sqrt(5.0)
    assert bad == 1 + 5 + 5 + 1 + 1
    assert json_safe({"a": [float("-inf"), 2.0, "x"]}) == ({"a": [None, 2.0, "x"]}, 1)


# --- URME ensembles -----------------------------------------------------------------------------


def test_ensemble_server_equals_urm_jax_score(chat_model, second_member, client, pool, tmp_path):
    members = Ensemble.load([chat_model, second_member], max_length=MAX_LENGTH, batch_size=8)
    want = score_cli([chat_model, second_member], pool[:12], tmp_path)
    with serving(members) as (server, _):
        assert client.get(f"{server.url}/health").json()["ensemble"] is True
        got = post(client, server.url, "/score", {"items": pool[:12], "std_penalty": 1.0}).json()["results"]
    for g, w in zip(got, want):
        assert g.pop("penalized_reward") == w["reward"] - math.sqrt(w["uncertainty"])
        assert g == w and len(g["members"]) == 2 and "max_reward_gap" in g


# --- the engine under the batcher: shapes ------------------------------------------------------


def test_batcher_multi_row_shapes_match_per_shape(chat_model):
    """One device, 4 rows per batch: the server may run an item in a batch of 1, 2 or 4 rows.
    (a) Within a shape, neighbours and position never change a row's outputs; (b) every item
    scored through the batcher under concurrency equals, bit for bit, the engine's score of that
    item in one of its bucket's shapes."""
    scorer = Scorer(chat_model, max_length=MAX_LENGTH, batch_size=4, devices=jax.devices()[:1])
    rng = random.Random(2)
    seqs = [[rng.randrange(4, 128000) for _ in range(rng.randrange(1, 40))] for _ in range(24)]
    # (a) the same shape, other neighbours and positions
    alone = scorer.score_arrays([seqs[0]] * 4)
    mixed = scorer.score_arrays([seqs[5], seqs[0], seqs[7], seqs[9]])
    for field in ("reward", "means", "log_stds", "gate", "uncertainty"):
        assert np.array_equal(getattr(mixed, field)[1], getattr(alone, field)[0]), field
    # per-shape references: item i alone in a batch of r rows
    rows = sorted({r for r, _ in warmup_shapes(scorer, MAX_LENGTH)})
    assert rows == [1, 2, 4]
    per_shape = {r: Scores.concat([scorer.score_arrays([s] * r).take(slice(0, 1)) for s in seqs])
                 for r in rows}
    batcher = Batcher(lambda: Ensemble([scorer]), max_batch_items=6, max_wait_s=0.005, progress=False)
    batcher.start()
    try:
        assert batcher.wait_ready(WAIT_S), f"awaited the batcher's warm-up ({batcher.state}, {batcher.error!r})"
        jobs = [rng.sample(range(len(seqs)), rng.randrange(1, 9)) for _ in range(30)]
        with concurrent.futures.ThreadPoolExecutor(8) as workers:
            futures = list(workers.map(lambda idx: batcher.submit([seqs[i] for i in idx], [False] * len(idx)), jobs))
            results = [f.result(WAIT_S) for f in futures]
    finally:
        batcher.stop(WAIT_S)
    for idx, got in zip(jobs, results):
        for row, i in enumerate(idx):
            candidates = [r for r in rows if all(
                np.array_equal(getattr(got, f)[row], getattr(per_shape[r], f)[i])
                for f in ("reward", "means", "log_stds", "gate", "uncertainty"))]
            assert candidates, f"item {i} (row {row} of a request) matches no shape's score"
    assert batcher.metrics.snapshot()["gauges"]["shapes_compiled_after_ready"] == 0


# --- reward functions for trainers --------------------------------------------------------------


def test_trl_and_tunix_reward_functions_equal_reward_model(served, chat_model):
    """The TRL-shaped function, in process and against the server, returns RewardModel.score's
    rewards (bit for bit), conversational and plain; Tunix's rendered prompts give the same."""
    server, _ = served
    rm = RewardModel(chat_model, max_length=MAX_LENGTH, batch_size=8)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    completions = [[{"role": "assistant", "content": " ".join(["answer"] * (i + 1))}] for i in range(6)]
    conversational = rm.score([p + c for p, c in zip(prompts, completions)])
    plain_prompts = [f"question {i}" for i in range(6)]
    plain_completions = [" ".join(["answer"] * (i + 1)) for i in range(6)]  # the template trims
    plain = rm.score(list(zip(plain_prompts, plain_completions)))
    assert [float(r) for r in plain.reward] == [float(r) for r in conversational.reward]
    logged = {}
    trl_kwargs = dict(completion_ids=[[1]] * 6, trainer_state=None, solution=["x"] * 6,
                      log_metric=lambda name, value: logged.setdefault(name, value),
                      log_extra=lambda column, values: logged.setdefault(column, values))
    for source in (rm, server.url):
        fn = reward_function(source)
        assert fn.__name__ == "urm_reward"
        want = [float(r) for r in conversational.reward]
        assert fn(prompts=prompts, completions=completions, **trl_kwargs) == want
        assert fn(prompts=plain_prompts, completions=plain_completions, **trl_kwargs) == want
        penalised = reward_function(source, std_penalty=0.25)
        assert penalised(prompts=prompts, completions=completions) == \
            [float(r) for r in penalized_reward(conversational.reward, conversational.uncertainty, 0.25)]
        # Tunix: prompts rendered by a chat template, raw question in another column.
        rendered = [rm.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        tunix = reward_function(source, prompt_format="rendered", end_of_turn="<|eot_id|>")
        assert tunix(prompts=rendered, completions=plain_completions, mode="train") == want
        by_column = reward_function(source, prompt_column="question")
        assert by_column(prompts=rendered, completions=plain_completions, question=plain_prompts) == want
    assert logged["urm/uncertainty"] == pytest.approx(float(np.mean(conversational.uncertainty)))
    assert len(logged["urm_uncertainty"]) == 6
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward_function(rm)(prompts=plain_prompts[:2], completions=plain_completions[:1])
    from urm_jax.api import RewardServerError

    with pytest.raises(RewardServerError, match="item 0"):
        reward_function(server.url)(prompts=[[{"role": "user", "content": "q"}]], completions=[[]])


# --- the command ------------------------------------------------------------------------------


def test_serve_command_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_length == 4096
    assert args.max_items == 1024 and args.max_body_bytes == 64 << 20 and args.api_key is None


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "urm_jax.cli", "serve", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the cheapest server
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_urm_jax_serve_command_serves_and_stops_on_sigterm(chat_model):
    """The real command: loopback by default, the API key from the environment, 200 once
    ready, and SIGTERM stops it gracefully with exit status 0."""
    proc = _start(["--model", str(chat_model), "--port", "0", "--max-length", "32", "--batch-size", "1",
                   "--no-progress"], {**_cli_env(), "URM_JAX_API_KEY": "from-env"})
    try:
        line = proc.stdout.readline()  # blocks until the server has bound its socket
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.poll())
        url = line.split()[-1]
        info = wait_ready(url)  # /health needs no token
        assert info["buckets"] == [16, 24, 32] and info["devices"] == 1
        body = {"items": [{"prompt": "hi", "response": "hello"}]}
        assert_error(httpx.post(f"{url}/score", json=body, timeout=WAIT_S), 401, "bearer token")
        answer = httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer from-env"}, timeout=WAIT_S)
        assert answer.status_code == 200 and answer.json()["results"][0]["num_tokens"] > 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0, proc.stderr.read()
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_urm_jax_serve_command_exits_2_when_the_model_cannot_load(tmp_path):
    (tmp_path / "empty").mkdir()
    for model, message in ((tmp_path / "missing", "no such model directory"), (tmp_path / "empty", "error:")):
        proc = _start(["--model", str(model), "--port", "0", "--no-progress"], _cli_env())
        out, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 2, (out, err)
        assert err.count("error:") == 1 and message in err, err
