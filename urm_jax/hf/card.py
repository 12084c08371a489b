"""The model card `convert to_hf` writes as README.md: the Hub's YAML metadata block (base_model,
library_name, pipeline_tag, license when known, tags), the attribute set, how the model was
trained (from `urm_jax_init` and the `urm_jax_training` records `urm-jax train` writes into
final/'s config.json), evaluation numbers when a run recorded them (training evals, and an
`urm-jax eval` metrics.json when given), and a usage snippet that runs as written from the
exported directory (tests run it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from urm_jax.attributes import check_label_range
from urm_jax.checkpoint import weights_fingerprint
from urm_jax.config import ConfigError, ModelConfig, read_json_file
from urm_jax.data.tokenization import chat_format
from urm_jax.validate import Fields, MetadataError, shown

EXAMPLE_MESSAGES = [{"role": "user", "content": "What is the capital of Australia?"},
                    {"role": "assistant", "content": "The capital of Australia is Canberra."}]
LOAD = '''import torch
from transformers import AutoModelForSequenceClassification{tokenizer_import}

path = "."  # this directory (run from inside it), or the model's Hub id
{tokenizer_line}model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
'''
SCORE = '''with torch.no_grad():
    out = model(**inputs)
print(f"reward {{out.logits[0, 0].item():.6f}}")
for name, mean, log_std in zip({names!r}, out.means[0].tolist(), out.log_stds[0].tolist()):
    print(f"{{name}}: mean {{mean:.4f}}, log-std {{log_std:.4f}}")
```'''
CHAT_INPUTS = '''messages = {messages}
text = tokenizer.apply_chat_template(messages, tokenize=False){cut}
inputs = tokenizer(text, return_tensors="pt")  # pass the attention mask: the reward is read at its last token
'''
# No chat template: the text is formed by hand, each turn's content on its own line.
PLAIN_TEXT = "\n".join(m["content"] for m in EXAMPLE_MESSAGES)
TEXT_INPUTS = '''# The tokenizer has no chat template: the text is formed by hand (here each turn's content on
# its own line); score texts formatted the way the training data was. The reward is read at the
# text's last token.
text = {text!r}
inputs = tokenizer(text, return_tensors="pt")  # pass the attention mask: the reward is read at its last token
'''
IDS_INPUTS = '''# This model ships no tokenizer files: tokenize with the tokenizer it was trained with. The ids
# below only show the shape; the reward is read at the last token the attention mask keeps.
input_ids = torch.tensor([[{ids}]])  # [batch 1, tokens]
inputs = {{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}}
'''


def usage_kind(tokenizer: Any) -> str:
    """How the snippet forms its input: 'chat' (apply_chat_template), 'text' (a tokenizer
    without a chat template) or 'ids' (no tokenizer files)."""
    if tokenizer is None:
        return "ids"
    return "chat" if isinstance(getattr(tokenizer, "chat_template", None), str) else "text"


def example_ids(cfg: ModelConfig) -> list[int]:
    """Token ids the no-tokenizer snippet scores: BOS (when the model has one) then 1..7, all
    inside the vocabulary."""
    ids = [i % cfg.vocab_size for i in range(1, 8)]
    return ([cfg.bos_token_id] if cfg.bos_token_id is not None else []) + ids


def usage_snippet(cfg: ModelConfig, tokenizer: Any) -> str:
    """Python that loads the exported directory with transformers and scores one conversation the
    way urm-jax does (same text, same pooled token: see urm_jax.data.tokenization). It runs as
    written whatever the export ships: a chat template (the conversation through it), a
    tokenizer without one (a text formed by hand, as urm-jax scores its token ids), or no
    tokenizer (token ids)."""
    kind = usage_kind(tokenizer)
    load = LOAD.format(
        tokenizer_import="" if kind == "ids" else ", AutoTokenizer",
        tokenizer_line="" if kind == "ids" else "tokenizer = AutoTokenizer.from_pretrained(path)\n")
    if kind == "chat":
        fmt = chat_format(tokenizer)
        cut = ""
        if fmt is not None and fmt.name == "chatml":
            cut = (f"\ntext = text[:text.rindex({fmt.end_of_turn!r}) + {len(fmt.end_of_turn)}]"
                   f"  # the reward is read at the final {fmt.end_of_turn}, not the newline after it")
        inputs = CHAT_INPUTS.format(messages=EXAMPLE_MESSAGES, cut=cut)
    elif kind == "text":
        inputs = TEXT_INPUTS.format(text=PLAIN_TEXT)
    else:
        inputs = IDS_INPUTS.format(ids=", ".join(map(str, example_ids(cfg))))
    return "```python\n" + load + inputs + SCORE.format(names=list(cfg.attributes))


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML flow values


def provenance(hf: dict, source: str) -> dict:
    """The provenance records of a checkpoint's config.json, type- and range-checked: `init`
    (`urm_jax_init`, what `convert init` recorded; {} when absent), `training` (the
    `urm_jax_training` list, one record per stage) and `label_range` (`urm_label_range`,
    (low, high) with low < high, or None). MetadataError names `source` and the field."""
    fields = Fields(hf, source)
    init = fields.object("urm_jax_init", None, null_ok=True)
    init_record = {}
    if init is not None:
        init_record = {
            "base": init.str("base", None, null_ok=True),
            "base_model": init.str("base_model", None, null_ok=True),
            "license": init.str("license", None, null_ok=True),
            "base_architectures": init.str_list("base_architectures", None, null_ok=True),
            "init_std": init.float("init_std", None, gt=0, null_ok=True),
            "seed": init.int("seed", None, minimum=0, null_ok=True),
            "untied_embeddings": init.bool("untied_embeddings", False, null_ok=True),
            "base_is_local": init.bool("base_is_local", False, null_ok=True)}
    stages = fields.raw("urm_jax_training", None)
    if stages is not None and not isinstance(stages, list):
        raise fields.fail("urm_jax_training", "a list of training records", stages)
    training = []
    for k, stage in enumerate(stages or []):
        if not isinstance(stage, dict):
            raise fields.fail(f"urm_jax_training[{k}]", "an object", stage)
        record = Fields(stage, source, prefix=f"urm_jax_training[{k}].")
        training.append({
            "stage": record.int("stage", minimum=1), "data": record.str("data"),
            "split": record.str("split"), "steps": record.int("steps", minimum=0),
            "global_batch_size": record.int("global_batch_size", minimum=1),
            "seq_len": record.int("seq_len", minimum=1),
            "learning_rate": record.float("learning_rate", ge=0),
            "head_lr_scale": record.float("head_lr_scale", 1.0, ge=0),
            "loss": record.str("loss"), "trainable": record.str_list("trainable"),
            "compute_dtype": record.str("compute_dtype"),
            "final_metrics": _metrics(record, "final_metrics"), "eval": _metrics(record, "eval"),
            "eval_step": record.int("eval_step", None, minimum=0, null_ok=True),
            "data_sha256": record.str("data_sha256", None, null_ok=True),
            "lora": record.raw("lora", None)})
    label_range = fields.raw("urm_label_range", None)
    if label_range is not None:
        try:
            label_range = check_label_range(label_range, where=f"{source}: field urm_label_range")
        except ValueError as err:
            raise MetadataError(str(err)) from None
    return {"init": init_record, "training": training, "label_range": label_range}


def _metrics(record: Fields, key: str) -> dict:
    """A record's {name: number or None} metrics ({} when absent)."""
    metrics = record.object(key, None, null_ok=True)
    if metrics is None:
        return {}
    return {name: metrics.float(name, None, null_ok=True) for name in metrics.data}


