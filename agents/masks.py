"""NLPO-style action masks: restrict the policy to the reference LM's most likely next tokens.

A token-level action space has tens of thousands of actions, nearly all of them nonsense in any given context.
NLPO (Ramamurthy et al., 2022, "Is Reinforcement Learning (Not) for Natural Language Processing?") lets
``MaskablePPO`` sample only from the top-p set of a masking LM, which keeps exploration on fluent text and
shrinks the effective action space. :class:`TopPMask` wraps any TextGen ``VecEnv`` so that
``sb3_contrib.MaskablePPO`` finds those masks where it looks for them (``env_method("action_masks")``).

Example:
    >>> from sb3_contrib import MaskablePPO
    >>> from agents import MaskableCausalLMPolicy
    >>> from agents.buffers import MaskableEpisodeRolloutBuffer
    >>> from text_env import make_text_vec_env
    >>> env = TopPMask(make_text_vec_env(8, model="default"), "default", top_p=0.9)
    >>> model = MaskablePPO(MaskableCausalLMPolicy, env, rollout_buffer_class=MaskableEpisodeRolloutBuffer)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
    VecEnvWrapper,
)

from agents.cached_lm import CachedLM
from text_env.models import DEFAULT_BF16, load_frozen_causal_lm

__all__ = ["TopPMask", "top_p_mask"]

_METHOD = "action_masks"  # the name sb3_contrib's get_action_masks calls through env_method


def top_p_mask(logits: torch.Tensor, top_p: float = 0.9, top_k: int = 0) -> torch.Tensor:
    """Boolean mask ``(B, V)`` of the smallest set of tokens whose probability reaches ``top_p`` (nucleus),
    cut to the ``top_k`` most likely if ``top_k > 0``; the most likely token is always kept.

    :param logits: ``(B, V)`` next-token logits.
    """
    order = torch.argsort(logits, dim=-1, descending=True)  # (B, V) token ids, most likely first
    probs = torch.softmax(logits.float().gather(-1, order), dim=-1)  # (B, V) sorted probabilities
    keep = probs.cumsum(-1) - probs < top_p  # (B, V) the mass ahead of a token has not yet reached top_p
    if top_p >= 1.0:
        keep[:] = True  # rounding in the cumulative sum must not drop the tail
    if top_k > 0:
        keep[:, top_k:] = False
    keep[:, 0] = True  # never an empty action set
    return torch.zeros_like(keep).scatter(-1, order, keep)  # (B, V) back in token order


class TopPMask(VecEnvWrapper):
    """Expose ``action_masks()``: the reference LM's top-p (and top-k) tokens for each env's current observation.

    The masking LM is loaded once and run with a KV cache (:class:`~agents.cached_lm.CachedLM`, exact), so a
    rollout step costs one token per env; masks are computed on demand and reused until the next step.

    :param venv: a TextGen ``VecEnv`` (``Dict`` observations with ``input_ids`` and ``attention_mask``).
    :param model: the masking LM: ``"default"``, a local directory or a hub id; ``None``: the env's LM.
    :param top_p: nucleus mass to keep (1.0: every token).
    :param top_k: keep at most this many tokens (0: no limit).
    :param bf16: run the masking LM under bfloat16 autocast (weights stay float32).
    :param device: where the masking LM runs (``"auto"``: CUDA when available).
    """

    def __init__(
        self,
        venv: VecEnv,
        model: str | os.PathLike[str] | None = None,
        top_p: float = 0.9,
        top_k: int = 0,
        bf16: bool = DEFAULT_BF16,
        device: torch.device | str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need 0 < top_p <= 1 and top_k >= 0, got top_p={top_p}, top_k={top_k}")
        super().__init__(venv)
        if model is None:
            model = venv.get_attr("model_name")[0]
        self.model_name = os.fspath(model)
        self.top_p, self.top_k, self.bf16 = top_p, top_k, bf16
        self.device = get_device(device)
        lm = load_frozen_causal_lm(model, trust_remote_code=trust_remote_code).to(self.device)
        self.n_actions = int(self.action_space.n)  # type: ignore[attr-defined]
        self._lm = CachedLM(lm, self._autocast, autocast_dtype=torch.bfloat16 if bf16 else None)
        self._obs: VecEnvObs | None = None
        self._masks: np.ndarray | None = None

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _remember(self, obs: VecEnvObs) -> None:
        self._obs, self._masks = obs, None

    def reset(self) -> VecEnvObs:
        obs = self.venv.reset()
        self._remember(obs)
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        self._remember(obs)
        return obs, rewards, dones, infos

    @torch.no_grad()
    def masks_for(self, obs: VecEnvObs) -> np.ndarray:
        """The ``(n, V)`` boolean masks for a batch of observations (``Dict`` of ``(n, L)`` arrays)."""
        assert isinstance(obs, dict), "TopPMask needs Dict observations with input_ids and attention_mask"
        ids = torch.as_tensor(obs["input_ids"], device=self.device)  # (n, L)
        mask = torch.as_tensor(obs["attention_mask"], device=self.device)  # (n, L)
        logits = self._lm(ids, mask)[0][:, : self.n_actions]  # (n, V)
        return top_p_mask(logits, self.top_p, self.top_k).cpu().numpy()

    def action_masks(self) -> np.ndarray:
        """``(n_envs, V)`` boolean masks of the current observations (those of the latest reset or step)."""
        if self._obs is None:
            raise RuntimeError("call reset() before asking for action masks")
        if self._masks is None:
            self._masks = self.masks_for(self._obs)
        return self._masks

    def has_attr(self, attr_name: str) -> bool:
        return attr_name == _METHOD or self.venv.has_attr(attr_name)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        if method_name == _METHOD:
            masks = self.action_masks()
            return [masks[i] for i in self._get_indices(indices)]
        return self.venv.env_method(method_name, *method_args, indices=indices, **method_kwargs)
