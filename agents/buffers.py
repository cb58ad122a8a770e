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

__all__ = ["EpisodeRolloutBuffer", "MaskableEpisodeRolloutBuffer", "cut_segments", "episode_batches", "episode_order"]


def _shuffled_segments(episode_starts: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
    """The flattened (env-major) indices of each episode segment, segments in random order."""
    n_steps, n_envs = episode_starts.shape
    starts = episode_starts.T.reshape(-1).astype(bool).copy()  # env-major, as swap_and_flatten lays it out
    starts[::n_steps] = True  # each env's rollout begins a segment
    segments = np.split(np.arange(n_steps * n_envs), np.flatnonzero(starts)[1:])
    rng = rng if rng is not None else np.random.default_rng(np.random.randint(2**31))
    return [segments[i] for i in rng.permutation(len(segments))]


def episode_order(episode_starts: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A permutation of the flattened (env-major) buffer indices that shuffles whole episode segments.

    :param episode_starts: ``(n_steps, n_envs)``, 1 where a step begins an episode.
    :return: ``(n_steps * n_envs,)`` indices; each episode segment (cut also at rollout edges) is contiguous.
    """
    return np.concatenate(_shuffled_segments(episode_starts, rng))


def episode_batches(
    episode_starts: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Minibatches of whole episode segments, in random order, of about ``batch_size`` steps each.

    The shuffled order of :func:`episode_order` is cut by :func:`cut_segments`, never inside a segment (that would
    cost the episode a second forward pass).
    """
    return cut_segments(_shuffled_segments(episode_starts, rng), batch_size)


def cut_segments(segments: list[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Minibatches of about ``batch_size`` indices from ``segments`` (index arrays, in the order given): their
    concatenation cut at the segment boundary nearest to each multiple of ``batch_size``. Sizes vary by about half a
    segment, and there are as many minibatches as fixed-size ones would give (fewer when segments are long compared
    with ``batch_size``). The RLlib Learner cuts its episodes with it too, so both engines step alike."""
    order = np.concatenate(segments)
    ends = np.cumsum([len(s) for s in segments])  # (S,) segment boundaries along the order
    targets = np.arange(batch_size, len(order), batch_size)  # where fixed-size minibatches would be cut
    nearest = ends[np.abs(ends[None, :] - targets[:, None]).argmin(1)]  # (T,) the closest boundary to each
    return np.split(order, np.unique(nearest[nearest < len(order)]))


class _EpisodeBatches:
    """Mixin: the parent's ``get`` with minibatches of whole episode segments instead of random steps, and optionally
    advantages normalised once over the whole rollout.

    :param normalize_advantage: normalise the advantages to mean 0, std 1 over the rollout right after they are
        computed; give the algorithm ``normalize_advantage=False`` then. A minibatch of whole episodes holds few of
        them (128 tokens: 4 episodes of 32), so SB3's per-minibatch normalisation takes its mean and std from 4
        correlated episodes, and an episode's advantage depends on which others share its minibatch.
    """

    _tensor_names: tuple[str, ...] = ("actions", "values", "log_probs", "advantages", "returns")

    def __init__(self, *args: Any, normalize_advantage: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.normalize_advantage = normalize_advantage

    def compute_returns_and_advantage(self, last_values: Any, dones: np.ndarray) -> None:
        super().compute_returns_and_advantage(last_values, dones)  # type: ignore[misc]
        if self.normalize_advantage:
            advantages = self.advantages  # type: ignore[has-type]  # (n_steps, n_envs)
            self.advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    def get(self, batch_size: int | None = None) -> Generator[Any, None, None]:
        assert self.full, "the buffer must be full before sampling"  # type: ignore[attr-defined]
        if not self.generator_ready:  # type: ignore[has-type]
            for key, obs in self.observations.items():  # type: ignore[has-type]
                self.observations[key] = self.swap_and_flatten(obs)  # type: ignore[attr-defined]
            for name in self._tensor_names:
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])  # type: ignore[attr-defined]
            self.generator_ready = True
        total = self.buffer_size * self.n_envs  # type: ignore[attr-defined]
        for indices in episode_batches(self.episode_starts, batch_size or total):  # type: ignore[attr-defined]
            yield self._get_samples(indices)  # type: ignore[attr-defined]


class EpisodeRolloutBuffer(_EpisodeBatches, DictRolloutBuffer):
    """``DictRolloutBuffer`` with episode-grouped minibatches (for PPO, A2C, TRPO)."""


class MaskableEpisodeRolloutBuffer(_EpisodeBatches, MaskableDictRolloutBuffer):
    """``MaskableDictRolloutBuffer`` with episode-grouped minibatches (for MaskablePPO)."""

    _tensor_names = (*_EpisodeBatches._tensor_names, "action_masks")
