"""Rollout buffers whose minibatches keep an episode's steps together.

Stock SB3 shuffles single steps, so a minibatch of an LM policy holds one or two tokens of each of many
episodes and every token costs a forward pass over its whole prefix: O(T^2) per episode. Shuffling *episodes*
instead (and the steps within a minibatch staying in order) lets ``evaluate_actions`` share one pass per episode.
Pass one to any on-policy SB3 algorithm: ``PPO(..., rollout_buffer_class=EpisodeRolloutBuffer)``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from stable_baselines3.common.buffers import DictRolloutBuffer

__all__ = ["EpisodeRolloutBuffer", "MaskableEpisodeRolloutBuffer", "episode_order"]


def episode_order(episode_starts: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A permutation of the flattened (env-major) buffer indices that shuffles whole episode segments.

    :param episode_starts: ``(n_steps, n_envs)``, 1 where a step begins an episode.
    :return: ``(n_steps * n_envs,)`` indices; each episode segment (cut also at rollout edges) is contiguous.
    """
    n_steps, n_envs = episode_starts.shape
    starts = episode_starts.T.reshape(-1).astype(bool).copy()  # env-major, as swap_and_flatten lays it out
    starts[::n_steps] = True  # each env's rollout begins a segment
    segments = np.split(np.arange(n_steps * n_envs), np.flatnonzero(starts)[1:])
    rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
    return np.concatenate([segments[i] for i in rng.permutation(len(segments))])


class _EpisodeBatches:
    """Mixin: the parent's ``get`` with an episode-grouped permutation instead of ``np.random.permutation``."""

    _tensor_names: tuple[str, ...] = ("actions", "values", "log_probs", "advantages", "returns")

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        assert self.full, "the buffer must be full before sampling"  # type: ignore[attr-defined]
        indices = episode_order(self.episode_starts)  # type: ignore[attr-defined]
        if not self.generator_ready:  # type: ignore[has-type]
            for key, obs in self.observations.items():  # type: ignore[has-type]
                self.observations[key] = self.swap_and_flatten(obs)  # type: ignore[attr-defined]
            for name in self._tensor_names:
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])  # type: ignore[attr-defined]
            self.generator_ready = True
        total = self.buffer_size * self.n_envs  # type: ignore[attr-defined]
        batch_size = batch_size or total
        for start in range(0, total, batch_size):
            yield self._get_samples(indices[start : start + batch_size])  # type: ignore[attr-defined]


class EpisodeRolloutBuffer(_EpisodeBatches, DictRolloutBuffer):
    """``DictRolloutBuffer`` with episode-grouped minibatches (for PPO, A2C, TRPO)."""


class MaskableEpisodeRolloutBuffer(_EpisodeBatches, MaskableDictRolloutBuffer):
    """``MaskableDictRolloutBuffer`` with episode-grouped minibatches (for MaskablePPO)."""

    _tensor_names = (*_EpisodeBatches._tensor_names, "action_masks")
