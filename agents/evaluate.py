"""Evaluate any policy on held-out prompts: reward-model and gold score, KL to the reference, diversity, perplexity.

One episode per prompt in the env itself (same MDP, reward and termination as training), so every method of a
benchmark is measured the same way: LM policies, SB3 baselines without an LM prior (recurrent ones included),
and plain callables such as uniform random tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from agents.cached_lm import reference_log_probs
from agents.constraints import episode_quantities
from agents.policies import CausalLMPolicy
from text_env.models import DEFAULT_BF16
from text_env.prompts import Example, as_example
from text_env.tasks import get_task
from text_env.vec_env import make_text_vec_env

__all__ = ["Evaluation", "distinct_n", "evaluate", "evaluate_base_model"]

# A policy given as a function: observations -> (actions (n,), log-probabilities of those actions (n,)).
Sampler = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams in ``texts`` (1.0: no repetition; low: degenerate)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Evaluation:
    """Per-prompt results; :attr:`summary` aggregates them."""

    prompts: list[str]
    completions: list[str]
    reward_model_score: np.ndarray
    gold_score: np.ndarray
    kl: np.ndarray  # per completion: sum over its tokens of log π - log π_ref
    reference_log_prob: np.ndarray  # per completion: sum over its tokens of log π_ref
    n_tokens: np.ndarray  # per completion: tokens generated (EOS included)
    # per completion: what a constraint may bound (agents.constraints.episode_quantities and a composite reward's
    # components), so that a run's bounds are also measured on its final policy
    quantities: list[dict[str, float]] = field(default_factory=list)

    def select(self, index: Sequence[int]) -> Evaluation:
        """The rows at ``index`` (e.g. the best of several samples per prompt)."""
        idx = np.asarray(index, dtype=np.int64)
        return Evaluation(
            [self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.reward_model_score[idx],
            self.gold_score[idx], self.kl[idx], self.reference_log_prob[idx], self.n_tokens[idx],
            [self.quantities[i] for i in idx] if self.quantities else [],
        )  # fmt: skip

    @property
    def summary(self) -> dict[str, float]:
        """Means over prompts; ``perplexity`` is the reference model's, over all completion tokens (fluency)."""
        return {
            "reward_model_score": float(self.reward_model_score.mean()),
            "gold_score": float(self.gold_score.mean()),
            "kl": float(self.kl.mean()),
            "distinct_1": distinct_n(self.completions, 1),
            "distinct_2": distinct_n(self.completions, 2),
            "perplexity": float(np.exp(-self.reference_log_prob.sum() / max(1, self.n_tokens.sum()))),
            "length": float(self.n_tokens.mean()),
        }


class _Stepper:
    """One batched decision for whatever kind of policy: actions and their log-probabilities."""

    def __init__(self, policy: BasePolicy | Sampler, env: VecEnv, deterministic: bool) -> None:
        self.policy, self.env, self.deterministic = policy, env, deterministic
        self.recurrent = isinstance(policy, RecurrentActorCriticPolicy)
        self.maskable = isinstance(policy, MaskableActorCriticPolicy)
        self.state: Any = None

    def reset(self) -> None:
        if self.recurrent:
            from sb3_contrib.common.recurrent.type_aliases import RNNStates

            layers, _, hidden = self.policy.lstm_hidden_state_shape
            zeros = torch.zeros(layers, self.env.num_envs, hidden, device=self.policy.device)
            self.state = RNNStates((zeros, zeros.clone()), (zeros.clone(), zeros.clone()))
        self.starts = torch.ones(self.env.num_envs, device=getattr(self.policy, "device", "cpu"))

    def __call__(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.policy, BasePolicy):
            return self.policy(obs)
        if self.recurrent:
            actions, _, log_pi, self.state = self.policy(obs, self.state, self.starts, self.deterministic)
            self.starts = torch.zeros_like(self.starts)
        elif self.maskable:  # NLPO: evaluate with the same action masks as training
            masks = self.env.action_masks()  # type: ignore[attr-defined]
            actions, _, log_pi = self.policy(obs, deterministic=self.deterministic, action_masks=masks)
        else:
            actions, _, log_pi = self.policy(obs, deterministic=self.deterministic)
        return actions.reshape(-1), log_pi.reshape(-1)


