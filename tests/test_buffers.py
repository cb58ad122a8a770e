"""Episode-grouped rollout buffers: whole episode segments, in order, with every field still aligned."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces

from agents.buffers import EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer, episode_batches, episode_order

N_STEPS, N_ENVS, L, V = 8, 3, 5, 128


def segments_of(episode_starts: np.ndarray) -> list[list[int]]:
    """Expected segments as flattened env-major indices (``env * n_steps + step``), cut at starts and rollout edges."""
    n_steps, n_envs = episode_starts.shape
    segments = []
    for env in range(n_envs):
        current: list[int] = []
        for step in range(n_steps):
            if current and episode_starts[step, env]:
                segments.append(current)
                current = []
            current.append(env * n_steps + step)
        segments.append(current)
    return segments


def assert_contiguous_segments(order: np.ndarray, segments: list[list[int]]) -> None:
    """``order`` holds each segment as one run, its steps in time order."""
    position = {int(i): p for p, i in enumerate(order)}
    for segment in segments:
        start = position[segment[0]]
        assert order[start : start + len(segment)].tolist() == segment


EPISODE_STARTS = np.array(  # (n_steps=5, n_envs=3)
    [
        [0, 1, 0],
        [0, 0, 1],
        [1, 0, 1],
        [0, 0, 0],
        [0, 1, 0],
    ]
)


def test_episode_order_hand_example() -> None:
    segments = segments_of(EPISODE_STARTS)
    assert segments == [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9], [10], [11], [12, 13, 14]]
    for seed in range(5):
        order = episode_order(EPISODE_STARTS, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(15))  # a permutation
        assert_contiguous_segments(order, segments)
    orders = {tuple(episode_order(EPISODE_STARTS, np.random.default_rng(seed))) for seed in range(10)}
    assert len(orders) > 1  # the segments are shuffled
    np.random.seed(3)  # without an rng it follows numpy's global seed (SB3's set_random_seed)
    first = episode_order(EPISODE_STARTS)
    np.random.seed(3)
    assert np.array_equal(first, episode_order(EPISODE_STARTS))


@pytest.mark.parametrize("seed", range(4))
def test_episode_order_random_starts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    starts = (rng.random((16, 6)) < 0.2).astype(np.float32)
    order = episode_order(starts, rng)
    assert sorted(order.tolist()) == list(range(96))
    assert_contiguous_segments(order, segments_of(starts))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 15, 64])
def test_episode_batches_keep_segments_whole(batch_size: int) -> None:
    segments = segments_of(EPISODE_STARTS)
    owner = {i: k for k, segment in enumerate(segments) for i in segment}
    batches = episode_batches(EPISODE_STARTS, batch_size, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(15))
    assert_contiguous_segments(flat, segments)
    for batch in batches:
        for k in {owner[int(i)] for i in batch}:
            assert set(segments[k]) <= set(batch.tolist())  # no segment is split between minibatches
    # about batch_size each: never more batches than fixed-size ones; each cut within half a segment of its target
    assert len(batches) <= -(-15 // batch_size)
    if batch_size >= 4:  # the longest segment is 4 steps
        assert len(batches) == -(-15 // batch_size)
        cuts = np.cumsum([len(b) for b in batches])[:-1]
        assert all(abs(cut - batch_size * (k + 1)) <= 2 for k, cut in enumerate(cuts))


def filled_buffer(buffer_class: type, seed: int = 0, **kwargs: Any) -> tuple[Any, np.ndarray]:
    """A full buffer whose every field encodes its ``(env, step)``, with random episode starts (``kwargs``: the
    buffer's own)."""
    observation_space = spaces.Dict(
        {"input_ids": spaces.Box(0, V - 1, (L,), np.int64), "attention_mask": spaces.Box(0, 1, (L,), np.int64)}
    )
    buffer = buffer_class(
        N_STEPS, observation_space, spaces.Discrete(V), gamma=1.0, gae_lambda=1.0, n_envs=N_ENVS, **kwargs
    )
    rng = np.random.default_rng(seed)
    starts = (rng.random((N_STEPS, N_ENVS)) < 0.3).astype(np.float32)
    for step in range(N_STEPS):
        tag = np.arange(N_ENVS) * N_STEPS + step  # (n_envs,) the flattened index of each (env, step)
        ids = np.zeros((N_ENVS, L), dtype=np.int64)
        ids[:, 0] = tag
        obs = {"input_ids": ids, "attention_mask": np.ones((N_ENVS, L), dtype=np.int64)}
        extra = {}
        if buffer_class is MaskableEpisodeRolloutBuffer:
            masks = np.zeros((N_ENVS, V), dtype=bool)
            masks[np.arange(N_ENVS), tag] = True
            extra["action_masks"] = masks
        buffer.add(
            obs, tag.reshape(-1, 1), np.zeros(N_ENVS), starts[step], torch.as_tensor(tag, dtype=torch.float32),
            torch.as_tensor(-tag, dtype=torch.float32), **extra,
        )  # fmt: skip
    buffer.compute_returns_and_advantage(last_values=torch.zeros(N_ENVS), dones=np.zeros(N_ENVS))
    return buffer, starts


@pytest.mark.parametrize("buffer_class", [EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer])
def test_rollout_buffer_minibatches(buffer_class: type) -> None:
    buffer, starts = filled_buffer(buffer_class)
    segments = segments_of(starts)
    owner = {i: k for k, segment in enumerate(segments) for i in segment}
    orders = []
    for _epoch in range(3):  # PPO calls get() once per epoch; the data is flattened only the first time
        seen = []
        for batch in buffer.get(batch_size=6):
            tags = batch.observations["input_ids"][:, 0].long()
            assert torch.equal(batch.actions.flatten().long(), tags)  # every field follows the same permutation
            assert torch.equal(batch.old_values.long(), tags)
            assert torch.equal(batch.old_log_prob.long(), -tags)
            if buffer_class is MaskableEpisodeRolloutBuffer:
                assert torch.equal(batch.action_masks.float().argmax(1), tags)
            members = tags.tolist()
            for k in {owner[t] for t in members}:
                assert set(segments[k]) <= set(members)  # whole segments only
            seen.append(np.array(members))
        order = np.concatenate(seen)
        assert sorted(order.tolist()) == list(range(N_STEPS * N_ENVS))
        assert_contiguous_segments(order, segments)
        orders.append(tuple(order))
    assert len(set(orders)) > 1  # reshuffled every epoch
    (everything,) = list(buffer.get())  # batch_size=None: one batch, as A2C and TRPO's actor step ask
    assert len(everything.actions) == N_STEPS * N_ENVS


def _minibatch_advantages(buffer: EpisodeRolloutBuffer, normalize: bool, seed: int) -> dict[int, float]:
    """Each step's advantage as PPO's loss sees it (SB3 normalises per minibatch when ``normalize``), for one
    shuffle of the episodes into minibatches of 6 steps."""
    np.random.seed(seed)
    seen = {}
    for batch in buffer.get(batch_size=6):
        advantages = batch.advantages
        if normalize and len(advantages) > 1:  # what PPO.train does with normalize_advantage=True
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        seen.update(zip(batch.observations["input_ids"][:, 0].long().tolist(), advantages.tolist(), strict=True))
    return seen


def test_rollout_normalised_advantages_do_not_depend_on_the_minibatch() -> None:
    """``normalize_advantage=True`` on the buffer (``--advantage-normalization rollout``): mean 0, std 1 over the
    whole rollout, once, and an episode's advantage is the same whichever episodes share its minibatch; SB3's
    per-minibatch normalisation (the algorithm's ``normalize_advantage``) gives it a different value per shuffle."""
    buffer, _ = filled_buffer(EpisodeRolloutBuffer)
    raw, returns = buffer.advantages.copy(), buffer.returns.copy()  # (n_steps, n_envs), before get() flattens them
    per_minibatch = [_minibatch_advantages(buffer, True, seed) for seed in range(3)]
    assert any(a[t] != pytest.approx(b[t], abs=1e-4) for a, b in itertools.pairwise(per_minibatch) for t in a)

    normalised, _ = filled_buffer(EpisodeRolloutBuffer, normalize_advantage=True)
    expected = (raw - raw.mean()) / (raw.std() + 1e-8)  # (n_steps, n_envs)
    np.testing.assert_allclose(normalised.advantages, expected, rtol=1e-6)
    assert abs(normalised.advantages.mean()) < 1e-6 and normalised.advantages.std() == pytest.approx(1, rel=1e-6)
    np.testing.assert_allclose(normalised.returns, returns)  # returns (the value targets) are not touched
    once = [_minibatch_advantages(normalised, False, seed) for seed in range(3)]
    for shuffled in once[1:]:
        assert shuffled == pytest.approx(once[0])
    flat = expected.T.reshape(-1)  # env-major, as the tags number the steps
    assert once[0] == pytest.approx({t: flat[t] for t in range(N_STEPS * N_ENVS)})
