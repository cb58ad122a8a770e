"""Helpers shared by the agent tests: policy kwargs on the tiny LM, random rollouts and a ground-truth forward
pass (each row's valid tokens alone, no padding, cache or grouping)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

from agents.policies import CausalLMPolicy
from text_env import make_text_vec_env
from text_env.vec_env import TextGenVecEnv

MAX_PROMPT = 24  # as in the tiny_env_kwargs fixture


def make_env(env_kwargs: dict, n_envs: int = 4, seed: int = 0, **overrides: Any) -> TextGenVecEnv:
    return make_text_vec_env(n_envs, seed=seed, **{**env_kwargs, **overrides})


def lm_kwargs(tiny_model: Path, **overrides: Any) -> dict[str, Any]:
    """Policy kwargs on the tiny LM, float32 so that comparisons can be tight."""
    return {"model": str(tiny_model), "bf16": False, **overrides}


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def as_tensors(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return obs_as_tensor(obs, torch.device("cpu"))  # type: ignore[return-value]


@torch.no_grad()
def unpadded_outputs(lm: nn.Module, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: each row's valid tokens alone (no padding, no cache, no grouping) through ``lm``.

    :return: logits ``(B, V)`` and last hidden states ``(B, H)`` at each row's last token.
    """
    logits, hidden = [], []
    for ids, mask in zip(obs["input_ids"], obs["attention_mask"], strict=True):
        tokens = torch.as_tensor(ids)[torch.as_tensor(mask) > 0].long().unsqueeze(0)  # (1, T)
        out = lm(input_ids=tokens, output_hidden_states=True)
        logits.append(out.logits[0, -1].float())
        hidden.append(out.hidden_states[-1][0, -1].float())
    return torch.stack(logits), torch.stack(hidden)


def random_actions(rng: np.random.Generator, venv: TextGenVecEnv, p_eos: float = 0.25) -> np.ndarray:
    """Random token ids, some of them EOS, so that episodes end (and restart) at different steps."""
    actions = rng.integers(0, venv.action_space.n, size=venv.num_envs)
    actions[rng.random(venv.num_envs) < p_eos] = venv.tokenizer.eos_token_id
    return actions


def random_rollout(venv: TextGenVecEnv, n_steps: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(observation, actions)`` of each step of a random rollout, with episode ends and auto-resets."""
    rng = np.random.default_rng(seed)
    obs, steps = venv.reset(), []
    for _ in range(n_steps):
        actions = random_actions(rng, venv)
        steps.append((obs, actions))
        obs, _, _, _ = venv.step(actions)
    return steps


def lm_ppo(venv: TextGenVecEnv, tiny_model: Path, **policy_overrides: Any) -> PPO:
    """PPO with the causal-LM policy on the tiny LM, for tests that need the policy rather than training."""
    return PPO(
        CausalLMPolicy,
        venv,
        n_steps=4,
        batch_size=4 * venv.num_envs,
        policy_kwargs=lm_kwargs(tiny_model, **policy_overrides),
    )


def interrupt_textgen(args: list[str], out: Path, checkpoint: str, timeout: float = 300) -> tuple[int, str]:
    """Run ``textgen ARGS`` in a child process, Ctrl-C it (SIGINT) once a file matching ``out/checkpoint`` (a glob)
    exists, and return its exit code and stderr."""
    command = [sys.executable, "-m", "agents.cli", *args]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not list(out.glob(checkpoint)) and time.time() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=timeout)
    return child.returncode, err
