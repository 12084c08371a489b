"""The model card `convert to_hf` writes as README.md: the Hub's YAML metadata block (base_model,
library_name, pipeline_tag, license when known, tags), the attribute set, how the model was
trained (from `urm_jax_init` and the `urm_jax_training` records `urm-jax train` writes into
final/'s config.json), evaluation numbers when a run recorded them (training evals, and an
`urm-jax eval` metrics.json when given), and a usage snippet that runs as written from the
exported directory (tests run it)."""

from __future__ import annotations

import json
from typing import Any

from urm_jax.attributes import check_label_range
from urm_jax.config import ModelConfig
from urm_jax.data.tokenization import ChatFormat
from urm_jax.validate import Fields, MetadataError

EXAMPLE_MESSAGES = [{"role": "user", "content": "What is the capital of Australia?"},
                    {"role": "assistant", "content": "The capital of Australia is Canberra."}]
USAGE_TEMPLATE = '''```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "."  # this directory (run from inside it), or the model's Hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
messages = {messages}
text = tokenizer.apply_chat_template(messages, tokenize=False){cut}
inputs = tokenizer(text, return_tensors="pt")  # pass the attention mask: the reward is read at its last token
with torch.no_grad():
    out = model(**inputs)
print(f"reward {{out.logits[0, 0].item():.6f}}")
for name, mean, log_std in zip({names!r}, out.means[0].tolist(), out.log_stds[0].tolist()):
    print(f"{{name}}: mean {{mean:.4f}}, log-std {{log_std:.4f}}")
```'''


def usage_snippet(cfg: ModelConfig, fmt: ChatFormat | None) -> str:
    """Python that loads the exported directory with transformers and scores one conversation the
    way urm-jax does (same text, same pooled token: see urm_jax.data.tokenization)."""
    cut = ""
    if fmt is not None and fmt.name == "chatml":
        cut = (f"\ntext = text[:text.rindex({fmt.end_of_turn!r}) + {len(fmt.end_of_turn)}]"
               f"  # the reward is read at the final {fmt.end_of_turn}, not the newline after it")
    return USAGE_TEMPLATE.format(cut=cut, names=list(cfg.attributes), messages=EXAMPLE_MESSAGES)


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
            "untied_embeddings": init.bool("untied_embeddings", False, null_ok=True)}
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
            "eval_step": record.int("eval_step", None, minimum=0, null_ok=True)})
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


def model_card(cfg: ModelConfig, hf: dict, fmt: ChatFormat | None, *,
               base_model: str | None = None, license: str | None = None,
               eval_metrics: dict | None = None, source: str = "config.json") -> str:
    """README.md text for an exported URM (`hf`: the config.json written beside it; its
    provenance fields are validated by `provenance`, errors naming `source`)."""
    record = provenance(hf, source)
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
        lines.append(f"- Start: `convert init` from `{base_model or init.get('base')}` "
                     f"({', '.join(init.get('base_architectures') or ['a Llama base'])}), "
                     f"backbone kept, fresh heads N(0, {init.get('init_std')}) seed {init.get('seed')}"
                     + ("; tied embeddings untied (no lm_head)" if init.get("untied_embeddings") else "")
                     + ".")
    for stage in record["training"]:
        lines.append(
            f"- Stage {stage['stage']}: `urm-jax train` on `{stage['data']}` ({stage['split']}), "
            f"{stage['steps']} steps, batch {stage['global_batch_size']}, length {stage['seq_len']}, "
            f"lr {stage['learning_rate']:g}"
            + (f" (heads x{stage['head_lr_scale']:g})" if stage["head_lr_scale"] != 1 else "")
            + f", loss `{stage['loss']}`, trained `{', '.join(stage['trainable'])}`, compute "
            f"{stage['compute_dtype']}.")
        if stage.get("final_metrics"):
            lines.append("  Last logged: " + _numbers(stage["final_metrics"]) + ".")
        if stage.get("eval"):
            lines.append(f"  Eval (step {stage.get('eval_step')}): " + _numbers(stage["eval"]) + ".")
    if not init and not record["training"]:
        lines.append("Converted from an existing URM checkpoint; no training record.")
    lines.append("")
    if eval_metrics:
        lines += ["## Evaluation", "", eval_summary(eval_metrics), ""]
    lines += ["## Usage", "", usage_snippet(cfg, fmt), "",
              "`out.means`, `out.log_stds` and `out.gate_weights` are [batch, "
              f"{cfg.num_attributes}] in the attribute order above; the uncertainty of a score is "
              "sum(exp(2 * log_std)).", ""]
    return "\n".join(lines)


def eval_summary(metrics: dict) -> str:
    """One line from an `urm-jax eval` metrics.json: pairs, accuracy, RewardBench score."""
    line = (f"`urm-jax eval` on `{metrics.get('pairs_file')}`: {metrics.get('pairs')} pairs, "
            f"accuracy {metrics.get('accuracy', float('nan')):.4f}")
    score = (metrics.get("rewardbench") or {}).get("score")
    if score is not None:
        complete = metrics["rewardbench"].get("complete")
        line += f", RewardBench score {score:.4f}" + ("" if complete else " (not every section)")
    return line + "."


def _numbers(values: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                     for k, v in values.items())
