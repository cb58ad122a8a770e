"""`agents.train.make_algorithm`: every algorithm of `textgen train --algo` builds and learns on a tiny env."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_PROMPTS

from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy
from agents.train import ALGORITHMS, TrainConfig, algorithm_class, make_algorithm
from text_env import make_text_vec_env


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_make_algorithm_learns(tiny_model: Path, algo: str) -> None:
    env = make_text_vec_env(
        2, seed=0, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_new_tokens=4,
        max_prompt_tokens=24,
    )  # fmt: skip
    lora = None if algo == "trpo" else {"r": 4}  # TRPO needs every parameter trainable
    config = TrainConfig(model=str(tiny_model), algo=algo, n_steps=8, batch_size=8, bf16=False, lora=lora)
    model = make_algorithm(config, env)
    assert isinstance(model, algorithm_class(algo))
    expected = MaskableCausalLMPolicy if algo == "maskable_ppo" else CausalLMPolicy
    assert type(model.policy) is expected
    model.learn(16)
    assert model.num_timesteps == 16


def test_trpo_with_lora_says_what_to_do(tiny_model: Path) -> None:
    env = make_text_vec_env(1, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_prompt_tokens=24)
    with pytest.raises(ValueError, match="--lora-r 0"):
        make_algorithm(TrainConfig(model=str(tiny_model), algo="trpo"), env)


def test_unknown_algorithm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of ppo, a2c, trpo, maskable_ppo"):
        algorithm_class("dqn")


def test_tensorboard_shows_reward_kl_beta_gold_and_samples(tiny_model: Path, tmp_path: Path) -> None:
    from stable_baselines3.common.callbacks import CallbackList
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.callbacks import TextMetrics
    from agents.kl import KLPenalty

    env = make_text_vec_env(
        2, seed=0, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_new_tokens=4,
        max_prompt_tokens=24,
    )  # fmt: skip
    config = TrainConfig(
        model=str(tiny_model), n_steps=8, batch_size=8, bf16=False, out=str(tmp_path), tensorboard=True
    )
    model = make_algorithm(config, env)
    model.learn(32, callback=CallbackList([KLPenalty(), TextMetrics()]))
    (run,) = (tmp_path / "tensorboard").iterdir()
    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"rlhf/kl_per_token", "rlhf/kl_per_episode", "rlhf/beta", "rlhf/reward_model_score", "rlhf/gold_score"}
    assert expected <= scalars and "rollout/ep_rew_mean" in scalars
    assert any(tag.startswith("rlhf/samples") for tag in events.Tags()["tensors"])  # completions as text


def test_tensorboard_missing_says_how_to_install(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    env = make_text_vec_env(1, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_prompt_tokens=24)
    with pytest.raises(ImportError, match=r"pip install 'textgen-rl\[tensorboard\]'"):
        make_algorithm(TrainConfig(model=str(tiny_model), tensorboard=True, bf16=False), env)
