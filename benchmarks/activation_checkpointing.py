"""What activation checkpointing of long training passes costs and saves, on the code task's default settings.

One PPO minibatch as ``textgen train --task code`` forms it (4 episodes x 32 steps, the last segment of 128-token
completions, on the train split's 4 longest prompts, random tokens), forward + backward through
``CausalLMPolicy.evaluate_actions``: plain (``checkpoint_tokens=None``) against checkpointed (the default, 1024).

- time: both modes interleaved in one process, the first pass of each dropped, median of the rest;
- memory: each mode in a fresh process, the rise of peak RSS (``VmHWM``) over 3 passes.

Run: ``python benchmarks/activation_checkpointing.py`` (~3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.run import TrainConfig, checked_task, make_algorithm, make_env
from agents.train import cpu_kind, status_gb
from text_env.models import load_tokenizer

SKIP = 96  # tokens generated before the segment: the last of a 128-token episode's four


def minibatch(policy_threads: int = 1) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    torch.set_num_threads(policy_threads)
    torch.manual_seed(0)
    config = TrainConfig(task="code", n_envs=4, reward_model="gold")
    task = checked_task(config)
    tokenizer = load_tokenizer(config.model)
    longest = sorted(task.examples("train"), key=lambda e: -len(tokenizer(e.prompt)["input_ids"]))[:4]
    env = make_env(config, task=replace(task, train_prompts=longest))
    policy = make_algorithm(config, env, verbose=0).policy
    rng = np.random.default_rng(0)
    obs, steps = env.reset(), []
    for _ in range(SKIP + 32):
        actions = rng.integers(0, env.action_space.n, size=env.num_envs)  # no EOS: the episodes run to the end
        steps.append((obs, actions))
        obs, *_ = env.step(actions)
    batch = {k: torch.as_tensor(np.concatenate([o[k] for o, _ in steps[SKIP:]])) for k in steps[0][0]}
    policy.set_training_mode(True)
    return policy, batch, torch.as_tensor(np.concatenate([a for _, a in steps[SKIP:]]))


def one_pass(policy: Any, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> float:
    tic = time.perf_counter()
    policy.optimizer.zero_grad()
    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    (values.sum() + log_prob.sum() + entropy.sum()).backward()
    return time.perf_counter() - tic


def peak_rise(mode: str) -> None:
    """In this process: the peak RSS rise of 3 passes in ``mode`` ("plain" or "checkpointed"), printed as JSON."""
    policy, obs, actions = minibatch()
    policy.checkpoint_tokens = None if mode == "plain" else policy.checkpoint_tokens
    before = status_gb("VmRSS")
    for _ in range(3):
        one_pass(policy, obs, actions)
    print(json.dumps({"mode": mode, "slots": int(obs["attention_mask"].sum()), "rise_gb": status_gb("VmHWM") - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", default="benchmarks/results/activation_checkpointing")
    args = parser.parse_args()
    if args.peak:
        peak_rise(args.peak)
        return
    policy, obs, actions = minibatch()
    default = policy.checkpoint_tokens
    times: dict[str, list[float]] = {"plain": [], "checkpointed": []}
    for _ in range(args.repeats):
        for mode, tokens in (("plain", None), ("checkpointed", default)):
            policy.checkpoint_tokens = tokens
            times[mode].append(one_pass(policy, obs, actions))
    median = {mode: statistics.median(t[1:]) for mode, t in times.items()}
    rises = {}
    for mode in times:
        child = [sys.executable, __file__, "--peak", mode]
        rises[mode] = json.loads(
            subprocess.run(child, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
    command = "python " + " ".join(sys.argv)
    lines = [
        "# Activation checkpointing of a long training pass (code task)\n", f"`{command}`\n",
        f"{cpu_kind()}, torch {torch.__version__}, one thread. One default minibatch of the code task: 4 episodes x "
        f"32 steps (the last segment of 128-token completions) on the train split's 4 longest prompts, "
        f"{int(obs['input_ids'].shape[1])} slots wide; checkpoint_tokens {default} (the default) against none.\n",
        "| mode | median s per forward + backward | peak RSS rise over 3 passes, GB |", "|---|---|---|",
        *(f"| {mode} | {median[mode]:.2f} | {rises[mode]['rise_gb']:.2f} |" for mode in times),
        f"\nCheckpointed / plain time: **{median['checkpointed'] / median['plain']:.2f}x**; memory saved: "
        f"**{rises['plain']['rise_gb'] - rises['checkpointed']['rise_gb']:.2f} GB** for this minibatch.",
    ]  # fmt: skip
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "times": times, "peak": rises}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