def model_card(cfg: ModelConfig, hf: dict, tokenizer: Any, *,
               base_model: str | None = None, license: str | None = None,
               eval_metrics: dict | None = None, source: str = "config.json") -> str:
    """README.md text for an exported URM (`hf`: the config.json written beside it, already
    `urm_jax.provenance.publishable`; `tokenizer`: the export's, or None; `eval_metrics`: as
    `read_eval_metrics` returns it)."""
    record = provenance(hf, source)  # validated: MetadataError names `source` and the field
    init = record["init"]
    base_model = base_model or init.get("base_model")
    license = license or init.get("license")
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["reward-model", "urm", "uncertainty", "urm-jax"]}
    if base_model:
        meta["base_model"] = base_model
    if license:
        meta["license"] = license
    lines = ["---", *(f"{k}: {_yaml_value(v)}" for k, v in meta.items()), "---", ""]
    lines += ["# Uncertainty-aware reward model (URM)", "",
              "A Llama-architecture backbone with a value head that predicts a Gaussian (mean, "
              "log-std) per attribute and a gating MLP that weighs the attribute means into one "
              "reward (`logits`), exported by urm-jax (`python -m convert to_hf`). Loads with "
              "`AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)` "
              "(the class ships as `modeling_custom.py`).", ""]
    label_range = record["label_range"]
    lines += ["## Attributes", "",
              f"{cfg.num_attributes} attributes (value head: {cfg.num_labels} outputs, "
              f"`id2label` `<attribute>_mean`/`<attribute>_log_std`; gate: {cfg.num_attributes})"
              + (f", labels in [{label_range[0]:g}, {label_range[1]:g}]" if label_range else "")
              + ":", "", *(f"- `{name}`" for name in cfg.attributes), ""]
    lines += ["## Training", ""]
    if init:
        local = init.get("base_is_local") and not base_model
        lines.append(f"- Start: `convert init` from `{base_model or init.get('base')}` "
                     f"({', '.join(init.get('base_architectures') or ['a Llama base'])}"
                     + ("; a local directory, no Hub id recorded" if local else "") + "), "
                     f"backbone kept, fresh heads N(0, {init.get('init_std')}) seed {init.get('seed')}"
                     + ("; tied embeddings untied (no lm_head)" if init.get("untied_embeddings") else "")
                     + ".")
    for stage in record["training"]:
        digest = f", sha256 {stage['data_sha256'][:16]}" if stage.get("data_sha256") else ""
        lines.append(
            f"- Stage {stage['stage']}: `urm-jax train` on `{stage['data']}` ({stage['split']}{digest}), "
            f"{stage['steps']} steps, batch {stage['global_batch_size']}, length {stage['seq_len']}, "
            f"lr {stage['learning_rate']:g}"
            + (f" (heads x{stage['head_lr_scale']:g})" if stage["head_lr_scale"] != 1 else "")
            + f", loss `{stage['loss']}`, trained `{', '.join(stage['trainable'])}`, compute "
            f"{stage['compute_dtype']}.")
        if stage.get("lora"):
            lines.append("  " + lora_line(stage["lora"]))
        if stage.get("final_metrics"):
            lines.append("  Last logged: " + _numbers(stage["final_metrics"]) + ".")
        if stage.get("eval"):
            lines.append(f"  Eval (step {stage.get('eval_step')}): " + _numbers(stage["eval"]) + ".")
    if not init and not record["training"]:
        lines.append("Converted from an existing URM checkpoint; no training record.")
    lines.append("")
    if eval_metrics:
        lines += ["## Evaluation", "", eval_summary(eval_metrics), ""]
    kind = usage_kind(tokenizer)
    lines += ["## Usage", ""]
    if kind == "ids":
        lines += ["This export ships no tokenizer files (its base had none): tokenize conversations "
                  "with the tokenizer the model was trained with and pass token ids, as below.", ""]
    elif kind == "text":
        lines += ["The tokenizer ships no chat template, so conversations are not rendered "
                  "automatically: form the text as the training data was formatted (the snippet "
                  "writes each turn's content on its own line) and pass it to the tokenizer.", ""]
    lines += [usage_snippet(cfg, tokenizer), "",
              "`out.means`, `out.log_stds` and `out.gate_weights` are [batch, "
              f"{cfg.num_attributes}] in the attribute order above; the uncertainty of a score is "
              "sum(exp(2 * log_std)).", ""]
    return "\n".join(lines)


