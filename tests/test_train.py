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
