"""The main job: RLHF fine-tuning of an LM on a task with an SB3 algorithm, evaluated before and after."""

from __future__ import annotations

import importlib.util
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList

from agents.buffers import EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer
from agents.callbacks import TextMetrics
from agents.evaluate import Evaluation, evaluate
from agents.kl import KLPenalty
from agents.masks import TopPMask
from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy
from text_env.core import resolve_reward
from text_env.models import DEFAULT_MODEL
from text_env.tasks import get_task
from text_env.vec_env import make_text_vec_env

__all__ = ["ALGORITHMS", "TrainConfig", "algorithm_class", "make_algorithm", "train"]

ALGORITHMS = ("ppo", "a2c", "trpo", "maskable_ppo")


@dataclass
class TrainConfig:
    """Settings of ``textgen train``; the defaults fit a 2-core CPU in about 13 minutes and 4 GB on the default model.

    :param total_timesteps: environment steps (= generated tokens) to train on.
    :param n_envs: episodes generated in parallel (rollout batch size).
    :param n_steps: steps per env per rollout (a rollout is ``n_steps * n_envs`` tokens).
    :param batch_size: PPO minibatch, in tokens (steps); whole episodes stay together.
    :param beta: initial KL coefficient; ``target_kl`` makes it adaptive (nats per episode).
    :param eval_prompts: how many held-out prompts the before/after evaluation uses.
    :param lora: LoRA settings (``peft.LoraConfig`` keywords); ``None`` fine-tunes every weight (needs ~2 GB more
        memory for gradients and Adam state, and a lower learning rate, e.g. 1e-5).
    :param train_layers: instead of LoRA, fine-tune only the last N transformer blocks in full (what TRPO needs).
    :param mask_top_p: for ``maskable_ppo``, the reference model's top-p set that actions are restricted to.
    """

    task: str = "positive-review"
    model: str = DEFAULT_MODEL
    algo: str = "ppo"
    reward_model: str | None = None
    total_timesteps: int = 10240
    n_envs: int = 16
    n_steps: int = 32
    batch_size: int = 128
    n_epochs: int = 4
    learning_rate: float = 1e-4
    gamma: float = 1.0
    beta: float = 0.05
    target_kl: float | None = None
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    eval_prompts: int = 80
    bf16: bool = True
    lora: dict[str, Any] | None = field(default_factory=lambda: {"r": 16})
    train_layers: int | None = None
    mask_top_p: float = 0.9
    seed: int = 0
    out: str = "runs"
    tensorboard: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def algorithm_class(algo: str) -> type[BaseAlgorithm]:
    """The SB3 class of an algorithm name in :data:`ALGORITHMS`."""
    from sb3_contrib import TRPO, MaskablePPO
    from stable_baselines3 import A2C, PPO

    classes: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "trpo": TRPO, "maskable_ppo": MaskablePPO}
    if algo not in classes:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")
    return classes[algo]


def make_algorithm(config: TrainConfig, env: Any) -> BaseAlgorithm:
    """Build the SB3 algorithm named by ``config.algo`` with the causal-LM policy on ``env``."""
    cls = algorithm_class(config.algo)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'textgen-rl[tensorboard]'")
    if config.algo == "trpo" and config.lora is not None:
        raise ValueError(
            "sb3_contrib.TRPO runs one double-backward pass through the LM per trainable tensor, hundreds with LoRA: "
            "fine-tune the top blocks instead (lora=None, train_layers=2, or --lora-r 0 --train-layers 2)"
        )
    policy_kwargs = dict(model=config.model, bf16=config.bf16, lora=config.lora, train_layers=config.train_layers)
    common: dict[str, Any] = dict(
        learning_rate=config.learning_rate, gamma=config.gamma, n_steps=config.n_steps, seed=config.seed,
        policy_kwargs=policy_kwargs, verbose=1,
        tensorboard_log=str(Path(config.out) / "tensorboard") if config.tensorboard else None,
    )  # fmt: skip
    if config.algo != "a2c":  # A2C updates on the whole rollout at once
        common["batch_size"] = config.batch_size
    if config.algo in ("ppo", "maskable_ppo"):
        common["n_epochs"] = config.n_epochs
    policy, buffer = CausalLMPolicy, EpisodeRolloutBuffer
    if config.algo == "maskable_ppo":  # NLPO-style: actions outside the reference model's top-p are masked
        env = TopPMask(env, config.model, top_p=config.mask_top_p, bf16=config.bf16)
        policy, buffer = MaskableCausalLMPolicy, MaskableEpisodeRolloutBuffer
    return cls(policy, env, rollout_buffer_class=buffer, **common, **config.extra)


def _table(before: Evaluation, after: Evaluation, n_samples: int = 3) -> str:
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in ("reward_model_score", "gold_score", "kl", "perplexity", "distinct_1", "distinct_2"):
        rows.append(f"| {key} | {before.summary[key]:.3f} | {after.summary[key]:.3f} |")
    rows += ["", "| prompt | before | after |", "|---|---|---|"]
    for i in range(min(n_samples, len(before.prompts))):
        cells = [before.prompts[i], before.completions[i], after.completions[i]]
        rows.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate on held-out prompts before and after, save the run; return the report."""
    torch.manual_seed(config.seed)
    task = get_task(config.task)
    reward = resolve_reward(config.reward_model, task)  # built once, shared by the train and eval envs
    env_kwargs = dict(
        model=config.model, task=task, reward_model=reward, max_new_tokens=config.max_new_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
    )  # fmt: skip
    env = make_text_vec_env(config.n_envs, seed=config.seed, **env_kwargs)
    eval_env = make_text_vec_env(config.n_envs, seed=config.seed, split="eval", **env_kwargs)
    eval_prompts = task.eval_prompts[: config.eval_prompts]

    algo = make_algorithm(config, env)
    started = time.time()
    before = evaluate(algo.policy, eval_env, eval_prompts, seed=config.seed)
    metrics = TextMetrics()
    kl = KLPenalty(config.beta, config.target_kl)
    algo.learn(config.total_timesteps, callback=CallbackList([kl, metrics]), progress_bar=_has_progress_bar())
    train_seconds = time.time() - started
    after = evaluate(algo.policy, eval_env, eval_prompts, seed=config.seed)

    run = Path(config.out) / f"{config.task}-{config.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True, exist_ok=True)
    algo.save(run / "model")
    table = _table(before, after)
    report = {
        "config": asdict(config),
        "before": before.summary,
        "after": after.summary,
        "train_seconds": train_seconds,
        "history": metrics.history,
        "final_beta": kl.controller.beta,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(before.prompts, before.completions, after.completions, strict=True)
        ],
        "run_dir": str(run),
    }
    (run / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    (run / "report.md").write_text(table + "\n")
    _plot(metrics.history, run / "training.png")
    print(table)
    print(f"\nsaved to {run} (load with {type(algo).__name__}.load('{run / 'model'}'))")
    return report


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else str(value)


def _has_progress_bar() -> bool:
    try:
        import rich  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _plot(history: list[dict[str, float]], path: Path) -> None:
    """Reward-model and gold score per rollout, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not history:
        return
    steps = [h["timesteps"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["reward_model_score"] for h in history], label="reward model")
    ax.plot(steps, [h["gold_score"] for h in history], label="gold (VADER)")
    ax.set_xlabel("environment steps (tokens)")
    ax.set_ylabel("mean score of finished episodes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
