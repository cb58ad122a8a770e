"""Baselines without an LM prior: the features extractors by hand, and RecurrentPPO / PPO training with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LengthReward
from gymnasium import spaces
from helpers import changed, make_env, weights
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from agents.baselines import BagOfTokens, LastTokenEmbedding
from agents.kl import KLPenalty

L = 8
OBS_SPACE = spaces.Dict(
    {"input_ids": spaces.Box(0, 127, (L,), np.int64), "attention_mask": spaces.Box(0, 1, (L,), np.int64)}
)
IDS = torch.tensor(  # left-padded prompts, then generated tokens; junk ids under mask 0
    [
        [9, 9, 5, 6, 7, 0, 0, 0],
        [0, 3, 4, 5, 6, 7, 8, 99],
        [0, 0, 0, 0, 42, 0, 0, 0],
    ]
)
MASK = torch.tensor(
    [
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 0, 0, 0],
    ]
)
LAST = [7, 99, 42]


def as_sb3_obs(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids.float(), "attention_mask": mask.float()}  # SB3's preprocess_obs hands floats


def test_last_token_embedding() -> None:
    extractor = LastTokenEmbedding(OBS_SPACE, embed_dim=8)
    assert extractor.features_dim == 8 and extractor.embedding.num_embeddings == 128
    features = extractor(as_sb3_obs(IDS, MASK))
    assert features.shape == (3, 8)
    torch.testing.assert_close(features, extractor.embedding.weight[LAST])


def test_bag_of_tokens() -> None:
    extractor = BagOfTokens(OBS_SPACE, embed_dim=8)
    assert extractor.features_dim == 16 and extractor.embedding.num_embeddings == 128
    features = extractor(as_sb3_obs(IDS, MASK))
    assert features.shape == (3, 16)
    table = extractor.embedding.weight
    for row in range(3):
        valid = IDS[row][MASK[row] > 0]
        torch.testing.assert_close(features[row, :8], table[valid].mean(0))
        torch.testing.assert_close(features[row, 8:], table[LAST[row]])
    junk = torch.where(MASK > 0, IDS, torch.full_like(IDS, 1))  # other ids under mask 0 change nothing
    torch.testing.assert_close(extractor(as_sb3_obs(junk, MASK)), features)


@pytest.mark.parametrize("extractor", [LastTokenEmbedding, BagOfTokens])
def test_extractors_need_text_observations(extractor: type) -> None:
    with pytest.raises(TypeError, match="input_ids"):
        extractor(spaces.Box(0, 1, (4,)))


def test_recurrent_ppo_with_last_token_embedding(tiny_env_kwargs: dict, tiny_model: Path) -> None:
    venv = make_env(tiny_env_kwargs, 4, reward_model=LengthReward())
    model = RecurrentPPO(
        "MultiInputLstmPolicy", venv, n_steps=16, batch_size=32, n_epochs=2, learning_rate=1e-3, seed=0,
        policy_kwargs=dict(features_extractor_class=LastTokenEmbedding, features_extractor_kwargs=dict(embed_dim=64)),
    )  # fmt: skip
    assert isinstance(model.policy.features_extractor, LastTokenEmbedding)
    before = weights(model.policy)
    penalty = KLPenalty(beta=0.1, reference=str(tiny_model))  # leashed to the LM it does not use
    model.learn(256, callback=penalty)
    moved = changed(before, model.policy)
    assert any("features_extractor.embedding" in k for k in moved) and any("lstm_actor" in k for k in moved)
    assert penalty._reference_lm is not None
    obs = venv.reset()
    actions, state = model.predict(obs, state=None, episode_start=np.ones(4, dtype=bool))
    assert actions.shape == (4,) and ((actions >= 0) & (actions < 128)).all()
    assert state[0].shape == (1, 4, model.policy.lstm_hidden_state_shape[-1])


def test_ppo_with_bag_of_tokens(tiny_env_kwargs: dict, tiny_model: Path) -> None:
    venv = make_env(tiny_env_kwargs, 4, reward_model=LengthReward())
    model = PPO("MultiInputPolicy", venv, n_steps=16, batch_size=32, n_epochs=2, learning_rate=1e-3, seed=0,
                policy_kwargs=dict(features_extractor_class=BagOfTokens))  # fmt: skip
    assert model.policy.features_extractor.features_dim == 128
    before = weights(model.policy)
    model.learn(256)
    moved = changed(before, model.policy)
    assert any("features_extractor.embedding" in k for k in moved) and any("action_net" in k for k in moved)
    actions, _ = model.predict(venv.reset())
    assert actions.shape == (4,) and ((actions >= 0) & (actions < 128)).all()


def test_evaluate_policies_without_an_lm_prior(tiny_env_kwargs: dict, tiny_model: Path) -> None:
    """evaluate() measures baselines like LM policies: KL and perplexity against the env's LM."""
    from agents.evaluate import evaluate

    venv = make_env(tiny_env_kwargs, 3, reward_model=LengthReward())
    lstm = RecurrentPPO("MultiInputLstmPolicy", venv, n_steps=8, seed=0,
                        policy_kwargs=dict(features_extractor_class=LastTokenEmbedding))  # fmt: skip
    bag = PPO("MultiInputPolicy", venv, n_steps=8, seed=0, policy_kwargs=dict(features_extractor_class=BagOfTokens))
    vocab = 128

    def uniform(obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = obs["input_ids"].shape[0]
        return torch.randint(vocab, (n,)), torch.full((n,), -np.log(vocab))

    prompts = ["the movie was", "a sad , dull", "great acting and", "i loved the film and"]
    for policy in (lstm.policy, bag.policy, uniform):
        result = evaluate(policy, venv, prompts, seed=0)
        assert len(result.completions) == 4 and (result.n_tokens >= 1).all()
        # log π of near-uniform policies is about -log V per token; KL = Σ log π - Σ log π_ref.
        log_pi = result.kl + result.reference_log_prob
        np.testing.assert_allclose(log_pi / result.n_tokens, -np.log(vocab), atol=0.5)
        assert np.isfinite(result.summary["perplexity"]) and result.summary["perplexity"] > 1
