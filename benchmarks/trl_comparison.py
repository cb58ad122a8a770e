"""The whole training loop against TRL: ``textgen train`` (SB3 PPO) vs TRL's ``GRPOTrainer`` and ``RLOOTrainer`` on
the same job, timed in one process, one after the other.

Same model, LoRA (r=16, alpha 32, all linear layers), bf16, prompts (the task's train split, rendered as the env
renders them), reward model (the task's learned one, called through a TRL reward function with each prompt's record
columns), KL coefficient β, learning rate, sampling (temperature 1, no top-k/top-p), completion length, completions
per update (``n_envs``: PPO's rollout of ``n_envs x n_steps`` tokens; TRL's generation batch of ``n_envs``
completions, ``--generations`` per prompt, as GRPO and RLOO need groups), minibatch (``batch_size / n_steps``
completions) and optimisation epochs over each update's samples (PPO's ``n_epochs``; TRL's ``num_iterations``).
Measured: generated-and-trained tokens per second and wall time to the same number of updates (each with
``n_epochs x n_envs / minibatch`` optimiser steps), split into sampling (rollout / generation and scoring) and
training. Model loading and evaluation are outside the timings.

The three run one after the other, and a shared machine's speed drifts between them (on 2 cores one order gave
textgen 1.41x-2.05x GRPO's throughput from run to run): ``--repeats`` runs them again in a rotated order each time,
and reports each figure's median and the worst of textgen's per-repeat speed-ups.

Run: ``python benchmarks/trl_comparison.py``; ``--quick`` on a tiny ``--model`` checks that every figure is made.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from agents.policies import LORA_DEFAULTS
from agents.run import BF16_HELP, TrainConfig, build_run, run_task
from agents.train import cpu_kind
from text_env.core import resolve_reward
from text_env.models import DEFAULT_BF16, load_causal_lm, load_tokenizer
from text_env.prompts import columns_of, render_prompt
from text_env.rewards import call_scorer

METHODS = ("textgen_ppo", "trl_grpo", "trl_rloo")


def _timed(timers: dict[str, float], label: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            timers[label] += time.perf_counter() - started

    return wrapper


def textgen_ppo(config: TrainConfig, updates: int) -> dict[str, float]:
    """``textgen train``'s run (:func:`agents.run.build_run`) for ``updates`` rollouts and their PPO epochs."""
    total = updates * config.n_envs * config.n_steps
    run = build_run(replace(config, total_timesteps=total, eval_prompts=1), verbose=0)
    timers: dict[str, float] = collections.defaultdict(float)
    run.algo.collect_rollouts = _timed(timers, "sampling_s", run.algo.collect_rollouts)  # type: ignore[method-assign]
    run.algo.train = _timed(timers, "training_s", run.algo.train)  # type: ignore[method-assign]
    core = run.env.core  # type: ignore[attr-defined]
    core.score = _timed(timers, "reward_s", core.score)  # the reward model (and the gold judge, for the metrics)
    steps = {"n": 0}
    step = run.algo.policy.optimizer.step
    run.algo.policy.optimizer.step = lambda *a, **k: steps.__setitem__("n", steps["n"] + 1) or step(*a, **k)
    started = time.perf_counter()
    run.algo.learn(total, callback=run.callbacks())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": float(total), "optimizer_steps": steps["n"], **timers}


