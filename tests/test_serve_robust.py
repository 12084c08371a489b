"""The reward server under stress a new user finds first (review 15): shutdown with requests in
flight, text that is not UTF-8, huge texts, texts without the end-of-turn token, start-up errors,
metrics that agree, and the small print of the API (penalty types, auth scheme, messages).

Nothing depends on speed: where a test needs the server to be at a point (a batch on the
devices, a text being tokenised), the model or the tokenizer is held there by an event the test
sets, and every wait has a ceiling of minutes that says what it awaited.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import signal
import socket
import threading
import warnings

import httpx
import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from test_serve import (LIMITS, MAX_LENGTH, WAIT_S, _cli_env, _start, assert_error, chat_model, client,  # noqa: F401
                        ensemble, pool, post, reference, score_cli, serving, wait_for, wait_ready)
from urm_jax.api import RewardModel, reward_function
from urm_jax.cli import build_parser, main as cli_main, serve_warmup_length
from urm_jax.data.tokenization import TooManyTokens, max_token_bytes, min_tokens, text_ids
from urm_jax.rewards import penalized_reward
from urm_jax.scoring import Scorer
from urm_jax.serve.app import create_app
from urm_jax.serve.batcher import Batcher
from urm_jax.serve.server import ServerThread

SURROGATE = "\ud800"


def check_metrics_agree(metrics: dict) -> None:
    """The outcome counters are the per-endpoint status table, summed (one source of truth)."""
    table = metrics["requests"]["by_endpoint_and_status"]
    by_status: dict[int, int] = {}
    for statuses in table.values():
        for status, n in statuses.items():
            by_status[int(status)] = by_status.get(int(status), 0) + n
    counters = metrics["counters"]
    assert metrics["requests"]["total"] == sum(by_status.values())
    assert counters.get("client_disconnects", 0) == by_status.get(499, 0), metrics
    assert counters["internal_errors"] == by_status.get(500, 0), metrics
    assert counters["unauthorized"] == by_status.get(401, 0), metrics
    for status, n in by_status.items():
        if status >= 400 and status != 499:
            assert counters[f"rejected_{status}"] == n, (status, metrics)
    assert not {k for k in counters if k.startswith("rejected_")} - {f"rejected_{s}" for s in by_status}


class HeldCollect:
    """Holds the batcher's worker inside `Ensemble.collect` (the batch is on the devices) until
    the test releases it; `calls` counts the sequences of every dispatch gathered."""

    def __init__(self, ensemble, monkeypatch):
        self.entered, self.release, self.sequences = threading.Event(), threading.Event(), []
        real = ensemble.collect

        def collect(pending):
            self.sequences.append(len(pending[0].num_tokens))
            self.entered.set()
            assert self.release.wait(WAIT_S), "awaited the test's release of the held batch"
            return real(pending)

        monkeypatch.setattr(ensemble, "collect", collect)


@contextlib.contextmanager
def draining_server(ensemble, drain_timeout_s: float):
    batcher = Batcher(lambda: ensemble, max_batch_items=16, max_wait_s=0.005, progress=False)
    server = ServerThread(create_app(batcher, limits=LIMITS, drain_timeout_s=drain_timeout_s)).start()
    try:
        wait_ready(server.url)
        yield server, batcher
    finally:
        if server._thread.is_alive():
            server.stop()


def _hold_one_queue_two_and_stop(workers, client, server, batcher, held, pool):
    """Request pool[:3] (held on the devices), then pool[3:7] and pool[7:11] (queued behind it),
    then stop the server: (first, [queued...], stopping) futures."""
    first = workers.submit(post, client, server.url, "/score", {"items": pool[:3]})
    assert held.entered.wait(WAIT_S), "awaited the first batch on the devices"
    queued = [workers.submit(post, client, server.url, "/score", {"items": pool[i:i + 4]}) for i in (3, 7)]
    wait_for(lambda: batcher.metrics.snapshot()["gauges"]["queued_items"] == 8,
             "8 sequences queued behind the held batch")
    return first, queued, workers.submit(server.stop)


# --- 1. shutdown with requests in flight -----------------------------------------------------------


def test_shutdown_drains_queued_and_in_flight_requests(ensemble, pool, reference, client, monkeypatch):
    """Stop with one batch on the devices and two requests queued behind it: the listener
    closes, the drain waits, every request is answered with its scores, the worker is joined."""
    held = HeldCollect(ensemble, monkeypatch)
    with draining_server(ensemble, drain_timeout_s=WAIT_S) as (server, batcher), \
            concurrent.futures.ThreadPoolExecutor(4) as workers:
        first, queued, stopping = _hold_one_queue_two_and_stop(workers, client, server, batcher, held, pool)
        wait_for(lambda: batcher.draining, "the server to start draining")
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.post(f"{server.url}/score", json={"items": pool[:1]}, timeout=WAIT_S)
        held.release.set()
        assert first.result(WAIT_S).json()["results"] == reference[:3]
        for i, answer in zip((3, 7), queued):
            assert answer.result(WAIT_S).json()["results"] == reference[i:i + 4]
        stopping.result(WAIT_S)
    assert not batcher._thread.is_alive() and batcher.state == "stopped"
    check_metrics_agree(batcher.metrics.snapshot())


def test_shutdown_past_the_drain_time_answers_queued_requests_503_unscored(ensemble, pool, reference, client,
                                                                         monkeypatch):
    """--drain-timeout 0: the queued requests get a JSON 503 with Retry-After at once, while the
    batch on the devices is still held; they are never computed; the held batch is answered."""
    held = HeldCollect(ensemble, monkeypatch)
    with draining_server(ensemble, drain_timeout_s=0) as (server, batcher), \
            concurrent.futures.ThreadPoolExecutor(4) as workers:
        first, queued, stopping = _hold_one_queue_two_and_stop(workers, client, server, batcher, held, pool)
        for answer in queued:  # answered while the first batch is still held
            response = answer.result(WAIT_S)
            assert_error(response, 503, "shutting down", "drain time")
            assert response.headers["Retry-After"] == "5"
        assert not first.done()
        held.release.set()
        assert first.result(WAIT_S).json()["results"] == reference[:3]
        stopping.result(WAIT_S)
    assert held.sequences == [3], "only the held batch was gathered: the refused ones never ran"
    assert batcher.metrics.snapshot()["counters"]["items_scored"] == 3
    assert not batcher._thread.is_alive()


def test_urm_jax_serve_sigterm_with_requests_in_flight(chat_model):
    """The real command, SIGTERM while requests are in flight: every answer is a 200 with results
    or a JSON 503 (never uvicorn's plain-text 500), no traceback, no abort, exit 0, one
    `stopped (SIGTERM)` line."""
    proc = _start(["--model", str(chat_model), "--port", "0", "--max-length", "32", "--batch-size", "1",
                   "--no-progress", "--drain-timeout", "0"], _cli_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), (line, proc.poll())
        url = line.split()[-1]
        wait_ready(url)
        items = {"items": [{"input_ids": [5] * (1 + i % 30)} for i in range(1000)]}

        def send(_):
            try:
                return httpx.post(f"{url}/score", json=items, timeout=WAIT_S)
            # never accepted: refused, or reset while still in the listen backlog when the
            # listening socket closed (no HTTP request was read from it)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as err:
                return err

        with concurrent.futures.ThreadPoolExecutor(6) as workers:
            answers = [workers.submit(send, k) for k in range(6)]
            wait_for(lambda: httpx.get(f"{url}/metrics", timeout=WAIT_S).json()["gauges"]["in_flight_requests"] >= 1,
                     "a request in flight")
            proc.send_signal(signal.SIGTERM)
            answers = [a.result(WAIT_S) for a in answers]
        assert proc.wait(WAIT_S) == 0
        err = proc.stderr.read()
        statuses = []
        for answer in answers:
            if isinstance(answer, Exception):
                continue
            statuses.append(answer.status_code)
            assert answer.headers["content-type"] == "application/json", answer.text
            if answer.status_code == 503:
                assert "shutting down" in answer.json()["error"] and answer.headers["Retry-After"]
            else:
                assert answer.status_code == 200 and len(answer.json()["results"]) == 1000, answer.text
        assert statuses, answers
        assert "Traceback" not in err and "terminate called" not in err and "ERROR" not in err, err
        assert [ln for ln in err.splitlines() if "stopped" in ln] == ["urm-jax serve: stopped (SIGTERM)"], err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- 2. text that cannot be encoded as UTF-8 ------------------------------------------------------


def test_lone_surrogates_are_422_naming_item_and_field(client, ensemble, pool):
    bad_items = [
        ({"prompt": SURROGATE, "response": "b"}, "'prompt'"),
        ({"prompt": "a", "response": "b\udfff"}, "'response'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\udfff"}]},
         "messages[1].content"),
        ({"messages": [{"role": "us\ud800er", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "messages[0].role"),
        ({"text": "hello " + SURROGATE}, "'text'"),
    ]
    with serving(ensemble) as (server, _):
        for item, field in bad_items:
            body = json.dumps({"items": [*pool[:2], item]})  # ensure_ascii: "\ud800" escapes, valid JSON
            assert_error(client.post(f"{server.url}/score", content=body), 422, "item 2:", field,
                         "lone surrogate", item=2)
        assert_error(client.post(f"{server.url}/get_reward", content=json.dumps({"query": ["ok", SURROGATE]})),
                     422, "item 1:", "'text'", "lone surrogate", item=1)
        assert post(client, server.url, "/score", {"items": pool[:1]}).status_code == 200


def test_lone_surrogates_in_score_files_and_the_python_api(chat_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "\\ud800", "response": "b"}\n')
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", str(chat_model), "--input", str(src), "--output", str(out), "--no-progress",
            "--max-length", str(MAX_LENGTH)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    assert f"{src}:2" in err and "'prompt'" in err and "lone surrogate" in err and "Traceback" not in err
    assert not out.exists()
    assert cli_main(args + ["--on-bad-line", "skip"]) == 0
    assert len(out.read_text().splitlines()) == 1
    scorer = Scorer(chat_model, max_length=MAX_LENGTH, batch_size=1)
    with pytest.raises(ValueError, match=r"example 1: 'response' is not valid Unicode"):
        scorer.score([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": SURROGATE}])
    rm = RewardModel(chat_model, max_length=MAX_LENGTH, batch_size=1)
    with pytest.raises(ValueError, match=r"conversation 1: .* is not valid Unicode"):
        reward_function(rm)(prompts=["a", "b"], completions=["fine", SURROGATE])


# --- 3. huge texts ----------------------------------------------------------------------------------


def _llama3_tokenizer(chat_model):
    return AutoTokenizer.from_pretrained(str(chat_model))


def test_token_lower_bound_is_sound_and_refuses_before_tokenising(chat_model, monkeypatch):
    tok = _llama3_tokenizer(chat_model)
    per_token = max_token_bytes(tok)
    assert per_token and per_token >= max(len(t.encode()) for t in ("<|eot_id|>", "<|begin_of_text|>"))
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz\n\t  é日本🙂=-_.,") + ["<|eot_id|>", "<|begin_of_text|>", " " * 40, "=" * 64]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=rng.integers(1, 300)))
        if not text.strip():
            continue
        assert min_tokens(tok, text) <= len(text_ids(tok, text)), repr(text)
        # at max_tokens = its true length the bound never refuses it
        assert text_ids(tok, text, max_tokens=len(text_ids(tok, text))) == text_ids(tok, text)

    calls = []
    real_call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    with pytest.raises(TooManyTokens, match=r"'text' has at least \d+ tokens .*max_length=64") as caught:
        text_ids(tok, "word " * 200_000, max_tokens=64, field="'text'")
    assert caught.value.at_least and calls == []  # refused without tokenising

    # Tokenizers where a token can stand for unboundedly much text (or text can vanish) get no bound.
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]")
    assert max_token_bytes(lossy) is None and min_tokens(lossy, "a" * 1000) == 0


def test_tokenizer_too_long_warning_is_silenced(chat_model):
    tok = _llama3_tokenizer(chat_model)
    tok.model_max_length = 8
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger("transformers.tokenization_utils_base")
    target.addHandler(handler)
    try:
        assert len(text_ids(tok, "many words " * 20)) > 8
    finally:
        target.removeHandler(handler)
    assert not [r for r in records if "Token indices sequence length" in r.getMessage()]


def test_a_huge_text_neither_stalls_other_requests_nor_waits_for_the_tokenizer(ensemble, pool, reference, client,
                                                                              monkeypatch):
    """(a) Over the bound: 422 naming the item and the server flag, without tokenising. (b) A
    request whose tokenisation is held (a big text being tokenised) does not hold up the next."""
    with serving(ensemble) as (server, _):
        huge = {"items": [pool[0], {"text": "word " * 12_000}]}  # under --max-body-bytes, over 128 x 64 bytes
        assert_error(post(client, server.url, "/score", huge), 422, "item 1:", "at least",
                     f"max_length={MAX_LENGTH}", "--truncation left", item=1)
        long_ids = {"items": [{"input_ids": [5] * (MAX_LENGTH + 1)}]}
        assert_error(post(client, server.url, "/score", long_ids), 422, "--truncation left", item=0)
        # a long id list is refused by its length before each id is checked
        assert_error(post(client, server.url, "/score", {"items": [{"input_ids": ["x"] * 2000}]}), 422,
                     "example has 2000 tokens, more than max_length", item=0)

        tok = ensemble.tokenizer
        entered, release = threading.Event(), threading.Event()
        real_call = type(tok).__call__

        def held_call(self, text, *args, **kwargs):
            if isinstance(text, str) and "HOLD-ME" in text:
                entered.set()
                assert release.wait(WAIT_S), "awaited the test's release of the held tokenisation"
            return real_call(self, text, *args, **kwargs)

        monkeypatch.setattr(type(tok), "__call__", held_call)
        with concurrent.futures.ThreadPoolExecutor(2) as workers:
            slow = workers.submit(post, client, server.url, "/score",
                                  {"items": [{"prompt": "HOLD-ME", "response": "fine"}]})
            assert entered.wait(WAIT_S), "awaited the held tokenisation"
            other = post(client, server.url, "/score", {"items": pool[:2]})
            assert other.status_code == 200 and other.json()["results"] == reference[:2]
            assert not slow.done()
            release.set()
            assert slow.result(WAIT_S).status_code == 200


# --- 4. texts without the end-of-turn token ------------------------------------------------------


def test_items_without_end_of_turn_are_scored_and_counted(ensemble, pool, client, chat_model):
    tok = _llama3_tokenizer(chat_model)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    with serving(ensemble) as (server, _):
        def counted():
            return client.get(f"{server.url}/metrics").json()["counters"].get("items_without_end_of_turn", 0)

        ended = post(client, server.url, "/score", {"items": [{"messages": chat}, {"text": rendered}]})
        assert ended.status_code == 200 and counted() == 0
        cut = post(client, server.url, "/score", {"items": [{"text": "hello world"}, {"messages": chat}]})
        assert cut.status_code == 200 and cut.json()["results"][0]["num_tokens"] == 3
        assert counted() == 1
        assert post(client, server.url, "/get_reward", {"query": ["hello", rendered[:-len("<|eot_id|>")]]}).status_code == 200
        assert counted() == 3


# --- 6. warm-up length ----------------------------------------------------------------------------


def test_warmup_length_compiles_short_buckets_and_longer_ones_on_first_use(chat_model, client):
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert serve_warmup_length(args, "cpu") == 512 and serve_warmup_length(args, "tpu") == 4096
    args = build_parser().parse_args(["serve", "--model", "m", "--max-length", "256"])
    assert serve_warmup_length(args, "cpu") == 256
    args = build_parser().parse_args(["serve", "--model", "m", "--warmup-length", "64"])
    assert serve_warmup_length(args, "gpu") == 64

    from urm_jax.scoring import Ensemble

    members = Ensemble.load([chat_model], max_length=MAX_LENGTH, batch_size=8)
    batcher = Batcher(lambda: members, warmup_length=24, progress=False)
    with ServerThread(create_app(batcher, limits=LIMITS)) as server:
        info = wait_ready(server.url)
        assert info["warmup_length"] == 24 and info["compiled_shapes"] == 2  # buckets 16 and 24
        long_item = {"items": [{"input_ids": [5] * MAX_LENGTH}]}
        assert post(client, server.url, "/score", long_item).status_code == 200
        assert client.get(f"{server.url}/metrics").json()["gauges"]["shapes_compiled_after_ready"] == 1


# --- 7. start-up errors -------------------------------------------------------------------------


def _serve_error(capsys, *args) -> tuple[int, str, str]:
    code = cli_main(["serve", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_startup_errors_name_what_failed(chat_model, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = _serve_error(capsys, "--model", str(chat_model), "--port", str(port))
    assert code == 2 and "listening on" not in out
    assert err.strip() == f"error: cannot listen on 127.0.0.1:{port}: address already in use", err
    code, _, err = _serve_error(capsys, "--model", str(chat_model), "--host", "no.such.host.invalid")
    assert code == 2 and err.startswith("error: cannot listen on no.such.host.invalid:8000: the host") \
        and err.count("\n") == 1, err
    code, _, err = _serve_error(capsys, "--model", str(chat_model), "--host", "192.0.2.77", "--port", "0")
    assert code == 2 and "cannot listen on 192.0.2.77:0: 192.0.2.77 is not an address of this machine" in err, err
    (tmp_path / "empty").mkdir()
    code, out, err = _serve_error(capsys, "--model", str(tmp_path / "empty"), "--port", "0")
    assert code == 2 and out == "" and err.count("error:") == 1 and err.count("\n") == 1 \
        and "config.json" in err, (out, err)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes((chat_model / "config.json").read_bytes())
    code, out, err = _serve_error(capsys, "--model", str(tmp_path / "no_weights"), "--port", "0")
    assert code == 2 and out == "" and err.count("\n") == 1 and "no_weights: no model.safetensors" in err, (out, err)
    some_file = tmp_path / "scores.jsonl"
    some_file.write_text("{}\n")
    code, out, err = _serve_error(capsys, "--model", str(some_file), "--port", "0")
    assert code == 2 and out == "" and err.strip() == (
        f"error: {some_file}: is a file, not a model directory (give the directory that holds "
        "config.json, or a urm-jax checkpoint directory)"), err


# --- 8. metrics agree ------------------------------------------------------------------------------


def test_metrics_outcome_counters_agree_with_the_status_table(ensemble, pool, client, monkeypatch):
    with serving(ensemble, api_key="k") as (server, batcher):
        auth = {"Authorization": "Bearer k"}
        assert post(client, server.url, "/score", {"items": pool[:2]}, headers=auth).status_code == 200
        assert post(client, server.url, "/score", {"items": []}, headers=auth).status_code == 422
        assert client.post(f"{server.url}/score", content=b"{", headers=auth).status_code == 400
        assert post(client, server.url, "/score", {"items": pool[:1]}).status_code == 401
        assert client.get(f"{server.url}/nope", headers=auth).status_code == 404
        assert client.get(f"{server.url}/score", headers=auth).status_code == 405
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as raw:  # leaves mid-body
            raw.sendall(b"POST /score HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\nContent-Length: 99\r\n\r\n{")
        wait_for(lambda: "499" in client.get(f"{server.url}/metrics", headers=auth).json()["requests"]
                 ["by_endpoint_and_status"].get("score", {}), "the disconnect to be recorded")

        def broken(pending):
            raise RuntimeError("device lost")

        monkeypatch.setattr(ensemble, "collect", broken)
        assert_error(post(client, server.url, "/score", {"items": pool[:1]}, headers=auth), 500, "device lost")
        monkeypatch.undo()
        metrics = client.get(f"{server.url}/metrics", headers=auth).json()
    check_metrics_agree(metrics)
    table = metrics["requests"]["by_endpoint_and_status"]
    assert table["score"] == {"200": 1, "422": 1, "400": 1, "401": 1, "405": 1, "499": 1, "500": 1}
    assert table["other"] == {"404": 1} and metrics["counters"]["client_disconnects"] == 1


# --- 9. the small print ------------------------------------------------------------------------------


def test_penalty_auth_and_messages_small_print(ensemble, pool, reference, client):
    with serving(ensemble, api_key="Sekret") as (server, _):
        auth = {"Authorization": "Bearer Sekret"}
        for scheme in ("bearer", "BEARER", "Bearer  "):
            ok = post(client, server.url, "/score", {"items": pool[:1]},
                      headers={"Authorization": f"{scheme} Sekret"})
            assert ok.status_code == 200, (scheme, ok.text)
        assert post(client, server.url, "/score", {"items": pool[:1]},
                    headers={"Authorization": "Basic Sekret"}).status_code == 401
        assert post(client, server.url, "/score", {"items": pool[:1]},
                    headers={"Authorization": "bearer sekret"}).status_code == 401  # the token is exact
        assert_error(post(client, server.url, "/score", {"items": pool[:1], "std_penalty": "0.5"}, headers=auth),
                     422, "'std_penalty' must be a finite number >= 0 (a JSON number; got a JSON str)")
        assert_error(client.post(f"{server.url}/get_reward?std_penalty=1", headers=auth,
                                 content=json.dumps({"query": ["hi"], "std_penalty": 0})),
                     422, "both in the URL and in the body")
        url_only = client.post(f"{server.url}/score?std_penalty=0.5", headers=auth,
                               content=json.dumps({"items": pool[:1]})).json()["results"][0]
        assert url_only["penalized_reward"] == reference[0]["reward"] - 0.5 * math.sqrt(reference[0]["uncertainty"])
        huge = post(client, server.url, "/score", {"items": pool[:1], "std_penalty": 1e308}, headers=auth)
        assert huge.status_code == 200 and huge.json()["results"][0]["penalized_reward"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning
        assert penalized_reward(np.array([1.0]), np.array([4.0]), 1e308)[0] == -np.inf
