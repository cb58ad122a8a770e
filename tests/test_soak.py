"""Memory stays flat over many rollouts and updates (bf16 on), and the soak benchmark runs end to end."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from helpers import make_env
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from agents.buffers import EpisodeRolloutBuffer
from agents.kl import KLPenalty
from agents.policies import CausalLMPolicy
from agents.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402  (a script, not a package)

# Prompts of 1 to 17 words: episodes restart with ever new lengths, as a real prompt set makes them.
SENTENCE = "the movie was good and i loved the film , a sad dull mess with great acting"
VARIED_PROMPTS = [SENTENCE.rsplit(" ", cut)[0] for cut in range(SENTENCE.count(" ") + 1)]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers, via peft
def test_rss_stays_flat_over_rollouts_and_updates_with_bf16(tiny_env_kwargs: dict, tiny_model: Path) -> None:
    """Under bf16 autocast every new matmul shape costs a oneDNN kernel (~0.5-2 MB) that two caches of 1024 entries
    keep. Before re-encodes and training passes padded their rows to a few sizes, each rollout and update of this
    run added ~50 MB (~250 MB over the six after warm-up); now a few MB at most, as a rare row bucket comes up.
    On CPUs without bf16 matmul kernels nothing grows either way."""
    venv = make_env(tiny_env_kwargs, 8, prompts=VARIED_PROMPTS, max_new_tokens=8, max_prompt_tokens=80)
    model = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, seed=0,
                rollout_buffer_class=EpisodeRolloutBuffer,
                policy_kwargs=dict(model=str(tiny_model), bf16=True, lora={"r": 4}))  # fmt: skip
    _, callback = model._setup_learn(10**9, CallbackList([KLPenalty(0.05)]))
    callback.on_training_start(locals(), globals())
    rss = []
    for _ in range(12):
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        model.train()
        rss.append(soak.rss_mib())
    warm = rss[5]
    assert max(rss[6:]) - warm < 40, [round(r) for r in rss]


def test_soak_benchmark_smoke(tiny_model: Path, tmp_path: Path) -> None:
    soak.main(["--minutes", "1", "--max-rollouts", "3", "--warmup-rollouts", "1", "--model", str(tiny_model),
               "--reward-model", "gold", "--max-prompt-tokens", "128", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "soak.json").read_text())
    default = TrainConfig(model=str(tiny_model), reward_model="gold", max_prompt_tokens=128)  # textgen train's settings
    assert result["rollouts"] == 3 and result["config"] == json.loads(json.dumps(dataclasses.asdict(default)))
    assert [s["phase"] for s in result["samples"]] == ["after_rollout", "after_update"] * 3
    assert result["growth"] == pytest.approx(result["max_rss_mib"] / result["warmup_rss_mib"] - 1)
    report = (tmp_path / "soak.md").read_text()
    assert "python benchmarks/soak.py --minutes 1" in report and "CPU: " in report
    for phase in soak.PHASES:  # like with like: each phase against itself at the end of warm-up
        rows = [s["rss_mib"] for s in result["samples"] if s["phase"] == phase]
        assert result[f"{phase}_growth"] == pytest.approx(max(rows[1:]) / rows[0] - 1)
    again = soak.main(["--reanalyse", str(tmp_path / "soak.json"), "--warmup-rollouts", "2", "--out", str(tmp_path)])
    assert again["warmup_rollouts"] == 2 and again["samples"] == result["samples"]
    assert again["command"] == result["command"]  # the run's command, not the re-analysis's
