"""The embedded demo, end to end on CPU (`make demo`):

real Llama-3 tokenizer (built offline) -> small random URM in the real HF format (bf16 backbone,
fp16 gate, vocab 128257, llama3 RoPE) -> `convert from_hf` -> score the model-card pair and the
bundled samples -> `convert to_hf` -> bit-exact verify -> load the export in transformers
(trust_remote_code) -> `urm-jax parity` in the checkpoint dtypes and in float32 -> a random
Skywork-Reward-like base (one-label classifier) -> `convert init` (its backbone, fresh URM heads)
-> `urm-jax train` stage 1 (bundled HelpSteer2-schema sample) -> stage 2 (bundled preference pairs, gate only) ->
`convert to_hf` of the trained model, loaded in transformers -> `urm-jax eval` on bundled pairs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from urm_jax.data.samples import data_path, sample_examples
from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
from urm_jax.eval import bundled_pairs_path, format_summary, run_eval
from urm_jax.hf.base import init_from_base
from urm_jax.hf.export import to_hf
from urm_jax.hf.load import from_hf
from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf
from urm_jax.hf.verify import format_verify, verify
from urm_jax.io_utils import check_outputs
from urm_jax.parity import TOLERANCES, run_parity
from urm_jax.scoring import Ensemble, Scorer, score_file
from urm_jax.train.config import load_train_config
from urm_jax.train.loop import train
from urm_jax.train.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


DEMO_MARK = ".urm-jax-demo"  # in a workdir the demo made: a rerun may empty it


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def print_verify(rows: list[dict]) -> bool:
    lines, same = format_verify(rows)
    print("\n".join(lines))
    return same


def run_demo(work: Path, *, overwrite: bool = False) -> bool:
    """Run every step in `work` (emptied first); True when every check passed. A `work` that
    exists and was not made by a previous demo (no `.urm-jax-demo` mark) is emptied only with
    `overwrite`. torch is imported for the transformers steps only: it is an optional
    dependency."""
    previous_demo = (work / DEMO_MARK).is_file()
    check_outputs([], [("--workdir", work)], overwrite=overwrite or previous_demo)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / DEMO_MARK).write_text("made by `urm-jax demo`: a rerun empties this directory\n")
    started = time.time()

    step("1. Llama-3 tokenizer from Meta's llama-models wheel (offline), [PAD] = 128256")
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `urm-jax demo [--workdir DIR]`")
