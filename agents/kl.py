"""The KL leash of RLHF, for every SB3 on-policy algorithm: reward - β·KL(π‖π_ref).

:class:`KLPenalty` is a callback that subtracts ``β·(log π(a_t|s_t) − log π_ref(a_t|s_t))`` from every step's reward
in the rollout buffer *before* SB3 computes returns and advantages from them. Every algorithm therefore optimises
the same per-token-penalised return, exactly as in Ziegler et al. (2019) and InstructGPT, without any change to the
algorithm.

``log π(a_t|s_t)`` is what the policy stored while sampling (``rollout_buffer.log_probs``). ``log π_ref`` is computed
once the rollout is complete, in batched passes over its episodes (each episode's steps read off one forward pass of
its longest observation, the prompt prefix shared) rather than by a reference decode step beside every policy step:
SB3 calls ``rollout_buffer.compute_returns_and_advantage`` right after its last step, and the callback runs the
pass at that call (a hook it sets on the buffer at each rollout's start), then lets the buffer go on. Every
on-policy algorithm of SB3 and sb3-contrib (PPO, A2C, TRPO, MaskablePPO, RecurrentPPO) fills one such buffer.

With ``scale_rewards``, the episodes' rewards are first divided by their spread so far (:class:`RewardScale`), so
that β means the same for a gold scorer as for a normalised reward model.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.cached_lm import reference_log_probs

__all__ = ["DEFAULT_BETA", "KLController", "KLPenalty", "RewardScale"]

DEFAULT_BETA = 0.1
"""β of ``textgen train`` and of these classes unless told otherwise, per unit of a normalised reward model (base
samples score mean 0, std 1). Chosen over 3 seeds of ``textgen train`` (benchmarks/results/textgen_train_seeds.md):
0.05 gained a little more gold but drifted up to 13.8 nats from the base model and lost diversity on one seed;
re-checked against 0.12 with the blocks 1 + 20 reward model (no better on the worst seed)."""


class KLController:
    """β, fixed or adaptive. Adaptive is Ziegler et al.'s proportional controller toward a target KL.

    :param beta: initial KL coefficient.
    :param target: target KL per episode in nats (``None``: β stays fixed).
    :param horizon: episodes over which β may change by a factor of e (the controller's time constant).
    """

    def __init__(self, beta: float = DEFAULT_BETA, target: float | None = None, horizon: int = 10_000) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_episodes: int) -> float:
        """Move β after a rollout whose mean per-episode KL was ``kl`` over ``n_episodes``; return the new β."""
        if self.target is not None and n_episodes > 0:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + error * n_episodes / self.horizon
        return self.beta


class RewardScale:
    """The spread of the recent episodes' rewards, by which they are divided before the KL penalty.

    β is per unit of a normalised reward (:data:`DEFAULT_BETA`). ``train-rm`` scales a learned reward model once, so
    that the base policy's samples score std 1; a gold scorer (ROUGE-L, chrF, tests passed) is not scaled, and its
    spread of ~0.1 against β = 0.1 per nat kept the dialogue and summarize-docstring policies within 0.5 nats of the
    base model, gold unchanged (benchmarks/results/tasks.md). Dividing every reward by its spread so far (as SB3's
    ``VecNormalize`` and TRL's ``use_score_scaling`` do) puts any scorer on that scale; the first rollout's rewards,
    the base policy's samples, set it first, as they set a reward model's.

    The spread is a *winsorised* std: the std of the last ``window`` episode rewards after clipping them to their
    ``trim`` and ``1 - trim`` quantiles. A plain std is set by a scorer's rare penalties: 2.6 % of the base model's
    dialogue replies are echoes or empty and score near −1 while the rest spread 0.068 chrF, so the std (0.175) made
    an ordinary reply's advantage 2.6 times smaller against β than a reward model's; winsorised, 0.061. A reward
    with two values (tests all pass or all fail) keeps its std: the quantiles are its two values.

    :param min_std: the divisor's floor, so that a reward that has hardly varied yet (every test failed) is not
        blown up by a tiny spread.
    :param window: how many of the latest episode rewards the spread is measured on (1024: 64 rollouts of 16
        episodes; ``textgen train``'s default run has 20).
    :param trim: the quantile, on each side, beyond which rewards are clipped before their std is taken.
    """

    def __init__(self, min_std: float = 0.01, window: int = 1024, trim: float = 0.05) -> None:
        if min_std <= 0 or window < 2 or not 0 <= trim < 0.5:
            raise ValueError(f"need min_std > 0, window >= 2 and 0 <= trim < 0.5; got {min_std}, {window}, {trim}")
        self.min_std, self.trim = min_std, trim
        self.recent: deque[float] = deque(maxlen=window)

    @property
    def scale(self) -> float:
        """The current divisor: the recent rewards' winsorised std (at least ``min_std``); 1 before any reward."""
        if not self.recent:
            return 1.0
        rewards = np.asarray(self.recent, dtype=np.float64)
        low, high = np.quantile(rewards, [self.trim, 1.0 - self.trim])
        return max(float(np.clip(rewards, low, high).std()), self.min_std)

    def update(self, rewards: np.ndarray | list[float]) -> float:
        """Add a batch of episode rewards to the window; return the divisor that now applies."""
        self.recent.extend(np.asarray(rewards, dtype=np.float64).reshape(-1).tolist())
        return self.scale

    def state(self) -> dict[str, list[float]]:
        """The window of rewards, to save with a run (a resumed run divides as the uninterrupted one would)."""
        return {"recent": list(self.recent)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned. A checkpoint written before the window (it kept a running mean,
        variance and count) is resumed from two rewards with that mean and std."""
        self.recent.clear()
        if "recent" in state:
            self.recent.extend(float(r) for r in state["recent"])
        elif state.get("count", 0) >= 1:
            std = float(np.sqrt(state["var"]))
            self.recent.extend([float(state["mean"]) - std, float(state["mean"]) + std])


class KLPenalty(BaseCallback):
    """Per-token KL penalty in the rewards of each rollout, with logging of KL and β every rollout.

    :param beta: the KL coefficient (initial value when adaptive).
    :param target_kl: nats per episode that an adaptive β steers toward (Ziegler et al.); ``None``: β stays fixed.
    :param horizon: the adaptive controller's horizon, in episodes.
    :param reference: where ``log π_ref`` comes from: a model name/directory loads that LM; ``None`` uses the
        policy's own frozen reference (``CausalLMPolicy.reference_log_prob``) or, for policies without an LM
        prior (``MultiInputPolicy`` baselines), the env's LM, so that all methods are leashed to the same one.
    :param envs_per_pass: episodes of this many envs (all their steps in the rollout) go through the reference
        together; ``None`` (the default): all envs in one pass. Fewer bound the pass's memory (its logits are
        about ``envs_per_pass * n_steps * V`` bf16 values, 50 MB for 16 x 32 steps of SmolLM2) but cost time: each
        pass encodes the shared prompt prefix again and runs smaller matmuls (on SmolLM2, 16 envs x 32 steps at
        one thread: 1.2 s in one pass, 1.8 s in 4).
    :param scale_rewards: divide each episode's reward by the spread of the episode rewards so far
        (:class:`RewardScale`) before the penalty, for a reward not already normalised like a learned reward model.
    """

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        target_kl: float | None = None,
        horizon: int = 10_000,
        reference: str | None = None,
        envs_per_pass: int | None = None,
        scale_rewards: bool = False,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if envs_per_pass is not None and envs_per_pass < 1:
            raise ValueError(f"envs_per_pass must be >= 1 (or None: all envs), got {envs_per_pass}")
        self.controller = KLController(beta, target_kl, horizon)
        self.reward_scale = RewardScale() if scale_rewards else None
        self._scored: list[tuple[int, int, float]] = []  # (buffer row, env, reward) of each episode ended this rollout
        self.reference = reference
        self.envs_per_pass = envs_per_pass
        self._reference_lm: Any = None  # log π_ref of the named reference LM, when there is one
        self._pending = False  # a rollout is being collected: its rewards are not penalised yet
        self._kl_sum = 0.0
        self._tokens = 0
        self._episodes = 0

    def _on_training_start(self) -> None:
        if self.reference is None and not hasattr(self.model.policy, "reference_log_prob"):
            try:  # a policy without an LM prior: leash it to the LM of the env it acts in
                self.reference = self.training_env.get_attr("model_name")[0]
            except AttributeError:
                raise TypeError(
                    f"{type(self.model.policy).__name__} has no reference model and the env names no LM: pass "
                    "KLPenalty(reference='default') (or the model the env was built on)"
                ) from None
        if self.reference is not None:
            self._reference_lm = reference_log_probs(self.reference, self.model.device, cached=False)

    def reference_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """``log π_ref(a|s)`` ``(B,)`` of a batch of steps of whole episodes (any order), in one pass per episode."""
        if self._reference_lm is None:
            return self.model.policy.reference_log_prob(obs, actions, cached=False)
        return self._reference_lm(obs, actions)

    def _on_rollout_start(self) -> None:
        buffer = self.model.rollout_buffer
        compute = type(buffer).compute_returns_and_advantage  # the class's own: never wrap a wrapper

        def penalise_then_compute(*args: Any, **kwargs: Any) -> None:
            if self._pending:
                self.penalise(buffer)
            compute(buffer, *args, **kwargs)

        buffer.compute_returns_and_advantage = penalise_then_compute  # type: ignore[method-assign]
        self._pending = True
        self._scored = []

    def penalise(self, buffer: Any) -> np.ndarray:
        """Subtract ``β·(log π − log π_ref)`` from every step's reward in a full rollout buffer, in place (the
        episodes' rewards first divided by :class:`RewardScale`'s divisor, with ``scale_rewards``).

        :param buffer: an SB3 rollout buffer before ``compute_returns_and_advantage`` (arrays ``(n_steps, n_envs,
            ...)``; observations ``input_ids`` / ``attention_mask`` of ``(n_steps, n_envs, L)``).
        :return: the per-token KL estimates ``(n_steps, n_envs)``.
        """
        self._pending = False
        release = getattr(self.model.policy, "release_rollout_cache", None)
        if release is not None:  # SB3 has taken the rollout's last step and bootstrap values
            release()
        if self.reward_scale is not None and self._scored:
            self._scale_rewards(buffer)
        n_steps, n_envs = buffer.rewards.shape
        kl = np.zeros((n_steps, n_envs), dtype=np.float32)
        step = n_envs if self.envs_per_pass is None else self.envs_per_pass
        for first in range(0, n_envs, step):
            envs = slice(first, min(n_envs, first + step))  # all steps of these envs: whole episodes
            obs = {
                key: torch.as_tensor(buffer.observations[key][:, envs]).reshape(-1, buffer.observations[key].shape[-1])
                for key in ("input_ids", "attention_mask")
            }  # (n_steps * e, L)
            actions = torch.as_tensor(buffer.actions[:, envs]).reshape(-1).long()  # (n_steps * e,)
            obs = {k: v.to(self.model.device) for k, v in obs.items()}
            log_ref = self.reference_log_prob(obs, actions.to(self.model.device)).float().cpu().numpy()
            log_pi = buffer.log_probs[:, envs].reshape(-1)  # what the policy stored while sampling
            kl[:, envs] = (log_pi - log_ref).reshape(n_steps, -1)  # unbiased per-token estimate of KL(π‖π_ref)
        buffer.rewards -= (self.controller.beta * kl).astype(buffer.rewards.dtype)
        self._kl_sum += float(kl.sum())
        self._tokens += kl.size
        return kl

    def _scale_rewards(self, buffer: Any) -> None:
        """Divide this rollout's episode rewards by :class:`RewardScale`'s divisor, updated with them first.

        Only the rewards the env paid are divided: a truncated episode's row may also hold SB3's bootstrap value,
        which is already in the scaled units the value head learns.
        """
        assert self.reward_scale is not None
        rows, envs, paid = (np.array(column) for column in zip(*self._scored, strict=True))
        scale = self.reward_scale.update(paid)
        buffer.rewards[rows.astype(int), envs.astype(int)] += (paid / scale - paid).astype(buffer.rewards.dtype)
        self.logger.record("rlhf/reward_scale", scale)

    def _on_step(self) -> bool:
        dones = np.asarray(self.locals["dones"])
        self._episodes += int(np.sum(dones))
        if self.reward_scale is not None:  # the env pays an episode's reward with its last step
            row, rewards = self.model.rollout_buffer.pos, np.asarray(self.locals["rewards"])  # the row it will fill
            self._scored.extend((row, int(i), float(rewards[i])) for i in np.flatnonzero(dones))
        return True

    def _on_rollout_end(self) -> None:
        if self._tokens == 0:
            return
        kl_token = self._kl_sum / self._tokens
        kl_episode = self._kl_sum / max(1, self._episodes)
        self.logger.record("rlhf/kl_per_token", kl_token)
        self.logger.record("rlhf/kl_per_episode", kl_episode)
        self.logger.record("rlhf/beta", self.controller.beta)
        self.controller.update(kl_episode, self._episodes)
        self._kl_sum, self._tokens, self._episodes = 0.0, 0, 0

    def _on_training_end(self) -> None:
        self._pending = False
        self.model.rollout_buffer.__dict__.pop("compute_returns_and_advantage", None)  # the class's own again

    def state(self) -> dict[str, Any]:
        """β and the controller settings (and the reward scale's statistics, when it scales), to save with a run."""
        state = {"beta": self.controller.beta, "target": self.controller.target, "horizon": self.controller.horizon}
        return state if self.reward_scale is None else {**state, "reward_scale": self.reward_scale.state()}
