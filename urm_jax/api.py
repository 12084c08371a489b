"""Python API: load a URM (or a URME ensemble) once, score lists of conversations, and use the
structured results inside RLHF loops (best-of-n selection, uncertainty filtering).

    from urm_jax.api import RewardModel, confident

    rm = RewardModel("path/to/urm")                       # or RewardModel([m1, m2, m3]): URME
    scores = rm.score([[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       ("another prompt", "another response")])
    scores.reward, scores.uncertainty                     # [N] arrays
    keep = confident(scores, keep_fraction=0.8)           # [N] bool: the 80% least uncertain
    best = rm.best_of_n(q, candidates, penalty=0.1)       # argmax of reward - 0.1 * uncertainty
    reward_fn = reward_function(rm, std_penalty=0.5)      # for TRL GRPOTrainer / Tunix learners
    reward_fn = reward_function("http://127.0.0.1:8000")  # ... scored by a running `urm-jax serve`

Scoring goes through the same engine as `urm-jax score` (length buckets, data parallel over all
local devices, the training tokenisation policy), so the numbers are the CLI's numbers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from urm_jax.data.tokenization import text_ids
from urm_jax.rewards import RewardClient, RewardFunction, RewardServerError, penalized_reward
from urm_jax.scoring import UNCERTAINTY_MEASURES, Ensemble, EnsembleScores, Scores, least_uncertain

Conversation = Any  # list of {role, content} | (prompt, response) | rendered text | dict | ids

__all__ = ["RewardModel", "BestOfN", "Scores", "EnsembleScores", "confident", "as_example",
           "encode_item", "reward_function", "RewardFunction", "RewardClient", "RewardServerError",
           "penalized_reward"]

_SCHEMA_KEYS = ("messages", "prompt", "input_ids")


def as_example(conversation: Conversation) -> dict:
    """The example (an `encode_item` dict) for a conversation given in any of the accepted
    forms: a list of ``{"role", "content"}`` messages (ending with the assistant's), a
    ``(prompt, response)`` pair of strings, a string of already-rendered chat text, a list of
    token ids, or a dict with ``messages``, ``prompt`` + ``response``, ``input_ids`` or
    ``text``."""
    if isinstance(conversation, dict):
        return conversation
    if isinstance(conversation, str):
        return {"text": conversation}
    if isinstance(conversation, np.ndarray):
        return {"input_ids": conversation.tolist()}
    if isinstance(conversation, (list, tuple)):
        if len(conversation) == 2 and all(isinstance(c, str) for c in conversation):
            return {"prompt": conversation[0], "response": conversation[1]}
        if conversation and all(isinstance(c, dict) for c in conversation):
            return {"messages": list(conversation)}
        if conversation and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                                for c in conversation):
            return {"input_ids": list(conversation)}
    raise ValueError("a conversation must be a list of {role, content} messages, a (prompt, "
                     f"response) pair, a rendered text, a list of token ids or a dict; got "
                     f"{type(conversation).__name__}")


def encode_item(ensemble: Ensemble, item: dict) -> tuple[list[int], bool]:
    """(token ids, whether they were left-truncated) for one example: the score input schemas
    (`urm_jax.data.tokenization.render_ids`: ``messages``, ``prompt`` + ``response``,
    ``input_ids``) or ``{"text": ...}``, a chat already rendered by the template (OpenRLHF's
    ``query``, a Tunix prompt + completion), tokenised by `text_ids` (exactly one BOS, nothing
    stripped or appended) and then held to the same max_length / truncation policy.
    ValueError about the item only."""
    if isinstance(item, dict) and "text" in item:
        mixed = [k for k in _SCHEMA_KEYS if k in item]
        if mixed:
            raise ValueError(f"example mixes schemas: has 'text' and also {mixed}; give only one")
        if ensemble.tokenizer is None:
            raise ValueError("this model has no tokenizer files, so it cannot score 'text'; give 'input_ids'")
        first = ensemble.scorers[0]
        limit = ensemble.max_length if first.truncation == "error" else None
        return ensemble.encode_with_info({"input_ids": text_ids(ensemble.tokenizer, item["text"],
                                                                max_tokens=limit, field="'text'")})
    return ensemble.encode_with_info(item)


@dataclasses.dataclass(frozen=True)
class BestOfN:
    """The selected candidate of one prompt and what the choice was based on."""

    index: int
    response: Any
    reward: float
    utility: np.ndarray  # [n] reward - penalty * uncertainty, the quantity maximised
    uncertainty: np.ndarray  # [n] the chosen measure
    scores: Scores | EnsembleScores  # all n candidates


class RewardModel:
    """One URM, or several (URME), loaded once; each path is an HF directory or a urm-jax
    checkpoint. Keyword arguments are `Scorer`'s: batch_size, batch_tokens, max_length,
    truncation ('error' | 'left', the training policy), compute_dtype, gate_dtype, devices."""

    def __init__(self, model: str | Path | Sequence[str | Path], **scorer_kwargs):
        paths = [model] if isinstance(model, (str, Path)) else list(model)
        self.ensemble = Ensemble.load(paths, **scorer_kwargs)

    @property
    def members(self):
        """The loaded `Scorer`s, one per model path (one unless an ensemble)."""
        return self.ensemble.scorers

    @property
    def is_ensemble(self) -> bool:
        """Whether two or more models were given (scores come back as `EnsembleScores`)."""
        return len(self.ensemble) > 1

    @property
    def tokenizer(self):
        """The first member's tokenizer (members share a vocabulary), None when none has one."""
        return self.ensemble.tokenizer

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids (int list) of one conversation, as `score` would feed them (see `encode_item`);
        ValueError for a bad conversation or one longer than max_length under truncation='error'."""
        return encode_item(self.ensemble, as_example(conversation))[0]

    def score(self, conversations: Sequence[Conversation], *, chunk_size: int = 1024) -> Scores | EnsembleScores:
        """Score conversations; results come back in the given order. One model gives `Scores`,
        several give `EnsembleScores` (members' Scores + reward mean, reward_gap, cov_frobenius).
        A bad conversation raises ValueError naming its index."""
        if not len(conversations):
            raise ValueError("no conversations to score")
        encoded = []
        for i, conversation in enumerate(conversations):
            try:
                encoded.append(encode_item(self.ensemble, as_example(conversation)))
            except ValueError as err:
                raise ValueError(f"conversation {i}: {err}") from None
        chunks = (encoded[start:start + chunk_size] for start in range(0, len(encoded), chunk_size))
        parts = [scores for _, scores in self.ensemble.score_chunks(
            chunks, lambda chunk: ([ids for ids, _ in chunk], [t for _, t in chunk]))]
        return type(parts[0]).concat(parts)

    def best_of_n(self, prompt, responses: Sequence[str], *, penalty: float = 0.0,
                  measure: str = "aleatoric") -> BestOfN:
        """Pick the response maximising reward - penalty * uncertainty (penalty 0: plain best-of-n;
        > 0: prefer answers the model is sure about). ``prompt`` is a string or a message list."""
        return self.best_of_n_batch([prompt], [responses], penalty=penalty, measure=measure)[0]

    def best_of_n_batch(self, prompts: Sequence, responses: Sequence[Sequence[str]], *,
                        penalty: float = 0.0, measure: str = "aleatoric") -> list[BestOfN]:
        """`best_of_n` for many prompts in one scoring pass (all candidates batched together)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        if measure not in UNCERTAINTY_MEASURES:
            raise ValueError(f"measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")
        flat, bounds = [], [0]
        for p, (prompt, candidates) in enumerate(zip(prompts, responses)):
            if not len(candidates):
                raise ValueError(f"prompt {p} has no candidate responses")
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            flat += [turns + [{"role": "assistant", "content": r}] for r in candidates]
            bounds.append(len(flat))
        scores = self.score(flat)
        uncertainty = scores.measure(measure)
        utility = np.asarray(scores.reward, np.float64) - penalty * uncertainty
        out = []
        for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            best = int(np.argmax(utility[lo:hi]))
            out.append(BestOfN(best, responses[p][best], float(scores.reward[lo + best]),
                               utility[lo:hi], uncertainty[lo:hi], scores.take(slice(lo, hi))))
        return out


def confident(scores: Scores | EnsembleScores, *, keep_fraction: float | None = None,
              max_uncertainty: float | None = None, measure: str = "aleatoric") -> np.ndarray:
    """[N] bool mask of the results to trust: the ``keep_fraction`` least uncertain (ties keep
    order), and/or those with uncertainty <= ``max_uncertainty``, under ``measure``."""
    if keep_fraction is None and max_uncertainty is None:
        raise ValueError("give keep_fraction and/or max_uncertainty")
    u = scores.measure(measure)
    keep = np.ones(len(u), bool)
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        mask = np.zeros(len(u), bool)
        mask[least_uncertain(u, keep_fraction)] = True
        keep &= mask
    if max_uncertainty is not None:
        keep &= u <= max_uncertainty
    return keep


def reward_function(source: "RewardModel | RewardClient | str", *, std_penalty: float = 0.0,
                    prompt_format: str = "chat", end_of_turn: str | None = None,
                    prompt_column: str | None = None, api_key: str | None = None,
                    name: str = "urm_reward") -> RewardFunction:
    """A reward function for TRL's ``GRPOTrainer(reward_funcs=...)`` and Tunix's RL learners
    (``reward_fns=...``): ``f(prompts, completions, **kwargs) -> list[float]``, each reward
    ``reward - std_penalty * sqrt(uncertainty)`` (see `RewardFunction` for how prompts and
    completions become conversations).

    ``source``: a `RewardModel` (scores in this process), or a running `urm-jax serve` given as
    its base URL (``"http://host:port"``, with ``api_key`` if it has one) or a `RewardClient`.
    Both give the same numbers as `RewardModel.score` on the same conversations.
    """
    if isinstance(source, str):
        source = RewardClient(source, api_key=api_key)
    if isinstance(source, RewardModel):
        def score(items):
            scores = source.score(items)
            return np.asarray(scores.reward), np.asarray(scores.uncertainty)
    elif isinstance(source, RewardClient):
        def score(items):
            records = source.score(items)
            return (np.array([r["reward"] for r in records], np.float64),
                    np.array([r["uncertainty"] for r in records], np.float64))
    else:
        raise ValueError(f"source must be a RewardModel, a RewardClient or a server URL, got {type(source).__name__}")
    return RewardFunction(score, std_penalty=std_penalty, prompt_format=prompt_format,
                          end_of_turn=end_of_turn, prompt_column=prompt_column, name=name)
