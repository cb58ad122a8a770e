"""The KL leash of RLHF, for every SB3 on-policy algorithm: reward - β·KL(π‖π_ref).

:class:`KLPenalty` is a callback that, at every rollout step, subtracts ``β·(log π(a_t|s_t) − log π_ref(a_t|s_t))``
from that step's reward *before* SB3 stores it in the rollout buffer (SB3 calls ``on_step`` between
``env.step`` and ``rollout_buffer.add``, and the callback edits the same ``rewards`` array in place). Every
algorithm therefore optimises the same per-token-penalised return, exactly as in Ziegler et al. (2019) and
InstructGPT, without any change to the algorithm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.cached_lm import reference_log_probs

__all__ = ["DEFAULT_BETA", "KLController", "KLPenalty"]

DEFAULT_BETA = 0.1
"""β of ``textgen train`` and of these classes unless told otherwise, per unit of a normalised reward model (base
samples score mean 0, std 1). Chosen over 3 seeds of ``textgen train`` (benchmarks/results/textgen_train_seeds.md):
0.05 gained a little more gold but drifted up to 13.8 nats from the base model and lost diversity on one seed."""


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


class KLPenalty(BaseCallback):
    """Per-token KL penalty in the reward, with logging of KL and β every rollout.

    :param beta: the KL coefficient (initial value when adaptive).
    :param target_kl: nats per episode that an adaptive β steers toward (Ziegler et al.); ``None``: β stays fixed.
    :param horizon: the adaptive controller's horizon, in episodes.
    :param reference: where ``log π_ref`` comes from: a model name/directory loads that LM; ``None`` uses the
        policy's own frozen reference (``CausalLMPolicy.reference_log_prob``) or, for policies without an LM
        prior (``MultiInputPolicy`` baselines), the env's LM, so that all methods are leashed to the same one.
    """

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        target_kl: float | None = None,
        horizon: int = 10_000,
        reference: str | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.controller = KLController(beta, target_kl, horizon)
        self.reference = reference
        self._reference_lm: Any = None  # log π_ref of the named reference LM, when there is one
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
            self._reference_lm = reference_log_probs(self.reference, self.model.device)

    def reference_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """``log π_ref(a|s)``, shape ``(n_envs,)``."""
        if self._reference_lm is None:
            return self.model.policy.reference_log_prob(obs, actions)
        return self._reference_lm(obs, actions)

    def _on_step(self) -> bool:
        obs, actions = self.locals["obs_tensor"], torch.as_tensor(self.locals["actions"]).reshape(-1)
        log_pi = self.locals["log_probs"].detach().reshape(-1).float().cpu()
        log_ref = self.reference_log_prob(obs, actions.to(self.model.device)).float().cpu()
        kl = (log_pi - log_ref).numpy()  # (n_envs,) unbiased per-token estimate of KL(π‖π_ref)
        rewards: np.ndarray = self.locals["rewards"]
        rewards -= (self.controller.beta * kl).astype(rewards.dtype)  # in place: this array goes to the buffer
        self._kl_sum += float(kl.sum())
        self._tokens += kl.size
        self._episodes += int(np.sum(self.locals["dones"]))
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

    def state(self) -> dict[str, Any]:
        """β and the controller settings, to save with a run."""
        return {"beta": self.controller.beta, "target": self.controller.target, "horizon": self.controller.horizon}
