"""What scoring returns: one model's outputs for N sequences (`Scores`), an ensemble's (URME,
`EnsembleScores`), the ensemble statistics, and the one JSON record per sequence that `urm-jax
score`, the Python API and the server all write.

Every JSON output is standard JSON: `json_safe` turns a value that is not finite (a variance that
overflows float64, a NaN from broken weights) into null, never the non-standard NaN/Infinity
tokens; every writer of records passes them through it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from urm_jax.attributes import HELPSTEER2

UNCERTAINTY_MEASURES = ("aleatoric", "reward_gap", "cov_frobenius")


def _named(attributes: Sequence[str], values) -> dict:
    return {a: float(x) for a, x in zip(attributes, values)}


@dataclasses.dataclass(frozen=True)
class Scores:
    """One model's outputs for N sequences, as arrays (float32 unless noted).

    reward [N]; means, log_stds, gate [N, K] (K attributes, in the order of `attributes`);
    uncertainty [N] = sum_k exp(2 log_std_k), as computed by the model; num_tokens [N] int;
    truncated [N] bool; attributes: the K names (the model's `ModelConfig.attributes`).
    """

    reward: np.ndarray
    means: np.ndarray
    log_stds: np.ndarray
    gate: np.ndarray
    uncertainty: np.ndarray
    num_tokens: np.ndarray
    truncated: np.ndarray
    attributes: tuple[str, ...] = dataclasses.field(default=HELPSTEER2, compare=False)

    ARRAYS = ("reward", "means", "log_stds", "gate", "uncertainty", "num_tokens", "truncated")

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def variance(self) -> np.ndarray:
        """[N, K] per-attribute variance exp(2 log_std), float64."""
        return _exp(2.0 * self.log_stds.astype(np.float64))

    @property
    def cov_frobenius(self) -> np.ndarray:
        """[N] Frobenius norm of the diagonal covariance diag(exp(2 log_std)), float64."""
        return np.sqrt(np.sum(_exp(4.0 * self.log_stds.astype(np.float64)), axis=-1))

    def measure(self, name: str) -> np.ndarray:
        """[N] uncertainty by name: aleatoric (sum of variances) or cov_frobenius (float64);
        ValueError for reward_gap (an ensemble measure) or an unknown name."""
        if name == "aleatoric":
            return self.uncertainty.astype(np.float64)
        if name == "cov_frobenius":
            return self.cov_frobenius
        if name == "reward_gap":
            raise ValueError("uncertainty 'reward_gap' needs an ensemble (several models)")
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {name!r}")

    def record(self, i: int) -> dict:
        """The output record of sequence i (without its id): reward, per-attribute mean,
        log_std, variance and gate, uncertainty, num_tokens, truncated (Python floats; pass it
        through `json_safe` before writing JSON)."""
        names = self.attributes
        return {"reward": float(self.reward[i]), "mean": _named(names, self.means[i]),
                "log_std": _named(names, self.log_stds[i]),
                "variance": _named(names, _exp(2.0 * self.log_stds[i].astype(np.float64))),
                "gate": _named(names, self.gate[i]), "uncertainty": float(self.uncertainty[i]),
                "num_tokens": int(self.num_tokens[i]), "truncated": bool(self.truncated[i])}

    def take(self, index) -> "Scores":
        """The rows `index` (an int array, a slice or a bool mask) as a new `Scores`."""
        return Scores(*(np.asarray(getattr(self, name))[index] for name in self.ARRAYS),
                      attributes=self.attributes)

    @staticmethod
    def concat(parts: Sequence["Scores"]) -> "Scores":
        """Rows of several `Scores` of the same model, in order."""
        return Scores(*(np.concatenate([getattr(p, name) for p in parts]) for name in Scores.ARRAYS),
                      attributes=parts[0].attributes)


def _exp(x: np.ndarray) -> np.ndarray:
    """exp without numpy's overflow warning: an overflowing variance is Inf, which every JSON
    writer turns into null (`urm_jax.jsonl.dumps`)."""
    with np.errstate(over="ignore"):
        return np.exp(x)


def least_uncertain(uncertainty: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the `fraction` least uncertain results: at least one, ties in input order."""
    k = max(1, math.ceil(fraction * len(uncertainty) - 1e-9))
    return np.argsort(uncertainty, kind="stable")[:k]


def ensemble_statistics(rewards: np.ndarray, log_stds: np.ndarray) -> dict[str, np.ndarray]:
    """URME statistics from M members' rewards [M, N] and log-stds [M, N, K] (float64 math).

    reward_mean: the ensemble's reward; reward_gap: the largest pairwise difference of member
    rewards, max_m r_m - min_m r_m; cov_frobenius: the largest over members of
    ||diag(exp(2 log_std_m))||_F = sqrt(sum_k exp(4 log_std_mk)); aleatoric: the members' mean of
    sum_k exp(2 log_std_mk).
    """
    r = np.asarray(rewards, np.float64)
    s = np.asarray(log_stds, np.float64)
    return {"reward_mean": r.mean(axis=0), "reward_gap": r.max(axis=0) - r.min(axis=0),
            "cov_frobenius": np.sqrt(_exp(4.0 * s).sum(axis=-1)).max(axis=0),
            "aleatoric": _exp(2.0 * s).sum(axis=-1).mean(axis=0)}


@dataclasses.dataclass(frozen=True)
class EnsembleScores:
    """Outputs of an ensemble of URMs (URME) for N sequences: each member's `Scores`, in the
    order the models were given, plus the ensemble statistics (see `ensemble_statistics`)."""

    members: tuple[Scores, ...]

    def __post_init__(self):
        object.__setattr__(self, "_stats", ensemble_statistics(
            np.stack([m.reward for m in self.members]), np.stack([m.log_stds for m in self.members])))

    def __len__(self) -> int:
        return len(self.members[0])

    @property
    def reward(self) -> np.ndarray:
        """[N] the ensemble's reward: the members' mean (float64)."""
        return self._stats["reward_mean"]

    @property
    def uncertainty(self) -> np.ndarray:
        """[N] aleatoric uncertainty, averaged over members (float64)."""
        return self._stats["aleatoric"]

    @property
    def reward_gap(self) -> np.ndarray:
        """[N] max_m r_m - min_m r_m (float64)."""
        return self._stats["reward_gap"]

    @property
    def cov_frobenius(self) -> np.ndarray:
        """[N] the largest member covariance norm (float64)."""
        return self._stats["cov_frobenius"]

    @property
    def num_tokens(self) -> np.ndarray:
        """[N] int tokens per sequence (the same for every member)."""
        return self.members[0].num_tokens

    @property
    def truncated(self) -> np.ndarray:
        """[N] bool, whether each sequence was left-truncated (the same for every member)."""
        return self.members[0].truncated

    def measure(self, name: str) -> np.ndarray:
        """[N] uncertainty by name (any of UNCERTAINTY_MEASURES), float64."""
        if name not in UNCERTAINTY_MEASURES:
            raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {name!r}")
        return self._stats[name]

    def record(self, i: int) -> dict:
        """The JSON output record of sequence i: ensemble reward and statistics, and each
        member's record (without num_tokens/truncated, kept once at the top)."""
        members = []
        for m in self.members:
            rec = m.record(i)
            del rec["num_tokens"], rec["truncated"]  # the same for every member: kept once
            members.append(rec)
        return {"reward": float(self.reward[i]), "reward_mean": float(self.reward[i]),
                "max_reward_gap": float(self.reward_gap[i]),
                "max_cov_frobenius": float(self.cov_frobenius[i]),
                "uncertainty": float(self.uncertainty[i]),
                "num_tokens": int(self.num_tokens[i]), "truncated": bool(self.truncated[i]),
                "members": members}

    def take(self, index) -> "EnsembleScores":
        """The sequences at `index` (an int array, slice or bool mask over N) of every member."""
        return EnsembleScores(tuple(m.take(index) for m in self.members))

    @staticmethod
    def concat(parts: Sequence["EnsembleScores"]) -> "EnsembleScores":
        """The parts' sequences one after another, member by member (parts must have the same members;
        IndexError for no parts)."""
        return EnsembleScores(tuple(Scores.concat([p.members[m] for p in parts])
                                    for m in range(len(parts[0].members))))