def lora_line(lora: dict) -> str:
    """One line of a stage's LoRA settings (`urm_jax.train.loop.lora_record`)."""
    return (f"LoRA: rank {lora['r']}, alpha {lora['alpha']:g} (scaling {lora['scaling']:g}"
            + (", rsLoRA" if lora.get("use_rslora") else "") + f"), dropout {lora['dropout']:g}, "
            f"targets {', '.join(f'`{t}`' for t in lora['targets'])}, A init {lora['init']}; "
            "merged into the weights, so the export is a plain URM.")


def read_eval_metrics(file: str | Path, ckpt_dir: str | Path, cfg: ModelConfig) -> dict:
    """An `urm-jax eval` metrics.json, validated for the card of the checkpoint `ckpt_dir`: typed
    fields (`urm_jax.validate`), one evaluated model, and that model must be this checkpoint (the
    same weights by `weights_sha256`, else by path when either side has no fingerprint) with
    the same attribute set. ConfigError names the file and the field."""
    fields = Fields(read_json_file(file), str(file), error=ConfigError)
    models = fields.str_list("models")
    if len(models) != 1:
        raise fields.fail("models", "one evaluated model (an ensemble's numbers are not one "
                          "model's)", models)
    recorded = fields.raw("weights_sha256", None)
    if recorded is not None and not (isinstance(recorded, list) and len(recorded) == 1
                                     and (recorded[0] is None or isinstance(recorded[0], str))):
        raise fields.fail("weights_sha256", "a list of one fingerprint (a string or null)", recorded)
    attributes = fields.raw("attributes")
    if not (isinstance(attributes, list) and len(attributes) == 1 and isinstance(attributes[0], list)
            and all(isinstance(a, str) for a in attributes[0])):
        raise fields.fail("attributes", "a list of one attribute-name list", attributes)
    fingerprint, own = (recorded or [None])[0], weights_fingerprint(ckpt_dir)
    redo = f"evaluate this checkpoint (urm-jax eval --model {ckpt_dir} ...) or drop --eval"
    if fingerprint is not None and own is not None:
        if fingerprint != own:
            raise ConfigError(f"{file}: field weights_sha256: {fingerprint[:16]}... is another "
                              f"model's weights ({models[0]}), not those of {ckpt_dir} "
                              f"({own[:16]}...), the checkpoint being exported; {redo}")
    elif Path(models[0]).resolve() != Path(ckpt_dir).resolve():
        raise ConfigError(f"{file}: field models: evaluated {models[0]}, not {ckpt_dir}, the "
                          f"checkpoint being exported; {redo}")
    if attributes[0] != list(cfg.attributes):
        raise ConfigError(f"{file}: field attributes: evaluated a model with attributes "
                          f"{shown(attributes[0])}, but {ckpt_dir} has {shown(list(cfg.attributes))}; "
                          f"{redo}")
    out = {"pairs_file": fields.str("pairs_file"), "pairs": fields.int("pairs", minimum=0),
           "accuracy": fields.float("accuracy", None, null_ok=True)}
    bench = fields.object("rewardbench", None, null_ok=True)
    if bench is not None:
        out["rewardbench"] = {"score": bench.float("score", None, null_ok=True),
                              "complete": bench.bool("complete", False)}
    return out


def eval_summary(metrics: dict) -> str:
    """One line from an `urm-jax eval` metrics.json: pairs, accuracy, RewardBench score."""
    accuracy = metrics.get("accuracy")
    line = (f"`urm-jax eval` on `{Path(metrics.get('pairs_file') or '').name}`: "
            f"{metrics.get('pairs')} pairs, accuracy "
            + ("n/a" if accuracy is None else f"{accuracy:.4f}"))
    score = (metrics.get("rewardbench") or {}).get("score")
    if score is not None:
        complete = metrics["rewardbench"].get("complete")
        line += f", RewardBench score {score:.4f}" + ("" if complete else " (not every section)")
    return line + "."


def _numbers(values: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in values.items())
