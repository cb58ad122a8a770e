"""Speed of ``textgen train``'s own configuration (LoRA r=16, KL penalty, the task's learned reward model) and of
full fine-tuning beside it, measured side by side in one process.

(a) Rollout: generated tokens/s through SB3's ``collect_rollouts`` (KL penalty, reward model, values: everything a
    rollout of ``textgen train`` does) against HF ``model.generate`` of the same model, with the same adapters (peft
    runs them unmerged; also against a merged copy, the fastest ``generate`` of the same function), the same
    sampling, prompts, batch and length. Timed alternately, median of ``--repeats``.
(b) Update: one PPO epoch (``algo.train()`` with ``n_epochs=1``) against the floor, one plain forward+backward of
    the HF model over the same minibatches of the same episodes outside SB3 (same dtype, same LoRA; left-padded
    episodes, log-probs of the generated tokens and the value head: what any trainer must compute), at ``T`` and
    ``2T`` new tokens.
(c) Where the time goes: a profile of each phase of a rollout and of an update epoch.
(d) Peak RSS of a short default ``textgen train`` (a subprocess, so nothing here inflates it).

Run: ``python benchmarks/rollout_and_update.py`` (the embedded default model); ``--quick`` with a tiny ``--model``
checks that every figure is produced (what CI runs).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from agents.cached_lm import CachedLM, _shared_prefix_groups, valid_ends
from agents.kl import KLPenalty
from agents.run import BF16_HELP, Run, TrainConfig, build_run
from agents.train import cpu_kind, peak_rss_gb
from text_env.models import DEFAULT_BF16
from text_env.prompts import encode_prompt

CONFIGS = {"lora": 16, "full": 0}  # textgen train's default (LoRA r=16), and full fine-tuning beside it


def make_run(args: argparse.Namespace, lora_r: int, tokens: int) -> Run:
    """``textgen train``'s run (:func:`agents.run.build_run`, its defaults) with one PPO epoch per ``train()``."""
    config = TrainConfig(
        model=args.model, reward_model=args.reward_model, lora_r=lora_r, n_envs=args.n_envs, n_steps=tokens,
        max_new_tokens=tokens, max_prompt_tokens=args.max_prompt_tokens, n_epochs=1, eval_prompts=1, bf16=args.bf16,
    )  # fmt: skip
    return build_run(config, verbose=0)


