"""Evaluate a policy on held-out prompts: reward-model and gold score, KL to the reference, diversity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import obs_as_tensor

from text_env.vec_env import TextGenVecEnv

__all__ = ["Evaluation", "distinct_n", "evaluate"]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams in ``texts`` (1.0: no repetition; low: degenerate)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Evaluation:
    """Per-prompt results and their summary."""

    prompts: list[str]
    completions: list[str]
    reward_model_score: np.ndarray
    gold_score: np.ndarray
    kl: np.ndarray  # per completion: sum over its tokens of log π - log π_ref
    summary: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    policy: BasePolicy, env: TextGenVecEnv, prompts: Sequence[str], deterministic: bool = False, seed: int = 0
) -> Evaluation:
    """Run one episode per prompt in ``env`` (batches of ``env.num_envs``) with ``policy``.

    The episodes are the env's own (same MDP, reward and termination as training). KL uses the policy's
    ``reference_log_prob`` when it has one (0 otherwise).
    """
    torch.manual_seed(seed)
    policy.set_training_mode(False)
    n = env.num_envs
    completions, rm, gold, kl = [], [], [], []
    for start in range(0, len(prompts), n):
        chunk = list(prompts[start : start + n])
        env.set_options([{"prompt": chunk[i % len(chunk)]} for i in range(n)])
        obs = env.reset()
        live = np.ones(n, dtype=bool)
        results: list[dict | None] = [None] * n
        kl_sum = np.zeros(n)
        while live.any():
            obs_t = obs_as_tensor(obs, policy.device)
            actions, _, log_pi = policy(obs_t, deterministic=deterministic)
            if hasattr(policy, "reference_log_prob"):
                kl_sum += live * (log_pi - policy.reference_log_prob(obs_t, actions)).cpu().numpy()
            obs, _, dones, infos = env.step(actions.cpu().numpy())
            for i in np.flatnonzero(dones & live):
                results[i], live[i] = infos[i], False
        for i in range(len(chunk)):
            info = results[i]
            assert info is not None
            completions.append(info["completion"])
            rm.append(info["reward_model_score"])
            gold.append(info["gold_score"])
            kl.append(kl_sum[i])
    result = Evaluation(list(prompts), completions, np.array(rm), np.array(gold), np.array(kl))
    result.summary = {
        "reward_model_score": float(result.reward_model_score.mean()),
        "gold_score": float(result.gold_score.mean()),
        "kl": float(result.kl.mean()),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
    }
    return result