def trl_trainer(kind: str, config: TrainConfig, updates: int, generations: int) -> dict[str, float]:
    """TRL's ``GRPOTrainer`` (``kind="grpo"``) or ``RLOOTrainer`` (``"rloo"``) on the same job."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    task = run_task(config)
    tokenizer = load_tokenizer(config.model)
    reward_model = resolve_reward(config.reward_model, task, config.reward_kwargs)
    rendered = {render_prompt(tokenizer, e.prompt, task.instruction): e for e in task.examples("train")}
    timers: dict[str, float] = collections.defaultdict(float)
    counted = {"tokens": 0}

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        started = time.perf_counter()
        examples = [rendered[p] for p in prompts]
        scores = call_scorer(reward_model, [e.prompt for e in examples], completions, columns_of(examples), "reward")
        counted["tokens"] += sum(len(ids) for ids in completion_ids)
        timers["reward_s"] += time.perf_counter() - started
        return [float(x) for x in scores]

    per_step = config.batch_size // config.n_steps  # PPO's minibatch, in completions
    settings = dict(
        learning_rate=config.learning_rate, beta=config.beta, num_generations=generations,
        generation_batch_size=config.n_envs, per_device_train_batch_size=per_step, num_iterations=config.n_epochs,
        max_completion_length=config.max_new_tokens or task.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        max_steps=updates * config.n_epochs * (config.n_envs // per_step), seed=config.seed, use_cpu=True,
        bf16=config.bf16, activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(**{**LORA_DEFAULTS, "r": config.lora_r})
    dataset = Dataset.from_dict({"prompt": list(rendered)})
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "grpo":
            args: Any = trl.GRPOConfig(output_dir=tmp, **settings)
            trainer: Any = trl.GRPOTrainer(
                model=load_causal_lm(config.model), reward_funcs=reward, args=args, processing_class=tokenizer,
                train_dataset=dataset, peft_config=lora,
            )  # fmt: skip
        else:
            args = trl.RLOOConfig(output_dir=tmp, **settings)
            trainer = trl.RLOOTrainer(
                model=load_causal_lm(config.model), reward_funcs=reward, args=args, processing_class=tokenizer,
                train_dataset=dataset, peft_config=lora,
            )  # fmt: skip
        trainer._generate_and_score_completions = _timed(timers, "sampling_s", trainer._generate_and_score_completions)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": float(counted["tokens"]), "training_s": seconds - timers["sampling_s"],
            "optimizer_steps": trainer.state.global_step, **timers}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward-model", help="default: the task's learned reward model, as textgen train")
    parser.add_argument("--updates", type=int, default=3, help="rollouts / generation batches, each with its epochs")
    parser.add_argument("--n-envs", type=int, default=16, help="completions per update")
    parser.add_argument("--n-steps", type=int, default=32, help="PPO steps per env per rollout (= completion length)")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch in tokens (/ n_steps completions)")
    parser.add_argument("--n-epochs", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4, help="TRL's completions per prompt (a group)")
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=DEFAULT_BF16, help=BF16_HELP)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of every method, in a rotated order each time")
    parser.add_argument("--quick", action="store_true", help="one update, one repeat: checks every figure is made")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_comparison.json"))
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/trl_comparison.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.updates, args.repeats = 1, 1
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        model=args.model, reward_model=args.reward_model, n_envs=args.n_envs, n_steps=args.n_steps,
        max_new_tokens=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs,
        max_prompt_tokens=args.max_prompt_tokens, bf16=args.bf16,
    )  # fmt: skip
    methods = args.methods.split(",")
    repeats: list[dict[str, dict[str, float]]] = []
    for k in range(args.repeats):
        rows: dict[str, dict[str, float]] = {}
        for method in methods[k % len(methods) :] + methods[: k % len(methods)]:  # rotated: drift hits each alike
            torch.manual_seed(config.seed)
            if method == "textgen_ppo":
                row = textgen_ppo(config, args.updates)
            else:
                row = trl_trainer(method.removeprefix("trl_"), config, args.updates, args.generations)
            row["tok_s"] = row["tokens"] / row["seconds"]
            rows[method] = row
            print(f"repeat {k + 1}/{args.repeats}", method, row, flush=True)
        if "textgen_ppo" in rows:
            for row in rows.values():
                row["textgen_speedup"] = rows["textgen_ppo"]["tok_s"] / row["tok_s"]  # textgen's tokens/s over this
        repeats.append(rows)
    results: dict[str, Any] = {"command": command, "updates": args.updates, "repeats": repeats, "methods": {}}
    for method in methods:  # each figure's median over the repeats; the speed-up's worst beside it
        runs = [rows[method] for rows in repeats]
        results["methods"][method] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        if "textgen_speedup" in runs[0]:
            results["methods"][method]["textgen_speedup_worst"] = min(r["textgen_speedup"] for r in runs)
    results["machine"] = f"{cpu_kind()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "quick")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    repeats = results["repeats"]
    lines = ["# textgen train vs TRL GRPOTrainer and RLOOTrainer", "", f"Command: `{results['command']}`", ""]
    lines += [f"Machine: {results['machine']}. {results['updates']} updates each, {len(repeats)} repeat(s).", ""]
    lines += [
        "Medians over the repeats (each repeat runs every method, in a rotated order):",
        "",
        "| method | wall s | generated tokens | tokens/s | textgen's speed-up (worst) | sampling s | training s "
        "| reward s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for method, r in results["methods"].items():
        lines.append(
            f"| {method} | {r['seconds']:.1f} | {r['tokens']:.0f} | {r['tok_s']:.2f} | "
            f"{r.get('textgen_speedup', nan):.2f}x ({r.get('textgen_speedup_worst', nan):.2f}x) | "
            f"{r.get('sampling_s', 0):.1f} | {r.get('training_s', 0):.1f} | {r.get('reward_s', nan):.1f} |"
        )
    lines += ["", "Each repeat, in the order run (wall s; textgen's speed-up):", ""]
    for k, rows in enumerate(repeats, 1):
        runs = ", ".join(f"{m} {r['seconds']:.1f} s ({r.get('textgen_speedup', nan):.2f}x)" for m, r in rows.items())
        lines.append(f"{k}. {runs}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
