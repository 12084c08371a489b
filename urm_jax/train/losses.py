"""Losses for both URM stages. Each returns (sum over real examples, metric sums) so gradient
accumulation and multi-host reductions divide once by the true example count, whatever the
micro-batch split or padding: the step normalises, the loss never averages a padded batch.

Stage 1 (attribute regression, per example over the 5 attributes):
  reparam:  r_k = mu_k + eps_k * exp(sigma_k), eps ~ N(0, 1);  sum_k (r_k - y_k)^2
  nll:      -sum_k log N(y_k; mu_k, exp(2 sigma_k))
            = sum_k [sigma_k + log(2 pi)/2 + (y_k - mu_k)^2 / (2 exp(2 sigma_k))]
  labels may go through an affine transform y = scale * label + shift first.
Stage 2 (gate): Bradley-Terry  -log sigmoid(s_chosen - s_rejected), s = sum_k mu_k w_k.
All losses are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

STAGE1_LOSSES = ("reparam", "nll")


def regression_loss(means, log_stds, labels, mask, noise, *, kind: str = "reparam",
                    label_scale: float = 1.0, label_shift: float = 0.0):
    """means, log_stds, labels, noise: [..., 5]; mask: [...] (1 = real example).
    Returns (loss_sum, metric_sums) with metric sums over real examples."""
    if kind not in STAGE1_LOSSES:
        raise ValueError(f"stage-1 loss {kind!r} not in {STAGE1_LOSSES}")
    mu = means.astype(jnp.float32)
    sigma = log_stds.astype(jnp.float32)
    y = labels.astype(jnp.float32) * label_scale + label_shift
    mask = mask.astype(jnp.float32)
    if kind == "reparam":
        sample = mu + noise.astype(jnp.float32) * jnp.exp(sigma)
        per_example = jnp.sum((sample - y) ** 2, axis=-1)
    else:
        per_example = jnp.sum(sigma + 0.5 * math.log(2 * math.pi)
                              + (y - mu) ** 2 / (2.0 * jnp.exp(2.0 * sigma)), axis=-1)
    loss_sum = jnp.sum(per_example * mask)
    sq_err = (mu - y) ** 2 * mask[..., None]
    metrics = {
        "loss": loss_sum,
        "count": jnp.sum(mask),
        "mse_per_attribute": jnp.sum(sq_err.reshape(-1, mu.shape[-1]), axis=0),
        "sigma_mean": jnp.sum(jnp.mean(jnp.exp(sigma), axis=-1) * mask),
    }
    return loss_sum, metrics


def bradley_terry_loss(chosen_reward, rejected_reward, pair_mask):
    """-log sigmoid(chosen - rejected) summed over real pairs, with accuracy and margin sums."""
    margin = chosen_reward.astype(jnp.float32) - rejected_reward.astype(jnp.float32)
    mask = pair_mask.astype(jnp.float32)
    loss_sum = jnp.sum(-jax.nn.log_sigmoid(margin) * mask)
    metrics = {
        "loss": loss_sum,
        "count": jnp.sum(mask),
        "accuracy": jnp.sum((margin > 0).astype(jnp.float32) * mask),
        "margin": jnp.sum(margin * mask),
    }
    return loss_sum, metrics


def finalize_metrics(sums: dict) -> dict:
    """Turn metric sums (over examples) into means; 'count' stays a count."""
    count = jnp.maximum(sums["count"], 1.0)
    return {k: (v if k == "count" else v / count) for k, v in sums.items()}
