"""Numerical parity of the JAX model against the HF PyTorch reference on the same token ids.

The reference is urm-jax's packaged PyTorch class (`urm_jax.hf.modeling_custom`, the class the
parity bounds are measured against and every export ships), loaded with the directory's weights.
The directory's own `modeling_custom.py` runs only with `trust_remote_code=True` (`urm-jax parity
--trust-remote-code`): code from an input directory never runs without consent. Both are called
with `return_dict=False`, which every version of the URM class supports, and reward is
recomputed from (z, w) the way the real class does. Differences are reported per output as the
largest absolute difference and the largest relative one, relative = max|jax - hf| / max|hf|
(normalised by the output's scale, so values near zero do not blow it up).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from urm_jax.config import ModelConfig, canonical_dtype
from urm_jax.data.samples import sample_examples
from urm_jax.data.tokenization import pad_batch
from urm_jax.model.attention import resolve as resolve_attention
from urm_jax.scoring import Scorer, read_jsonl
from urm_jax.validate import Fields

OUTPUTS = ("reward", "means", "log_stds", "gate")

# Largest relative difference accepted, by (compute dtype, gate dtype). bench/parity_bounds.py
# measured (worst over seeds, GQA 1/2/4, two sizes): fp32/fp32 3.2e-6, fp32/fp16 1.6e-3 (the
# fp16 gate), bf16/fp16 3.6e-2 -- and HF's own bf16 run is 2.8e-2 from fp32, so bf16 differences
# are rounding noise that grows with depth. A real bug (wrong RoPE, pooling, layout) moves
# outputs by O(1), far past every bound.
TOLERANCES = {
    ("float32", "float32"): 1e-5,
    ("float32", "float16"): 5e-3,
    ("float32", "bfloat16"): 3e-2,
    ("bfloat16", "float16"): 1e-1,
    ("bfloat16", "bfloat16"): 1e-1,
    ("bfloat16", "float32"): 1e-1,
    ("float16", "float16"): 5e-2,
}


@dataclasses.dataclass
class ParityReport:
    """What `urm-jax parity` found: `rows` sequences of `lengths` (min, max) tokens, the compute and gate
    dtypes, the reference used, `max_abs` and `max_rel` per output (reward, means, log_stds, gate;
    relative = max |jax - hf| / max |hf|), the `tolerance` on max_rel, golden checks, the attention
    run, and `pooling` (why the two sides pooled different tokens, if they did)."""
    rows: int
    lengths: tuple[int, int]
    compute_dtype: str
    gate_dtype: str
    reference: str
    max_abs: dict
    max_rel: dict
    tolerance: float
    golden: list = dataclasses.field(default_factory=list)
    attention: str = "reference"  # the implementation the JAX side ran (after resolving auto)
    pooling: str | None = None  # why the two sides pool different tokens, when they do

    @property
    def ok(self) -> bool:
        """Whether both sides pooled the same tokens, every output's max_rel is within tolerance, and every
        golden reward matched."""
        return self.pooling is None and all(v <= self.tolerance for v in self.max_rel.values()) and all(
            g["ok"] for g in self.golden)

    def format(self) -> str:
        """The report as the text `urm-jax parity` prints, one output per line."""
        lines = [f"reference: {self.reference}",
                 f"{self.rows} sequences, {self.lengths[0]}..{self.lengths[1]} tokens; "
                 f"compute {self.compute_dtype}, gate {self.gate_dtype}, attention "
                 f"{self.attention}; "
                 f"tolerance {self.tolerance:.1e} (max relative)",
                 f"{'output':<10} {'max_abs':>12} {'max_rel':>12}  ok"]
        for name in OUTPUTS:
            ok = "yes" if self.max_rel[name] <= self.tolerance else "NO"
            lines.append(f"{name:<10} {self.max_abs[name]:12.3e} {self.max_rel[name]:12.3e}  {ok}")
        for g in self.golden:
            lines.append(f"golden {g['id']}: expected {g['expected']:.6f}, jax {g['jax']:.6f}, "
                         f"|diff| {abs(g['jax'] - g['expected']):.2e} {'ok' if g['ok'] else 'NO'} "
                         f"(compute {g['compute_dtype']}, gate {g['gate_dtype']})")
        if self.pooling:
            lines.append(f"pooling differs: {self.pooling}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


# What transformers' from_pretrained loads weights from; checked first so the message is ours.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def load_reference(hf_dir: str | Path, dtype: str, trust_remote_code: bool = False):
    """(torch model, description) of an HF directory's weights in the PyTorch reference: urm-jax's
    packaged class, or with `trust_remote_code` the directory's own `modeling_custom.py`.
    dtype 'keep' keeps each checkpoint tensor's dtype. torch is imported here: it is an optional
    dependency (the `parity` extra)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from urm_jax.hf.modeling_custom import LlamaForSequenceClassificationWithNormal_Weights as Ref

    torch_dtype = "auto" if dtype == "keep" else getattr(torch, dtype)
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}/config.json: not found (--hf must be an HF model directory)")
    if not any((hf_dir / name).is_file() for name in HF_WEIGHT_FILES):
        what = ("it is a urm-jax checkpoint: pass it as --model, and its `python -m convert to_hf` "
                "export as --hf" if (hf_dir / "urm_jax.json").is_file() else "--hf must be an HF model directory")
        raise FileNotFoundError(f"{hf_dir}: no HF weights ({' or '.join(HF_WEIGHT_FILES)}): {what}")
    if trust_remote_code:
        if not (hf_dir / "modeling_custom.py").is_file():
            raise ValueError(f"{hf_dir}: --trust-remote-code, but the directory ships no "
                             "modeling_custom.py")
        model = AutoModelForSequenceClassification.from_pretrained(
            hf_dir, trust_remote_code=True, dtype=torch_dtype, attn_implementation="eager")
        source = f"{hf_dir}/modeling_custom.py (trust_remote_code)"
    else:
        model = Ref.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager")
        source = "urm-jax's reference class (urm_jax/hf/modeling_custom.py)"
    return model.eval(), source


def reference_outputs(model, ids: np.ndarray, mask: np.ndarray,
                      device: str = "cpu") -> dict[str, np.ndarray]:
    """The HF reference's pooled outputs for a padded batch, float64 on the host (the model and
    the batch on `device`)."""
    import torch

    with torch.no_grad():
        z, w = model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
                     attention_mask=torch.as_tensor(mask, dtype=torch.long, device=device),
                     return_dict=False)[:2]
        pairs = z.view(z.shape[0], -1, 2)
        means, log_stds = pairs[..., 0], pairs[..., 1]
        reward = (means * w).sum(-1)  # torch promotion, like the real class
    f64 = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
    return {"reward": f64(reward), "means": f64(means), "log_stds": f64(log_stds), "gate": f64(w)}


def differences(jx: dict, hf: dict) -> tuple[dict, dict]:
    """(max |jax - hf|, that over max |hf|) per output: parity's measure."""
    max_abs = {k: float(np.max(np.abs(jx[k] - hf[k]))) for k in hf}
    return max_abs, {k: max_abs[k] / max(float(np.max(np.abs(hf[k]))), 1e-30) for k in hf}


def synthetic_sequences(cfg: ModelConfig, long_length: int, seed: int = 0) -> list[list[int]]:
    """Seeded random ids, one row past 4x the RoPE `original_max_position_embeddings` (capped),
    because short prompts barely rotate and hide RoPE bugs."""
    rng = np.random.default_rng(seed)
    avoid = {cfg.pad_token_id}
    lengths = [5, 37, 130, long_length]

    def row(n):
        ids = rng.integers(0, cfg.vocab_size, n)
        return [int(i) if i not in avoid else int((i + 1) % cfg.vocab_size) for i in ids]

    return [row(n) for n in lengths]


def default_long_length(cfg: ModelConfig, cap: int = 1024) -> int:
    """Tokens of parity's long synthetic row: 4 x the RoPE original context (64 when unset) + 37, capped
    at `cap` and at max_position_embeddings (past the original context, where RoPE scaling acts)."""
    orig = cfg.rope.original_max_position_embeddings or 64
    return int(min(4 * orig + 37, cap, cfg.max_position_embeddings))


def run_parity(hf_dir, model_path, *, input_path=None, dtype: str = "keep", batch_size: int = 4,
               tolerance: float | None = None, golden_path=None, golden_tolerance: float = 2e-2,
               long_length: int | None = None, attention: str = "reference",
               trust_remote_code: bool = False) -> ParityReport:
    """Score the same token ids with the JAX model (`model_path`: HF dir or urm-jax checkpoint)
    and the HF PyTorch reference (`hf_dir`), and compare outputs (see the module doc). Inputs:
    `input_path` (JSONL in any score schema), else the bundled samples plus seeded random ids
    with one row past 4x the RoPE original context. `dtype`: keep (each side in the checkpoint's
    dtypes) or a compute dtype for the backbone (the gate keeps its own)."""
    compute = None if dtype == "keep" else dtype
    # A named dtype casts the HF backbone's storage too; mirror it (the gate keeps its own dtype).
    # The attention asked for runs every bucket (no switch to blockwise under memory pressure):
    # the report says which implementation was compared.
    scorer = Scorer(model_path, compute_dtype=compute, param_dtype=compute, batch_size=batch_size,
                    attention=attention, switch_attention=False)
    cfg = scorer.cfg
    reference, source = load_reference(hf_dir, dtype, trust_remote_code)
    if input_path:
        _, sequences = read_jsonl(input_path, scorer.encode)
    else:
        sequences = synthetic_sequences(cfg, long_length or default_long_length(cfg))
        if scorer.tokenizer is not None:
            sequences = [scorer.encode(e) for e in sample_examples()] + sequences

    jax_out = scorer.score_ids(sequences)
    hf_rows = {k: [] for k in OUTPUTS}
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        ids, mask = pad_batch(batch, pad_id=scorer.pad_id)
        out = reference_outputs(reference, ids, mask)
        for k in OUTPUTS:
            hf_rows[k].append(out[k])
    hf = {k: np.concatenate(v) for k, v in hf_rows.items()}
    jx = {"reward": jax_out.reward.astype(np.float64), "means": jax_out.means.astype(np.float64),
          "log_stds": jax_out.log_stds.astype(np.float64), "gate": jax_out.gate.astype(np.float64)}
    max_abs, max_rel = differences(jx, hf)
    compute_dtype = scorer.model.options.dtypes.compute
    gate_dtype = scorer.model.options.dtypes.gate_dtype(cfg)
    tol = tolerance if tolerance is not None else TOLERANCES.get((compute_dtype, gate_dtype), 1e-1)
    report = ParityReport(len(sequences), (min(map(len, sequences)), max(map(len, sequences))),
                          compute_dtype, gate_dtype, source, max_abs, max_rel, tol,
                          attention=", ".join(scorer.attention_used()) or resolve_attention(attention),
                          pooling=pooling_difference(scorer, sequences, jx, hf, tol))
    if golden_path:
        def load(compute: str, gate: str) -> Scorer:
            return Scorer(model_path, compute_dtype=compute, param_dtype=compute, gate_dtype=gate,
                          batch_size=batch_size, attention=attention)

        report.golden = check_goldens(scorer, golden_path, golden_tolerance, load=load)
    return report


