"""rl-zoo3 trains every shipped config on the tiny LM at a tiny budget, and rl_zoo3.enjoy replays the agents."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rl_zoo3")
pytestmark = pytest.mark.slow
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest, and CI has two cores

EXTRA = {"ppo": "batch_size:16", "a2c": "", "trpo": "batch_size:16 cg_max_steps:2 n_critic_updates:1",
         "ppo_lstm": "batch_size:16", "maskable_ppo": "batch_size:16"}  # fmt: skip


def zoo(command: str, algo: str, tiny_model: Path, logs: Path, *args: str) -> str:
    launcher = ["-m", "agents.zoo", command] if algo == "maskable_ppo" else ["-m", f"rl_zoo3.{command}"]
    base = ["--algo", algo, "--env", "TextGen-v0", "--gym-packages", "text_env", "-f", str(logs), "--seed", "0"]
    done = subprocess.run(
        [sys.executable, *launcher, *base, *args], capture_output=True, text=True, timeout=600, env=ONE_THREAD
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("algo", list(EXTRA))
def test_zoo_trains_and_enjoy_replays(algo: str, tiny_model: Path, tmp_path: Path) -> None:
    env_kwargs = [f"model:'{tiny_model}'", "reward_model:'gold'", "max_new_tokens:6", "max_prompt_tokens:128"]
    params = ["n_envs:2", "n_steps:8", *EXTRA[algo].split()]
    if algo != "ppo_lstm":
        params.append(f"policy_kwargs:dict(model='{tiny_model}', bf16=False)")
    out = zoo("train", algo, tiny_model, tmp_path, "-conf", f"agents.zoo.{algo}", "-n", "32", "--log-interval", "1",
              "--env-kwargs", *env_kwargs, "-params", *params)  # fmt: skip
    assert "rlhf/" in out or "kl_per_token" in out  # the KL leash and text metrics were logged
    assert (tmp_path / algo / "TextGen-v0_1" / "TextGen-v0.zip").is_file()
    replay = zoo("enjoy", algo, tiny_model, tmp_path, "--exp-id", "1", "-n", "12", "--no-render")
    assert "Episode Length" in replay or "Episodes" in replay


def test_launcher_explains_its_usage() -> None:
    done = subprocess.run([sys.executable, "-m", "agents.zoo"], capture_output=True, text=True)
    assert done.returncode != 0 and "usage: python -m agents.zoo train|enjoy" in done.stderr
