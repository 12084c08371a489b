"""Rewards for RL trainers: the uncertainty penalty, reward functions with the signatures TRL's
`GRPOTrainer` and Tunix's GRPO/PPO learners call, and an HTTP client for `urm-jax serve`.

Signatures (looked up in the trainers' current sources):
* TRL `GRPOTrainer(reward_funcs=...)` calls ``f(prompts=..., completions=...,
  completion_ids=..., trainer_state=..., log_extra=..., log_metric=..., **dataset_columns)``,
  all by keyword, and wants one float (or None) per completion. Standard datasets give lists of
  strings; conversational ones give ``prompts`` as message lists and ``completions`` as
  ``[{"role": "assistant", "content": ...}]`` lists.
* Tunix (`tunix.rl.rl_learner`, ``RewardFn = Callable[..., List[float]]``) calls
  ``f(prompts=..., completions=..., mode=..., **dataset_columns)``: ``prompts`` are the strings
  fed to the policy (usually already chat-templated), ``completions`` the generated texts.

`RewardFunction` accepts both: ``f(prompts, completions, **kwargs) -> list[float]``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import httpx
import numpy as np

__all__ = ["penalized_reward", "RewardFunction", "RewardClient", "RewardServerError", "PROMPT_FORMATS"]

PROMPT_FORMATS = ("chat", "rendered")


def penalized_reward(reward, uncertainty, std_penalty: float) -> np.ndarray:
    """``reward - std_penalty * sqrt(uncertainty)``, float64 [N].

    ``uncertainty`` is the model's aleatoric measure, sum_k exp(2 log_std_k) (a variance, in
    reward units squared; for an ensemble the members' mean), so sqrt(uncertainty) is a standard
    deviation in reward units and ``std_penalty`` counts standard deviations: 1.0 scores each
    response one "sigma" below its predicted mean, a lower confidence bound. (URM's paper filters
    by uncertainty instead; a penalty in std units is the common choice in uncertainty-penalised
    RLHF.) ``std_penalty`` must be finite and >= 0.
    """
    if isinstance(std_penalty, bool) or not isinstance(std_penalty, (int, float)) \
            or not math.isfinite(std_penalty) or std_penalty < 0:
        raise ValueError(f"std_penalty must be a finite number >= 0, got {std_penalty!r}")
    reward = np.asarray(reward, np.float64)
    if std_penalty == 0:
        return reward.copy()
    # A huge (finite) penalty overflows to -inf: the caller writes it as null and counts it, so
    # numpy's overflow warning would only be noise on the server's stderr.
    with np.errstate(over="ignore", invalid="ignore"):
        return reward - std_penalty * np.sqrt(np.asarray(uncertainty, np.float64))


class RewardServerError(RuntimeError):
    """The reward server answered with an error (its message, naming the item, is kept)."""

    def __init__(self, status: int, message: str, item: int | None = None):
        super().__init__(f"reward server: HTTP {status}: {message}")
        self.status, self.message, self.item = status, message, item


class RewardClient:
    """A client of a running `urm-jax serve` (``url``: e.g. ``http://127.0.0.1:8000``).

    ``api_key``: the server's bearer token, if it has one. ``timeout``: seconds per request (a
    large batch waits in the queue behind others). Thread-safe (one pooled `httpx.Client`);
    picklable (the connection pool is made again after unpickling).
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def close(self) -> None:
        """Close the HTTP connection pool (idempotent; the next call opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, body: dict) -> dict:
        response = self._http().post(path, json=body)
        if response.status_code != 200:
            try:
                err = response.json()
                message, item = err.get("error", response.text), err.get("item")
            except ValueError:
                message, item = response.text, None
            raise RewardServerError(response.status_code, message, item)
        return response.json()

    def health(self) -> tuple[int, dict]:
        """(status code, body) of ``GET /health``: 200 once the model is loaded and compiled."""
        response = self._http().get("/health")
        return response.status_code, response.json()

    def score(self, items: Sequence[dict], *, std_penalty: float | None = None) -> list[dict]:
        """``POST /score``: one record per item, in order (``reward``, ``mean``, ``log_std``,
        ``variance``, ``gate``, ``uncertainty``, ``num_tokens``, ``truncated``; with
        ``std_penalty``, also ``penalized_reward``). Items are ``{"messages": [...]}``,
        ``{"prompt", "response"}``, ``{"input_ids": [...]}`` or ``{"text": rendered_chat}``.
        Raises RewardServerError (4xx: a bad item, named; 503: not ready or busy)."""
        body: dict[str, Any] = {"items": list(items)}
        if std_penalty is not None:
            body["std_penalty"] = std_penalty
        return self._post("/score", body)["results"]

    def get_reward(self, queries: Sequence[str], *, std_penalty: float | None = None) -> dict:
        """OpenRLHF's ``POST /get_reward``: ``{"rewards", "scores", "extra_logs"}`` for
        already-rendered chat texts."""
        body: dict[str, Any] = {"query": list(queries)}
        if std_penalty is not None:
            body["std_penalty"] = std_penalty
        return self._post("/get_reward", body)


class RewardFunction:
    """A reward function for TRL's `GRPOTrainer` (``reward_funcs=[...]``) and Tunix's RL
    learners (``reward_fns=[...]``): ``f(prompts, completions, **kwargs) -> list[float]``, one
    reward per completion, ``reward - std_penalty * sqrt(uncertainty)`` (`penalized_reward`).

    ``score``: items (the score input schemas, plus ``{"text": ...}``) -> (reward [N],
    uncertainty [N]) float arrays; `urm_jax.api.reward_function` builds it for an in-process
    `RewardModel` or a server URL. How (prompt, completion) become an item:
    * conversational (a prompt that is a message list): ``{"messages": prompt + completion}``,
      the completion a message list (TRL) or a string (one assistant turn);
    * ``prompt_format="chat"`` (default): a plain-string prompt is the user's turn and the
      completion the assistant's, rendered by the reward model's own chat template;
    * ``prompt_format="rendered"``: ``prompt + completion`` is already chat-rendered text (a
      Tunix prompt built with the policy's template); ``end_of_turn`` (e.g. ``"<|eot_id|>"``) is
      appended when the text does not already end with it, since the reward is read at the final
      end-of-turn token.
    ``prompt_column``: take the prompt from this dataset column instead of ``prompts`` (e.g.
    Tunix's raw ``question`` when ``prompts`` hold the policy's template).
    When the trainer passes ``log_metric`` / ``log_extra`` (TRL), the batch's mean raw reward
    and uncertainty are logged as ``urm/reward`` / ``urm/uncertainty`` and each completion's
    uncertainty as a column. A non-finite reward raises ValueError naming the completion.
    """

    def __init__(self, score: Callable[[list[dict]], tuple[np.ndarray, np.ndarray]], *,
                 std_penalty: float = 0.0, prompt_format: str = "chat", end_of_turn: str | None = None,
                 prompt_column: str | None = None, name: str = "urm_reward"):
        penalized_reward(np.zeros(0), np.zeros(0), std_penalty)  # validates std_penalty
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self._score = score
        self.std_penalty = std_penalty
        self.prompt_format = prompt_format
        self.end_of_turn = end_of_turn
        self.prompt_column = prompt_column
        self.__name__ = name  # trainers name their reward columns and errors after it

    def items(self, prompts: Sequence, completions: Sequence) -> list[dict]:
        """The score items for (prompt, completion) pairs; ValueError naming a bad pair."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [self._item(i, p, c) for i, (p, c) in enumerate(zip(prompts, completions))]

    def _item(self, i: int, prompt, completion) -> dict:
        if isinstance(prompt, (list, tuple)):
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            if not isinstance(completion, (list, tuple)):
                raise ValueError(f"completion {i}: expected a message list or a string, "
                                 f"got {type(completion).__name__}")
            return {"messages": [*prompt, *completion]}
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"completion {i}: a prompt must be a string or a message list and a "
                             f"completion a string, got {type(prompt).__name__} and {type(completion).__name__}")
        if self.prompt_format == "chat":
            return {"prompt": prompt, "response": completion}
        text = prompt + completion
        if self.end_of_turn and not text.endswith(self.end_of_turn):
            text += self.end_of_turn
        return {"text": text}

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        """Rewards for TRL-style reward-function calls: `prompts` and `completions` (strings or message
        lists; `prompt_column` picks the prompts from the trainer's columns) -> list of float
        reward - std_penalty * sqrt(uncertainty), one per completion. ValueError naming the completion
        for a bad pair or a non-finite reward; logs urm/reward and urm/uncertainty means when the trainer
        passes `log_metric`."""
        if self.prompt_column is not None:
            if self.prompt_column not in kwargs:
                raise ValueError(f"prompt_column {self.prompt_column!r} is not among the trainer's "
                                 f"columns {sorted(kwargs)}")
            prompts = kwargs[self.prompt_column]
        if not len(completions):
            return []
        reward, uncertainty = self._score(self.items(prompts, completions))
        rewards = penalized_reward(reward, uncertainty, self.std_penalty)
        bad = np.flatnonzero(~np.isfinite(rewards))
        if len(bad):
            raise ValueError(f"completion {int(bad[0])}: the reward model gave a non-finite reward "
                             f"({rewards[bad[0]]}); {len(bad)} of {len(rewards)} are non-finite")
        if callable(kwargs.get("log_metric")):
            kwargs["log_metric"]("urm/reward", float(np.mean(reward)))
            kwargs["log_metric"]("urm/uncertainty", float(np.mean(uncertainty)))
        if callable(kwargs.get("log_extra")):
            kwargs["log_extra"]("urm_uncertainty", [float(u) for u in uncertainty])
        return [float(r) for r in rewards]
