"""PyTorch reference of URM-LLaMa-3.1-8B (`LlamaForSequenceClassificationWithNormal_Weights`).

This file is copied into exported Hugging Face checkpoints as `modeling_custom.py` and loaded with
`AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`, so it must stay
self-contained: it imports only torch and transformers.

Parameter names match the released checkpoint exactly:
    model.*                       stock LlamaModel backbone (no lm_head)
    score.weight                  [num_labels = 2K, hidden] value head, interleaved (mean_k, log_std_k);
                                  K attributes (5 in the released model), named by id2label
    weights.fc.{0,2,4}.{weight,bias}  gating MLP (indices 1 and 3 are parameter-free SELUs)

Two deliberate differences from the released remote code (outputs on unpadded input are identical):
* Position ids: when `position_ids` is None and an `attention_mask` is given we use
  `cumsum(mask) - 1` (clamped at 0), so a left-padded row gets exactly the positions, hence the
  score, of the unpadded row. The released code passed none (arange), which shifts a left-padded
  row's positions by its padding. RoPE is relative, so that shift changes scores only through
  rounding (~1e-6 in fp32, more in bf16 where cos/sin are rounded at different angles), but it
  makes left-padded scores depend on the batch.
* Pooling: with an `attention_mask`, the last position where the mask is 1 (urm-jax's rule,
  the same for left and right padding, whatever the token there). Without a mask, the rightmost
  token whose id != pad_token_id (transformers 5 rule). The released class used "first pad - 1"
  (transformers 4.4x). The id rules break when pad_token_id is also an end-of-turn token (SmolLM2,
  many small bases: `<|im_end|>` is both): they skip the final `<|im_end|>`, the token the reward
  is read at. Pass the attention mask (tokenizers return it); without one the class warns once.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

NUM_ATTRIBUTES_PER_LABEL = 2  # score outputs are (mean, log_std) pairs

_GATE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def gate_dtype_from_config(config) -> torch.dtype:
    """The gate's dtype: the config's `gate_dtype`, else float16 as in the released code, whatever
    dtype the stored tensors have (from_pretrained casts them into the gate). urm-jax applies the
    same rule in every loader and writes the field explicitly on every conversion."""
    name = getattr(config, "gate_dtype", None) or "float16"
    if isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    if name not in _GATE_DTYPES:
        raise ValueError(f"gate_dtype must be one of {sorted(_GATE_DTYPES)}, got {name!r}")
    return _GATE_DTYPES[name]


@dataclass
class URMOutput(ModelOutput):
    """Pooled outputs. `logits` is the scalar reward, as in the released class."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # reward sum_k means_k * gate_k, [B, 1]
    value_logits: torch.FloatTensor | None = None  # raw score head z, [B, 2K]
    means: torch.FloatTensor | None = None  # z.view(B, K, 2)[..., 0], [B, K]
    log_stds: torch.FloatTensor | None = None  # z.view(B, K, 2)[..., 1], [B, K]
    gate_weights: torch.FloatTensor | None = None  # gate MLP output w, [B, K]
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class Weights(nn.Module):
    """Gating MLP. Created with an explicit dtype (fp16 in the released code) that survives
    `from_pretrained(dtype=...)`, because transformers casts each loaded tensor to the dtype of the
    parameter it fills."""

    def __init__(self, hidden_size: int, num_labels: int, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(hidden_size, hidden_size, dtype=dtype),
            nn.SELU(),
            nn.Linear(hidden_size, hidden_size, dtype=dtype),
            nn.SELU(),
            nn.Linear(hidden_size, num_labels // NUM_ATTRIBUTES_PER_LABEL, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The released code casts the (bf16/fp32) hidden state to the gate dtype and runs in it.
        """Gate weights [..., K] in the gate's dtype from hidden states [..., hidden] (cast to the gate
        dtype first, as the released code does); K = num_labels // 2."""
        return self.fc(x.to(self.fc[0].weight.dtype))


def pooling_index(input_ids, attention_mask, pad_token_id, seq_len, batch_size, device):
    """Index [B] (long) of the token each row is pooled at: the last real token.

    With an attention_mask: the rightmost position where the mask is 1 (urm-jax's rule; padding
    is whatever the mask says, so a pad id that is also the final end-of-turn token is pooled).
    Without a mask: the rightmost token whose id != pad_token_id (transformers 5 rule); without
    ids or a pad id: the last position.
    """
    positions = torch.arange(seq_len, device=device)
    if attention_mask is not None:
        real = (attention_mask != 0).to(device, torch.long)
    elif input_ids is not None and pad_token_id is not None:
        real = (input_ids != pad_token_id).to(device, torch.long)
    else:
        return torch.full((batch_size,), seq_len - 1, device=device, dtype=torch.long)
    return (positions * real).argmax(-1)


def _eos_ids(config) -> set:
    eos = getattr(config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


class LlamaForSequenceClassificationWithNormal_Weights(LlamaPreTrainedModel):
    """URM-LLaMa-3.1-8B: a stock `LlamaModel` backbone, a bias-free value head `score` giving
    [B, 2K] interleaved (mean_k, log_std_k), and the gating MLP `weights` giving [B, K]; the reward is
    sum_k mean_k * gate_k at the last real token. Load with `from_pretrained(dir,
    trust_remote_code=True)`; `config.gate_dtype` (default float16) sets the gate's dtype."""
    config_class = LlamaConfig
    config: LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.weights = Weights(config.hidden_size, self.num_labels, dtype=gate_dtype_from_config(config))
        self.post_init()

    def get_input_embeddings(self):
        """The backbone's token embedding (`model.embed_tokens`, [vocab, hidden])."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        """Replace the backbone's token embedding (transformers' `resize_token_embeddings` calls it)."""
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,  # accepted for API compatibility; no loss is computed
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ):
        """Score a batch: `input_ids` [B, L] long (or `inputs_embeds` [B, L, hidden]), `attention_mask`
        [B, L] (1 = real token; left or right padding). Without `position_ids` and with a mask, positions
        are cumsum(mask) - 1, so padding does not change a row's score.

        Returns a `URMOutput` (`logits` [B, 1] reward, `value_logits` [B, 2K], `means` and `log_stds`
        [B, K], `gate_weights` [B, K] in the gate dtype; float32 where bf16/fp16 meet), or, with
        `return_dict=False`, the released class's tuple (value_logits, gate_weights). `labels` is
        accepted and ignored (loss is None)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if position_ids is None and attention_mask is not None:
            # Padding-invariant positions (the released code used arange; see module docstring).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.setdefault("use_cache", False)  # scoring never needs a KV cache
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # [B, L, H], after the final RMSNorm
        batch_size, seq_len = hidden.shape[:2]

        if attention_mask is None and self.config.pad_token_id in _eos_ids(self.config):
            logger.warning_once(
                "pad_token_id %s is also an eos token id and no attention_mask was given: rows are "
                "pooled at the rightmost token that is not the pad id, which skips a final eos. "
                "Pass attention_mask (the tokenizer returns it) to pool at the last real token.",
                self.config.pad_token_id)
        idx = pooling_index(
            input_ids, attention_mask, self.config.pad_token_id, seq_len, batch_size, hidden.device
        )
        # Pool first: score and gate act per position, so pooling before them gives the same numbers.
        pooled = hidden[torch.arange(batch_size, device=hidden.device), idx]  # [B, H]
        z = self.score(pooled)  # [B, 2K]
        w = self.weights(pooled)  # [B, K], gate dtype
        pairs = z.view(batch_size, -1, NUM_ATTRIBUTES_PER_LABEL)
        means, log_stds = pairs[..., 0], pairs[..., 1]
        # Plain type promotion, as in the released code: bf16 * fp16 -> fp32, fp32 * fp16 -> fp32.
        reward = (means * w).sum(-1, keepdim=True)

        if not return_dict:
            return (z, w)  # exactly what the released class returns
        return URMOutput(
            loss=None,
            logits=reward,
            value_logits=z,
            means=means,
            log_stds=log_stds,
            gate_weights=w,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )
