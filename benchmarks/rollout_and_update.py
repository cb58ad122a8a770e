"""Speed and memory of the LM policy under stock SB3, measured side by side in one run.

(a) rollout tokens/s through SB3's ``collect_rollouts`` on the batched ``TextGenVecEnv``, against HF
    ``model.generate`` with the same sampling (pure sampling, same prompts, same batch, same length), the two
    timed alternately;
(b) PPO update time per epoch at ``T`` and ``2T`` new tokens (linear, not quadratic, in episode length), and
    with SB3's stock shuffled buffer for comparison;
(c) peak RSS of a short ``textgen train`` run (a subprocess, so nothing here inflates it).

Run: ``python benchmarks/rollout_and_update.py`` (default model) or ``--model DIR`` for another one.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer

from agents.buffers import EpisodeRolloutBuffer
from agents.policies import CausalLMPolicy
from text_env.prompts import encode_prompt
from text_env.vec_env import make_text_vec_env


def make_ppo(
    model: str, n_envs: int, tokens: int, buffer: type = EpisodeRolloutBuffer, max_prompt_tokens: int | None = None
) -> PPO:
    env = make_text_vec_env(
        n_envs, seed=0, model=model, reward_model="gold", max_new_tokens=tokens, max_prompt_tokens=max_prompt_tokens
    )
    return PPO(
        CausalLMPolicy, env, n_steps=tokens, batch_size=128, n_epochs=1, learning_rate=1e-5, gamma=1.0,
        rollout_buffer_class=buffer, policy_kwargs=dict(model=model), seed=0,
    )  # fmt: skip


REPEATS = 5  # timed repetitions after one warm-up; the median is reported


def _median_seconds(*runs: Callable[[], object]) -> list[float]:
    """Median seconds of each run, the runs alternating (side by side: drifts in machine speed hit all alike)."""
    for run in runs:
        run()  # warm-up: first calls with new tensor shapes are slow on CPU
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(REPEATS):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def rollout(algo: PPO) -> Callable[[], object]:
    """One ``collect_rollouts`` of ``n_steps * n_envs`` tokens, set up as ``learn`` would."""
    _, callback = algo._setup_learn(10**9, callback=None)
    callback.init_callback(algo)
    return lambda: algo.collect_rollouts(algo.env, callback, algo.rollout_buffer, algo.n_steps)


def generate(algo: PPO, tokens: int) -> Callable[[], object]:
    """``model.generate`` of the same batch shape with the same sampling, from the env's prompts."""
    core = algo.env.core  # type: ignore[attr-defined]
    lm = algo.policy.lm
    prompts = core.prompts[: algo.env.num_envs]
    encoded = [encode_prompt(core.tokenizer, p, core.task.instruction) for p in prompts]
    ids = torch.full((len(encoded), core.max_prompt_tokens), core.pad_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, -len(e) :], mask[i, -len(e) :] = torch.tensor(e), 1

    @torch.no_grad()
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=tokens,
                min_new_tokens=tokens, pad_token_id=core.pad_id,
            )  # fmt: skip

    return run


def time_update(algo: PPO) -> float:
    """Seconds for one PPO epoch over a collected rollout (``train()`` re-reads the same buffer each time)."""
    rollout(algo)()
    return _median_seconds(algo.train)[0]


def peak_rss_of_train(model: str) -> float:
    """Peak RSS (GB) of a short ``textgen train`` subprocess."""
    code = (
        "import resource, sys; from agents.cli import main; "
        f"main(['train', '--model', {model!r}, '--total-timesteps', '512', '--eval-prompts', '16', "
        "'--out', '/tmp/textgen-bench-runs']); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split("PEAK_RSS_KB")[-1].split()[0]) / 1024**2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens T (the update is also timed at 2T)")
    parser.add_argument("--max-prompt-tokens", type=int, help="prompt room (default: the task's)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_and_update.json"))
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/rollout_and_update.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict[str, float | str] = {"model": args.model, "n_envs": args.n_envs, "tokens": args.tokens}

    algo = make_ppo(args.model, args.n_envs, args.tokens, max_prompt_tokens=args.max_prompt_tokens)
    n_tokens = args.n_envs * args.tokens
    rollout_s, generate_s = _median_seconds(rollout(algo), generate(algo, args.tokens))
    results["rollout_tok_s"] = n_tokens / rollout_s
    results["generate_tok_s"] = n_tokens / generate_s
    results["rollout_vs_generate"] = results["rollout_tok_s"] / results["generate_tok_s"]
    results["update_epoch_s_T"] = time_update(algo)
    del algo
    algo = make_ppo(args.model, args.n_envs, 2 * args.tokens, max_prompt_tokens=args.max_prompt_tokens)
    results["update_epoch_s_2T"] = time_update(algo)
    results["update_ratio_2T_vs_T"] = results["update_epoch_s_2T"] / results["update_epoch_s_T"]
    del algo
    algo = make_ppo(args.model, args.n_envs, args.tokens, DictRolloutBuffer, args.max_prompt_tokens)
    results["update_epoch_s_T_stock_buffer"] = time_update(algo)
    del algo
    if not args.skip_rss:
        results["train_peak_rss_gb"] = peak_rss_of_train(args.model)
    results["bench_process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Rollout and update speed, peak memory",
        "",
        f"Command: `{command}`",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
    ]
    targets = {
        "rollout_vs_generate": ">= 0.8 (stretch 1.0)",
        "update_ratio_2T_vs_T": "<= 2.5",
        "train_peak_rss_gb": "<= 4",
    }
    for key, value in results.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} | {targets.get(key, '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
