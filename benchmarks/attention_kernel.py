"""What the attention kernel costs a PPO update: one epoch of ``textgen train``'s own run (LoRA r=16, KL penalty,
the task's reward model) under PyTorch's own choice of SDPA kernel (what PPO, A2C and MaskablePPO get) and under the
math kernel (what TRPO gets: its Fisher-vector products differentiate the pass twice, which only that kernel allows),
side by side in one process, on the same rollout buffer.

The math kernel keeps every (heads, L, L) attention matrix for the backward pass, so its cost grows with the episode
length: the default task (prompt + 32 new tokens) and the code task (prompts of up to 480 tokens; ``--rollouts 4``
fills the buffer with the last 32 of 128 new tokens, the longest episodes of the run) show both ends.

Per arm: median seconds of one epoch (arms alternating, after one warm-up each) and the largest rise of the
resident set during an epoch above the resident set before it (``VmHWM`` reset through ``/proc/self/clear_refs``;
free heap pages handed back first, so an arm cannot hide in what the other one freed).

Run: ``python benchmarks/attention_kernel.py --task positive-review`` and ``--task code --rollouts 4``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reward_model_layers import save_json  # sibling scripts
from rollout_and_update import rollout

from agents.policies import release_free_heap
from agents.run import Run, TrainConfig, build_run
from agents.train import cpu_kind, status_gb

ARMS = {"pytorch's choice": False, "math (TRPO's)": True}  # the policy's double_backward flag per arm


def epoch(run: Run, math: bool) -> tuple[float, float]:
    """Seconds of one PPO epoch and the rise of the resident set (GB) during it."""
    run.algo.policy.double_backward = math
    release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_gb("VmRSS")
    started = time.perf_counter()
    run.algo.train()
    return time.perf_counter() - started, status_gb("VmHWM") - before


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="positive-review")
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward-model", help="default: the task's learned reward model, as textgen train")
    parser.add_argument("--rollouts", type=int, default=1, help="rollouts collected before the timed epochs")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, help="prompt room (default: the task's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs per arm after a warm-up (median)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/attention_kernel_<task>")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    out = args.out or str(Path(__file__).parent / "results" / f"attention_kernel_{args.task}")
    started = time.time()
    config = TrainConfig(
        task=args.task, model=args.model, reward_model=args.reward_model, n_envs=args.n_envs, n_epochs=1,
        eval_prompts=1, max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    run = build_run(config, verbose=0)
    collect = rollout(run)
    for _ in range(args.rollouts):
        collect()
    observations = run.algo.rollout_buffer.observations["attention_mask"]
    longest = int(observations.sum(-1).max())
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    rise: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats + 1):
        for arm, math in ARMS.items():
            spent, grown = epoch(run, math)
            if repeat:  # the first of each is a warm-up
                seconds[arm].append(spent)
            rise[arm].append(grown)
            print(arm, f"{spent:.1f} s, +{grown:.2f} GB", flush=True)
    result: dict[str, Any] = {
        "task": args.task, "rollouts": args.rollouts, "n_envs": args.n_envs, "longest_episode_tokens": longest,
        "arms": {arm: {"epoch_s": statistics.median(seconds[arm]), "rss_rise_gb": max(rise[arm])} for arm in ARMS},
        "machine": f"{cpu_kind()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }  # fmt: skip
    chosen, math_arm = (result["arms"][arm] for arm in ARMS)
    result["math_vs_chosen_time"] = math_arm["epoch_s"] / chosen["epoch_s"]
    result["math_minus_chosen_gb"] = math_arm["rss_rise_gb"] - chosen["rss_rise_gb"]
    result["seconds"] = time.time() - started
    md, lines = save_json(out, result, f"Attention kernel of a PPO update: {args.task}", "attention_kernel.py", argv)
    lines += [
        f"One PPO epoch of `textgen train --task {args.task}`'s run over the buffer of its rollout {args.rollouts} "
        f"({args.n_envs} envs; longest observation {longest} tokens). Median of {args.repeats} epochs per arm, "
        "arms alternating.",
        "",
        "| attention kernel | epoch seconds | resident-set rise during the epoch (GB) |",
        "|---|---|---|",
        *(f"| {arm} | {row['epoch_s']:.1f} | {row['rss_rise_gb']:.2f} |" for arm, row in result["arms"].items()),
        "",
        f"Math kernel: **{result['math_vs_chosen_time']:.2f}×** the time, "
        f"**{result['math_minus_chosen_gb']:+.2f} GB** of resident-set rise.",
        "",
    ]
    md.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
