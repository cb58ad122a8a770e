"""Rewards: anything with a batched ``score(prompts, completions) -> np.ndarray`` is a reward.

Gold scorers (:mod:`text_env.rewards.gold`) stand in for human judgement; learned reward models
(:mod:`text_env.rewards.reward_model`) are what RLHF optimises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Scorer", "check_scores"]


@runtime_checkable
class Scorer(Protocol):
    """The reward interface: one float per (prompt, completion) pair, higher is better."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Score a batch. :return: float array of shape ``(len(prompts),)``."""
        ...


def check_scores(scores: object, prompts: Sequence[str], what: str = "reward") -> np.ndarray:
    """Return ``scores`` as a float64 array of shape ``(len(prompts),)``; raise if it has the wrong shape or a NaN/inf.

    Non-finite rewards silently poison an RL run, so they stop it here, naming the prompt.
    """
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.shape != (len(prompts),):
        raise ValueError(f"{what} returned {arr.shape[0]} scores for {len(prompts)} prompts; it must return one each")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what} returned a non-finite score ({arr[i]}) for prompt {prompts[i]!r}; scores must be finite"
        )
    return arr