@torch.no_grad()
def evaluate(
    policy: BasePolicy | Sampler,
    env: VecEnv | gym.Env,
    prompts: Sequence[str | Example],
    deterministic: bool = False,
    seed: int = 0,
    reference: str | os.PathLike[str] | None = None,
) -> Evaluation:
    """Run one episode per prompt in ``env`` (batches of ``env.num_envs``) with ``policy``.

    :param prompts: strings or example records (``task.examples("eval")``: their references reach the scorers).
    :param env: a TextGen ``VecEnv``, or a single env (``gym.make("TextGen-v0", ...)``), which is wrapped in a
        ``DummyVecEnv`` as SB3's ``evaluate_policy`` does.

    :param policy: an SB3 policy (``algo.policy``: LM, maskable — then ``env`` must give ``action_masks()`` —,
        recurrent, or any ``ActorCriticPolicy``), or a function ``obs -> (actions, log_probs)``.
    :param reference: the LM that KL and perplexity are measured against. ``None``: the policy's own frozen
        reference when it has one (LM policies; no extra copy), else the env's model.
    """
    torch.manual_seed(seed)
    if not isinstance(env, VecEnv):
        env = DummyVecEnv([lambda single=env: single])  # type: ignore[misc]
    if isinstance(policy, BasePolicy):
        policy.set_training_mode(False)
    device = getattr(policy, "device", torch.device("cpu"))
    if reference is None and hasattr(policy, "reference_log_prob"):
        reference_log_prob = policy.reference_log_prob
    else:
        reference_log_prob = reference_log_probs(os.fspath(reference or env.get_attr("model_name")[0]), device)

    step = _Stepper(policy, env, deterministic)
    n = env.num_envs
    completions: list[str] = []
    rm, gold, kl, ref_sum, n_tokens, quantities = [], [], [], [], [], []
    for start in range(0, len(prompts), n):
        chunk = list(prompts[start : start + n])
        env.set_options([{"prompt": chunk[i % len(chunk)]} for i in range(n)])
        obs = env.reset()
        step.reset()
        live = np.ones(n, dtype=bool)
        results: list[dict | None] = [None] * n
        steps: list[list[np.ndarray]] = []  # per step: log π, log π_ref and the token of every env
        lengths = np.zeros(n, dtype=np.int64)
        while live.any():
            lengths += live
            obs_t = obs_as_tensor(obs, device)
            actions, log_pi = step(obs_t)  # type: ignore[arg-type]
            log_ref = reference_log_prob(obs_t, actions)  # type: ignore[arg-type]
            steps.append([x.double().cpu().numpy() for x in (log_pi, log_ref)] + [actions.cpu().numpy()])
            obs, _, dones, infos = env.step(steps[-1][2])
            for i in np.flatnonzero(dones & live):
                results[i], live[i] = infos[i], False
        for i in range(len(chunk)):
            info = results[i]
            assert info is not None
            log_pi_i, log_ref_i, tokens = (np.array([s[k][i] for s in steps[: lengths[i]]]) for k in range(3))
            completions.append(info["completion"])
            rm.append(info["reward_model_score"])
            gold.append(info["gold_score"])
            kl.append(float(log_pi_i.sum() - log_ref_i.sum()))
            ref_sum.append(float(log_ref_i.sum()))
            n_tokens.append(len(tokens))
            measured = episode_quantities(log_pi_i - log_ref_i, log_ref_i, tokens.tolist())
            quantities.append({**measured, **info.get("reward_components", {})})
    release = getattr(policy, "release_caches", None)
    if release is not None:  # the evaluation's keys/values would otherwise sit in the heap through the next rollout
        release()
    texts = [as_example(p).prompt for p in prompts]
    return Evaluation(
        texts, completions, np.array(rm), np.array(gold), np.array(kl), np.array(ref_sum), np.array(n_tokens),
        quantities,
    )  # fmt: skip


def evaluate_base_model(
    task: str,
    model: str = "default",
    n_prompts: int = 32,
    split: str = "eval",
    seed: int = 0,
    n_envs: int = 16,
    bf16: bool = DEFAULT_BF16,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> Evaluation:
    """An untrained ``model`` on the first ``n_prompts`` examples of ``task``'s ``split``, sampled as training
    samples (temperature 1) in the task's own env, and judged by its gold: how much room a task leaves to improve
    (``textgen tasks --measure``, ``benchmarks/tasks.py``)."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    built = get_task(task)
    examples = built.examples(split)[:n_prompts]
    env = make_text_vec_env(
        min(n_envs, len(examples)), seed=seed, model=model, task=built, split=split, reward_model="gold",
        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
    )  # fmt: skip
    try:
        policy = CausalLMPolicy(env.observation_space, env.action_space, lambda _: 0.0, model=model, bf16=bf16)
        return evaluate(policy, env, examples, seed=seed)
    finally:
        env.close()
