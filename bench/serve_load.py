"""Load test of the reward server, loopback only: `urm-jax serve` (dynamic batching over the
scoring engine) against OpenRLHF's server design (a transformers model behind FastAPI, one
forward per request, the handler blocking the event loop) and against sequential `urm-jax
score` of the same items, on a small random URM.

    .venv/bin/python bench/serve_load.py [--quick] [--requests 128] [--concurrency 1 8 32]

Model: a Llama-shaped URM (hidden 128, 4 layers, Llama-3.1 vocabulary and tokenizer, fp32
backbone and gate) written by `convert.synthetic`, converted with `python -m convert from_hf`
(what `urm-jax serve` loads) and exported with `python -m convert to_hf` (what the baseline loads
with `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`).

Workload: N conversations (16..max-length tokens), rendered by the chat template with the BOS
written in the text (as a Llama-3 policy's template does), sent as OpenRLHF does: ``POST
/get_reward {"query": [...]}``, --items-per-request texts each (OpenRLHF's current executor sends
one). For each concurrency level, that many client threads each send requests back to back
(closed loop) until --requests have been answered; the two servers take turns level by level.
Every answer is checked: one reward per text, each within 1e-4 (relative) of `urm-jax score`'s
reward for that conversation (lost, reordered or mixed-up answers fail). RSS of each server
process at start (ready) and end. Bounded: --requests per level and --time-limit seconds in all
(a level cut short is marked partial); both servers are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handler's annotation here

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
             max_position_embeddings=4096)
TOLERANCE = 1e-4


# --- the baseline: OpenRLHF's server design (our own code, the same structure) -----------------


def run_baseline_server(model_dir: str) -> int:
    """A transformers model behind FastAPI: each request is tokenised (add_special_tokens=False,
    padded) and run as one batch inside an async handler, so requests are served one at a time."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from urm_jax.serve.server import bind_socket, socket_url, uvicorn_server

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ready"}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = (await request.json())["query"]
        batch = tokenizer(queries, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.inference_mode():
            rewards = model(**batch).logits[:, 0].float().tolist()
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    sock = bind_socket("127.0.0.1", 0)
    print(f"listening on {socket_url(sock)}", flush=True)
    uvicorn_server(app).run(sockets=[sock])
    return 0


# --- helpers -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    """A server subprocess: started, awaited until /health is 200, stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict, ready_s: float):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{name}: no 'listening on' line: {line!r}; stderr: {self.proc.stderr.read()[-2000:]}")
        self.url = line.split()[-1]
        deadline = time.monotonic() + ready_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name}: awaited GET /health == 200 for {ready_s:g} s; "
                                   f"stderr: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.1)
        self.rss_start = rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_level(url: str, requests: list[list[int]], texts: list[str], want: np.ndarray, concurrency: int,
              deadline: float) -> dict:
    """`concurrency` closed-loop clients send `requests` (lists of item indices) to /get_reward;
    every answer is checked against `want` (urm-jax score's rewards)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    cursor = iter(range(len(requests)))
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4))

    def worker():
        while time.monotonic() < deadline:
            with lock:
                j = next(cursor, None)
            if j is None:
                return
            idx = requests[j]
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/get_reward", json={"query": [texts[i] for i in idx]})
                elapsed = time.perf_counter() - start
                rewards = np.asarray(response.json()["rewards"], np.float64) if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, KeyError) as err:
                rewards, elapsed = None, time.perf_counter() - start
                response = err
            with lock:
                if rewards is None or rewards.shape != (len(idx),):
                    failures.append(f"request {j}: {getattr(response, 'status_code', response)!r}")
                elif not np.all(np.abs(rewards - want[idx]) <= TOLERANCE * np.maximum(1.0, np.abs(want[idx]))):
                    failures.append(f"request {j}: rewards {rewards.tolist()} != {want[idx].tolist()}")
                latencies.append(elapsed)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - started
    client.close()
    lat = np.asarray(latencies)
    answered = len(latencies)
    items = sum(len(requests[j]) for j in range(answered))
    return {"answered": answered, "asked": len(requests), "failures": failures, "wall_s": wall,
            "req_s": answered / wall, "items_s": items / wall,
            "p50_ms": float(np.quantile(lat, 0.5) * 1e3) if answered else float("nan"),
            "p99_ms": float(np.quantile(lat, 0.99) * 1e3) if answered else float("nan")}


# --- the benchmark -----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench_serve")
    parser.add_argument("--items", type=int, default=96, help="distinct conversations")
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level and server")
    parser.add_argument("--items-per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="urm-jax rows per device batch")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="fewer items and requests, shorter texts")
    parser.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.baseline_server:
        return run_baseline_server(args.baseline_server)
    if args.quick:
        args.items, args.requests, args.max_length = 32, 32, 64
    started = time.monotonic()
    deadline = started + args.time_limit

    import jax
    from transformers import AutoTokenizer

    from convert.synthetic import llama3_hf_config, write_random_hf
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
    from urm_jax.scoring import Ensemble, score_jsonl

    work = REPO / args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    print("building the model (random weights, from_hf, to_hf) ...", file=sys.stderr, flush=True)
    hf = write_random_hf(work / "hf", llama3_hf_config(**SHAPE), dtype="float32", gate_dtype="float32",
                         tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)
    for step in (["from_hf", str(hf), str(work / "jax")], ["to_hf", str(work / "jax"), str(work / "export")]):
        subprocess.run([sys.executable, "-m", "convert", *step], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    ckpt, export = work / "jax", work / "export"

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    rng = random.Random(0)
    conversations, texts = [], []
    while len(texts) < args.items:
        words = rng.randrange(4, args.max_length - 20)
        messages = [{"role": "user", "content": f"question {len(texts)}: " + "why " * rng.randrange(0, 5)},
                    {"role": "assistant", "content": " ".join(f"w{rng.randrange(1000)}" for _ in range(words))}]
        text = tokenizer.bos_token + tokenizer.apply_chat_template(messages, tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= args.max_length:
            conversations.append(messages)
            texts.append(text)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    # (a) sequential `urm-jax score` (in process: the CLI's code path) of the same conversations.
    inp = work / "items.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(conversations)))
    models = Ensemble.load([ckpt], max_length=args.max_length, batch_size=args.batch_size)
    score_jsonl(models, inp, work / "warm.jsonl", progress=False)  # compiles its shapes
    run = score_jsonl(models, inp, work / "scored.jsonl", progress=False)
    want = np.array([json.loads(line)["reward"] for line in (work / "scored.jsonl").read_text().splitlines()])
    score_items_s = run.written / run.seconds
    del models

    k = args.items_per_request
    requests = [[(j * k + t) % len(texts) for t in range(k)] for j in range(args.requests)]
    servers = {}
    results: dict[tuple[str, int], dict] = {}
    loads: dict[int, tuple[float, float]] = {}
    try:
        servers["urm-jax serve"] = Server(
            "urm-jax serve", [sys.executable, "-m", "urm_jax.cli", "serve", "--model", str(ckpt), "--port", "0",
                              "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
                              "--no-progress"], env, ready_s=max(60.0, deadline - time.monotonic()))
        servers["OpenRLHF design"] = Server(
            "OpenRLHF design", [sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(export)],
            env, ready_s=max(60.0, deadline - time.monotonic()))
        for c in args.concurrency:
            before = os.getloadavg()[0]
            for name, server in servers.items():
                print(f"concurrency {c}: {name} ...", file=sys.stderr, flush=True)
                results[name, c] = run_level(server.url, requests, texts, want, c, deadline)
            loads[c] = (before, os.getloadavg()[0])
        ours = httpx.get(f"{servers['urm-jax serve'].url}/metrics", timeout=60).json()
        rss_end = {name: rss_mb(s.proc.pid) for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average at start "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__} ({jax.devices()[0].platform}); python {platform.python_version()}")
    print(f"model: Llama-shaped URM, hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, vocab 128257, "
          f"fp32; {len(texts)} conversations of {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}); "
          f"{args.requests} requests per level of {k} item(s); urm-jax batch {args.batch_size}, max length "
          f"{args.max_length}")
    print(f"sequential `urm-jax score` of the same conversations (compiled, in process): {score_items_s:.0f} items/s\n")
    print("| concurrency | server | answered | items/s | p50 ms | p99 ms | wrong/lost | load avg before->after |")
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    for c in args.concurrency:
        for name in servers:
            r = results[name, c]
            bad += len(r["failures"]) + (r["asked"] - r["answered"])
            partial = "" if r["answered"] == r["asked"] else " (partial: time limit)"
            print(f"| {c} | {name} | {r['answered']}/{r['asked']}{partial} | {r['items_s']:.0f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {len(r['failures'])} | {loads[c][0]:.1f}->{loads[c][1]:.1f} |")
    print("\n| concurrency | throughput urm-jax serve / OpenRLHF design | p50 ratio (OpenRLHF / ours) | "
          "p99 ratio (OpenRLHF / ours) | urm-jax serve / sequential urm-jax score |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        a, b = results["urm-jax serve", c], results["OpenRLHF design", c]
        print(f"| {c} | {a['items_s'] / b['items_s']:.2f}x | {b['p50_ms'] / a['p50_ms']:.2f}x | "
              f"{b['p99_ms'] / a['p99_ms']:.2f}x | {a['items_s'] / score_items_s:.2f}x |")
    print("\n| server | RSS at ready MB | RSS at end MB |")
    print("|---|---|---|")
    for name, server in servers.items():
        print(f"| {name} | {server.rss_start or float('nan'):.0f} | {rss_end[name] or float('nan'):.0f} |")
    d = ours["items_per_dispatch"]
    print(f"\nurm-jax serve: {ours['counters'].get('dispatches', 0)} dispatches, items per dispatch mean "
          f"{d.get('mean', 0):.1f} (p50 {d.get('p50', 0):.0f}, max {d.get('max', 0):.0f}); batch fill rows "
          f"{ours['batch_fill']['rows']:.2f}, tokens {ours['batch_fill']['tokens']:.2f}; shapes compiled after "
          f"ready: {ours['gauges']['shapes_compiled_after_ready']}; total {time.monotonic() - started:.0f} s")
    for name, c in results:
        for failure in results[name, c]["failures"][:3]:
            print(f"FAILED {name} at concurrency {c}: {failure}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