def median_seconds(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each run, the runs alternating (side by side: drifts in machine speed hit all alike)."""
    for run in runs:
        run()  # warm-up: first calls with new tensor shapes are slow on CPU
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def rollout(run: Run) -> Callable[[], object]:
    """One ``collect_rollouts`` of ``n_steps * n_envs`` tokens with ``textgen train``'s callbacks, as ``learn``
    runs it."""
    algo = run.algo
    _, callback = algo._setup_learn(10**9, callback=run.callbacks())
    callback.on_training_start(locals(), globals())
    return lambda: algo.collect_rollouts(algo.env, callback, algo.rollout_buffer, algo.n_steps)


def generate(run: Run, lm: torch.nn.Module) -> Callable[[], object]:
    """``lm.generate`` of the rollout's batch shape with the same sampling, from the env's prompts."""
    core = run.env.core  # type: ignore[attr-defined]
    n, tokens = run.env.num_envs, run.algo.n_steps
    encoded = [encode_prompt(core.tokenizer, p, core.task.instruction) for p in core.prompts[:n]]
    ids = torch.full((n, core.max_prompt_tokens), core.pad_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, -len(e) :], mask[i, -len(e) :] = torch.tensor(e), 1

    @torch.no_grad()
    def go() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.config.bf16):
            lm.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=tokens,
                min_new_tokens=tokens, pad_token_id=core.pad_id,
            )  # fmt: skip

    return go


def floor(run: Run) -> Callable[[], object]:
    """One plain forward+backward of the HF model per minibatch of the last rollout, outside SB3: each episode
    once, left-padded, positions from the mask, log-probs of its generated tokens and values, summed."""
    policy, buffer = run.algo.policy, run.algo.rollout_buffer
    batches = list(buffer.get(run.config.batch_size))  # the minibatches a PPO epoch sees (whole episodes)
    prompt = run.env.core.max_prompt_tokens  # type: ignore[attr-defined]

    def go() -> None:
        policy.set_training_mode(True)
        for data in batches:
            ids, mask = data.observations["input_ids"].long(), data.observations["attention_mask"].long()  # (B, L)
            episodes = torch.unique(_shared_prefix_groups(ids, mask))  # (R,) each episode's longest step
            ends = valid_ends(mask)  # (B,)
            start = int((mask[episodes] > 0).float().argmax(1).min())  # the first slot any episode uses
            span = int(ends[episodes].max())
            ep_ids, ep_mask = ids[episodes, start:span], mask[episodes, start:span]  # (R, E)
            with policy._autocast():
                out = policy.lm(
                    input_ids=ep_ids, attention_mask=ep_mask, position_ids=(ep_mask.cumsum(1) - 1).clamp(min=0),
                    output_hidden_states=True, logits_to_keep=span - (prompt - 1),
                )  # fmt: skip
            # the generated tokens' logits: slots prompt-1 .. span-2 predict the tokens at prompt .. span-1
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)  # (R, G, V)
            targets = ids[episodes, prompt:span]  # (R, G)
            valid = mask[episodes, prompt:span] > 0
            token_logp = logp.gather(2, targets[..., None]).squeeze(2)  # (R, G)
            hidden = out.hidden_states[-1][:, -(span - prompt + 1) : -1]  # (R, G, H)
            values = policy.value_head(hidden.float()).squeeze(-1)  # (R, G)
            loss = -(token_logp * valid).sum() + (values * valid).pow(2).sum()
            policy.optimizer.zero_grad()
            loss.backward()
        policy.optimizer.zero_grad()

    return go


@contextmanager
def timed(timers: dict[str, float], *targets: tuple[Any, str, str]) -> Iterator[None]:
    """Add the seconds spent in each ``(owner, attribute, label)`` callable to ``timers[label]``, inside the block."""
    originals = []
    for owner, name, label in targets:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapper(*a: Any, _f: Any = original, _label: str = label, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                timers[_label] += time.perf_counter() - started

        setattr(owner, name, functools.wraps(original)(wrapper))
    try:
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def profile_rollout(run: Run, repeats: int) -> dict[str, float]:
    """Median seconds per rollout phase (nested phases are listed apart: a phase's time excludes none of its own
    sub-phases, the table says which contains which)."""
    policy, core = run.algo.policy, run.env.core  # type: ignore[attr-defined]
    go = rollout(run)
    rows: list[dict[str, float]] = []
    for _ in range(repeats + 1):
        timers: dict[str, float] = collections.defaultdict(float)
        with timed(
            timers,
            (policy, "forward", "policy step (sampling, values)"),
            (CachedLM, "_decode", "  of which decode steps"),
            (CachedLM, "_prefill", "  of which prompt encoding"),
            # the class's: SkipFinishedBootstrap answers SB3's call on the instance
            (type(policy), "predict_values", "bootstrap values after the last step"),
            (KLPenalty, "penalise", "KL reference pass over the episodes"),
            (core, "score", "reward model and gold scoring"),
            (run.env, "step_wait", "env step (scoring included)"),
        ):
            started = time.perf_counter()
            go()
            timers["rollout total"] = time.perf_counter() - started
        rows.append(timers)
    inner = ("policy step (sampling, values)", "bootstrap values after the last step",
             "KL reference pass over the episodes", "env step (scoring included)")  # fmt: skip
    for row in rows:
        row["SB3 and callbacks (the rest)"] = row["rollout total"] - sum(row.get(k, 0.0) for k in inner)
    rows = rows[1:]  # the first one warms up
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}  # each phase's median over the repeats


def profile_update(run: Run, repeats: int) -> dict[str, float]:
    """Median seconds per phase of one PPO epoch."""
    policy = run.algo.policy
    rows: list[dict[str, float]] = []
    for _ in range(repeats + 1):
        timers: dict[str, float] = collections.defaultdict(float)
        with timed(
            timers,
            (policy, "evaluate_actions", "forward (grouped, log-probs, entropy, values)"),
            (torch.Tensor, "backward", "backward"),
            (policy.optimizer, "step", "optimizer step"),
            (torch.nn.utils, "clip_grad_norm_", "gradient clipping"),
        ):
            started = time.perf_counter()
            run.algo.train()
            timers["epoch total"] = time.perf_counter() - started
        timers["SB3 losses, minibatches (the rest)"] = 2 * timers["epoch total"] - sum(timers.values())
        rows.append(timers)
    rows = rows[1:]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}  # each phase's median over the repeats


def peak_rss_of_train(model: str) -> float:
    """Peak RSS (GB) of a short default ``textgen train`` subprocess."""
    code = (
        "from agents.cli import main; from agents.train import peak_rss_gb; "
        f"main(['train', '--model', {model!r}, '--total-timesteps', '1024', '--eval-prompts', '16', "
        "'--out', '/tmp/textgen-bench-runs']); "
        "print('PEAK_RSS_GB', peak_rss_gb())"  # VmHWM: getrusage would report this process's peak (see there)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split("PEAK_RSS_GB")[-1].split()[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward-model", help="default: the task's learned reward model, as textgen train")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens T (the update is also timed at 2T)")
    parser.add_argument("--max-prompt-tokens", type=int, help="prompt room (default: the task's)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=DEFAULT_BF16, help=BF16_HELP)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after a warm-up (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of lora, full to measure")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one repeat, no RSS run: checks every figure is made")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout_and_update.json"))
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/rollout_and_update.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.repeats, args.skip_rss = 1, True
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"command": command, "model": args.model, "n_envs": args.n_envs, "tokens": args.tokens}
    n_tokens = args.n_envs * args.tokens
    profiles: dict[str, dict[str, float]] = {}

    for name in args.configs.split(","):
        run = make_run(args, CONFIGS[name], args.tokens)
        runs = [rollout(run), generate(run, run.algo.policy.lm)]
        merged = copy.deepcopy(run.algo.policy.lm).merge_and_unload() if CONFIGS[name] else None
        if merged is not None:
            runs.append(generate(run, merged))
        seconds = median_seconds(runs, args.repeats)
        results[f"{name}_rollout_tok_s"] = n_tokens / seconds[0]
        results[f"{name}_generate_tok_s"] = n_tokens / seconds[1]
        results[f"{name}_rollout_vs_generate"] = seconds[1] / seconds[0]
        if merged is not None:
            results[f"{name}_generate_merged_tok_s"] = n_tokens / seconds[2]
            results[f"{name}_rollout_vs_generate_merged"] = seconds[2] / seconds[0]
        del merged, runs
        print({k: v for k, v in results.items() if k.startswith(name)}, flush=True)
        profiles[f"rollout, {name}"] = profile_rollout(run, args.repeats)
        print(profiles[f"rollout, {name}"], flush=True)
        for label, tokens in (("T", args.tokens), ("2T", 2 * args.tokens)):
            if tokens != args.tokens:
                del run
                run = make_run(args, CONFIGS[name], tokens)
                rollout(run)()
            epoch, plain = median_seconds([run.algo.train, floor(run)], args.repeats)
            results[f"{name}_update_epoch_s_{label}"] = epoch
            results[f"{name}_floor_s_{label}"] = plain
            results[f"{name}_update_vs_floor_{label}"] = epoch / plain
            print(name, label, epoch, plain, epoch / plain, flush=True)
            if label == "T":
                profiles[f"update epoch, {name}, T"] = profile_update(run, args.repeats)
        epochs = results[f"{name}_update_epoch_s_2T"], results[f"{name}_update_epoch_s_T"]
        results[f"{name}_update_ratio_2T_vs_T"] = epochs[0] / epochs[1]
        del run
        write(results, profiles, args.out)

    if not args.skip_rss:
        results["train_peak_rss_gb"] = peak_rss_of_train(args.model)
    write(results, profiles, args.out)
    print(report(results))
    return results


def write(results: dict[str, Any], profiles: dict[str, dict[str, float]], path: str) -> None:
    """The results so far as JSON and Markdown (after each configuration: a long run keeps what it measured)."""
    results["bench_process_peak_rss_gb"] = peak_rss_gb()
    results["machine"] = f"{cpu_kind()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    results["profiles"] = profiles
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(results))


TARGETS = {
    "lora_rollout_vs_generate": ">= 1.0 (stretch 1.3)",
    "lora_update_vs_floor_T": "<= 1.3",
    "lora_update_vs_floor_2T": "<= 1.3",
    "full_update_vs_floor_T": "<= 1.3",
    "full_update_vs_floor_2T": "<= 1.3",
    "train_peak_rss_gb": "<= 4",
}


def report(results: dict[str, Any]) -> str:
    """The results as a Markdown table, then one table per profiled phase."""
    lines = ["# Rollout and update speed of textgen train's configuration", "", f"Command: `{results['command']}`"]
    lines += ["", "| measurement | value | target |", "|---|---|---|"]
    for key, value in results.items():
        if key in ("command", "profiles"):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} | {TARGETS.get(key, '')} |")
    for phase, timers in results["profiles"].items():
        total = max(timers.values())
        lines += ["", f"### Where the time goes: {phase}", "", "| phase | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v / total:.0%} |" for k, v in timers.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