def pooling_difference(scorer: Scorer, sequences: list[list[int]], jx: dict, hf: dict,
                       tolerance: float) -> str | None:
    """Why the reference and urm-jax read the reward at different tokens, or None.

    urm-jax pools each row's last real token (by the attention mask). A reference that pools by
    the pad id (the rightmost token that is not pad_token_id: transformers' stock rule, older
    exports of this class) picks another token exactly on the rows whose last token is the pad
    id (pad == eos, e.g. SmolLM2's `<|im_end|>`). Those rows are scored again on the JAX side
    cut after their rightmost non-pad token (causal attention: that is the pad-id rule's pooled
    token); when the reference matches the cut rows and not the whole ones, pooling differs."""
    pad = scorer.pad_id
    rows = [i for i, s in enumerate(sequences) if s[-1] == pad and any(t != pad for t in s)]
    if not rows:
        return None
    cut = [sequences[i][:max(j for j, t in enumerate(sequences[i]) if t != pad) + 1] for i in rows]
    scores = scorer.score_ids(cut)
    by_id = {"means": scores.means, "log_stds": scores.log_stds}

    def rel(a: dict) -> float:
        return max(float(np.max(np.abs(a[k] - hf[k][rows]))) / max(float(np.max(np.abs(hf[k][rows]))), 1e-30)
                   for k in by_id)

    by_mask = rel({k: jx[k][rows] for k in by_id})
    by_pad_id = rel(by_id)
    if by_pad_id <= tolerance < by_mask:
        return (f"the reference pools the rightmost token that is not pad_token_id {pad}; urm-jax "
                f"pools the last real token by the attention mask. {len(rows)} row(s) end with the "
                f"pad id (rows {rows[:5]}{', ...' if len(rows) > 5 else ''}), e.g. a final eos "
                f"when pad == eos: the reference matches them cut at their last non-pad token "
                f"(max rel {by_pad_id:.1e}), not whole ({by_mask:.1e}). Use urm-jax's reference "
                "class (drop --trust-remote-code) or re-export the model with `convert to_hf`, "
                "whose class pools by the attention mask")
    return None


def check_goldens(scorer: Scorer, path, tolerance: float, load=None) -> list[dict]:
    """Examples with a known `expected_reward` (e.g. the model card's): JAX reward within
    `tolerance` (absolute). A line may name the dtypes its reward was produced in
    (`compute_dtype`, `gate_dtype`: the model card's loading is a float32 backbone and the
    class's float16 gate); when they differ from `scorer`'s, those lines are scored by
    `load(compute, gate)` (the same checkpoint loaded in them), else by `scorer`. Each result
    records the dtypes it was scored in."""
    examples, sequences = read_jsonl(path, scorer.encode)
    have = (scorer.model.options.dtypes.compute, scorer.model.options.dtypes.gate_dtype(scorer.cfg))
    groups: dict[tuple[str, str], list[int]] = {}
    for n, example in enumerate(examples):
        fields = Fields(example, f"{path}:{n + 1}")
        fields.float("expected_reward")
        want = (canonical_dtype(fields.str("compute_dtype", have[0]), what=f"{path}:{n + 1}: compute_dtype"),
                canonical_dtype(fields.str("gate_dtype", have[1]), what=f"{path}:{n + 1}: gate_dtype"))
        groups.setdefault(want if load is not None else have, []).append(n)
    out: list[dict] = [{} for _ in examples]
    for (compute, gate), rows in groups.items():
        member = scorer if (compute, gate) == have else load(compute, gate)
        rewards = member.score_ids([sequences[n] for n in rows]).reward
        for n, reward in zip(rows, rewards):
            expected = float(examples[n]["expected_reward"])
            out[n] = {"id": examples[n].get("id", n), "expected": expected, "jax": float(reward),
                      "ok": abs(float(reward) - expected) <= tolerance, "compute_dtype": compute,
                      "gate_dtype": gate}
    return out
