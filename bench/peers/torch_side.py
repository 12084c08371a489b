"""The PyTorch worker of bench/compare.py (runs in build/peers/trl, see requirements-trl.txt):
HF transformers scoring of the exported model (SDPA, the attention transformers picks) and TRL's
`RewardTrainer` training step on preference pairs with its own collation (each batch padded to its
longest side), AdamW and gradient clipping as its Trainer loop does them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

from bench.peers.worker import serve

STATE: dict = {}
torch.set_num_threads(os.cpu_count() or 1)


# --- scoring ---------------------------------------------------------------------------------

def hf_score_init(model: str) -> dict:
    import transformers
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=True).eval()
    STATE["hf"] = net
    STATE["pad"] = net.config.pad_token_id
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "attention": getattr(net.config, "_attn_implementation", "?")}


def hf_score(input: str, batch_size: int) -> dict:
    """Rows in file order, `batch_size` at a time, right-padded to the batch's longest row (what
    `tokenizer(..., padding=True)` + model does); forward passes timed."""
    rows = [json.loads(line)["input_ids"] for line in open(input)]
    tokens, seconds, net, pad = 0, 0.0, STATE["hf"], STATE["pad"]
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            longest = max(map(len, batch))
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for j, r in enumerate(batch):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            start = time.perf_counter()
            net(input_ids=ids, attention_mask=mask).logits.sum().item()
            seconds += time.perf_counter() - start
            tokens += int(mask.sum())
    return {"tokens": tokens, "seconds": seconds}


# --- TRL RewardTrainer -----------------------------------------------------------------------

def _tokenizer(vocab: int):
    """A word-level tokenizer over the model's vocabulary (no hub access here): TRL needs one for
    its pad token; the data is already token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="t0")),
                                   pad_token=f"t{vocab - 1}", eos_token="t2", unk_token="t0")


def trl_init(shape: dict, pairs: list[list[int]], batch_pairs: int, seed: int = 0,
             trainable: str = "all") -> dict:
    """A 1-label Llama reward model of `shape` (random, float32, SDPA) under TRL's RewardTrainer;
    `pairs` = (chosen length, rejected length) with random ids. `trainable` 'all' (TRL's default:
    the whole model) or 'head' (the score head only)."""
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(seed)
    vocab = shape["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                         max_position_embeddings=8192, rope_theta=500000.0, num_labels=1,
                         pad_token_id=vocab - 1, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForSequenceClassification(config).float()
    if trainable == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("score."))
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(4, vocab - 2, n).tolist()  # noqa: E731  (never the pad id)
    data = Dataset.from_dict({"chosen_ids": [ids(a) for a, _ in pairs], "rejected_ids": [ids(b) for _, b in pairs]})
    out = tempfile.mkdtemp(prefix="trl-bench-")
    args = RewardConfig(output_dir=out, per_device_train_batch_size=batch_pairs, learning_rate=2e-6,
                        weight_decay=1e-3, max_grad_norm=1.0, use_cpu=True, report_to="none",
                        save_strategy="no", logging_strategy="no", max_length=None, bf16=False,
                        seed=seed, dataloader_num_workers=0, disable_dropout=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(vocab))
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we drive here
    STATE.update(trainer=trainer, loader=trainer.get_train_dataloader(), batches=None)
    first = trl_steps(1)
    return {"trl": trl.__version__, "torch": torch.__version__, "first_step_s": first["seconds"],
            "steps_per_epoch": len(STATE["loader"]),
            "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _next_batch():
    if STATE["batches"] is None:
        STATE["batches"] = iter(STATE["loader"])
    try:
        return next(STATE["batches"])
    except StopIteration:
        STATE["batches"] = iter(STATE["loader"])
        return next(STATE["batches"])


def trl_steps(steps: int) -> dict:
    """`steps` optimiser steps as the Trainer loop runs them (training_step = forward, TRL's
    loss, backward; then clipping, AdamW, schedule); real tokens and token slots they held."""
    trainer = STATE["trainer"]
    model = trainer.model
    model.train()
    tokens = slots = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = _next_batch()
        tokens += int(batch["attention_mask"].sum())
        slots += batch["attention_mask"].numel()
        loss = trainer.training_step(model, batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
    return {"tokens": tokens, "slots": slots, "loss": float(loss), "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    serve({name: fn for name, fn in globals().items()
           if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == __name__
           and name != "serve"})
