"""Speed of evaluation (``textgen evaluate``, and ``textgen train``'s before/after table) against HF ``generate``
on the same prompts, batch, sampling and length, timed alternately in one process (median of ``--repeats``).

Evaluation is :func:`agents.evaluate.evaluate`: the policy's KV-cached batched sampling (the rollout's path),
plus what generate does not do: the reference's log-prob of every token (KL, perplexity) and the reward model's and
gold's scores of each completion. Each side's tokens/s counts the tokens it generated (an evaluation episode may
end at a stop string; ``generate`` is held to the full length). Two models: a LoRA run's policy (r=16, how a
trained run samples) and the plain model (``textgen evaluate default``).

Run: ``python benchmarks/evaluate_speed.py`` (the embedded default model, positive-review's eval prompts);
``--quick`` with a tiny ``--model`` checks every figure is produced (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from agents.evaluate import Evaluation, evaluate
from agents.run import BF16_HELP, Run
from agents.train import cpu_kind
from text_env.models import DEFAULT_BF16

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from rollout_and_update import CONFIGS, generate, make_run, median_seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward-model", help="default: the task's learned reward model, as textgen evaluate")
    parser.add_argument("--n-envs", type=int, default=16, help="prompts per batch (textgen evaluate's)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion (the task's)")
    parser.add_argument("--max-prompt-tokens", type=int, help="prompt room (default: the task's)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=DEFAULT_BF16, help=BF16_HELP)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after a warm-up (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="one repeat: checks every figure is made")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "evaluate_speed.json"))
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/evaluate_speed.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"command": command, "model": args.model, "n_envs": args.n_envs, "tokens": args.tokens}
    for name, lora_r in CONFIGS.items():
        run = make_run(args, lora_r, args.tokens)
        prompts = run.env.core.prompts[: args.n_envs]  # type: ignore[attr-defined]  # generate's prompts

        def evaluation(run: Run = run, prompts: list[str] = prompts) -> Evaluation:
            return evaluate(run.algo.policy, run.env, prompts, seed=0)  # the same seed: the same completions

        generated = int(evaluation().n_tokens.sum())
        seconds = median_seconds([evaluation, generate(run, run.algo.policy.lm)], args.repeats)
        results[f"{name}_evaluate_tok_s"] = generated / seconds[0]
        results[f"{name}_generate_tok_s"] = args.n_envs * args.tokens / seconds[1]
        results[f"{name}_evaluate_vs_generate"] = results[f"{name}_evaluate_tok_s"] / results[f"{name}_generate_tok_s"]
        print({k: v for k, v in results.items() if k.startswith(name)}, flush=True)
    results["machine"] = f"{cpu_kind()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = report(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    return results


def report(results: dict[str, Any]) -> str:
    lines = ["# Evaluation speed against HF generate", "", f"Command: `{results['command']}`", ""]
    lines += [f"{results['machine']}; {results['n_envs']} prompts per batch, {results['tokens']} new tokens.", ""]
    lines += ["| model | evaluation tok/s | generate tok/s | evaluation / generate |", "|---|---|---|---|"]
    for name in CONFIGS:
        row = [results[f"{name}_{k}"] for k in ("evaluate_tok_s", "generate_tok_s", "evaluate_vs_generate")]
        lines.append(f"| {name} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
