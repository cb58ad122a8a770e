"""Every method on the same task, model, reward model, prompts and environment-step budget, over several seeds.

Learners (all leashed by the same per-token KL penalty, ``agents.kl.KLPenalty``, to the same reference LM):
SB3 ``PPO``, ``A2C``, sb3-contrib ``TRPO`` with ``CausalLMPolicy``; ``MaskablePPO`` with top-p masks from the
reference (NLPO-style); and, without an LM prior, ``PPO("MultiInputPolicy")`` on a bag of token embeddings and
``RecurrentPPO`` with a token-level LSTM. References that do not learn: uniform random tokens, the base LM's own
samples, and best-of-n sampling with the reward model (n = 4, 16). An external anchor: TRL's ``GRPOTrainer`` on the
same model, reward model, prompts and token budget (optional extra ``trl``). Every method is then measured by
``agents.evaluate.evaluate`` on the same held-out prompts, each (method, seed) in its own process.

Run::

    python benchmarks/compare_algorithms.py --quick   # a tiny random LM and the gold reward: seconds (CI runs it)
    python benchmarks/compare_algorithms.py           # the embedded default model: see benchmarks/results/

Writes ``<out>/<name>.md`` (table, command, machine), ``<name>.json`` (every run, with its learning curve),
``<name>_curves.png`` (scores vs environment steps) and ``<name>_frontier.png`` (gold score vs KL).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

LM_LEARNERS = ("ppo", "a2c", "trpo", "maskable_ppo")
PRIORLESS_LEARNERS = ("ppo_bag_of_tokens", "recurrent_ppo_lstm")
REFERENCES = ("random", "base_lm", "best_of_4", "best_of_16")
EXTERNAL = ("trl_grpo",)  # needs the optional `trl` package; skipped with a message without it
METHODS = LM_LEARNERS + PRIORLESS_LEARNERS + REFERENCES + EXTERNAL
LABELS = {
    "ppo": "PPO + CausalLMPolicy (LoRA)",
    "a2c": "A2C + CausalLMPolicy (LoRA)",
    "trpo": "TRPO + CausalLMPolicy (top 2 blocks)",
    "maskable_ppo": "MaskablePPO + top-p masks (NLPO, LoRA)",
    "ppo_bag_of_tokens": "PPO MultiInputPolicy, bag of tokens (no LM)",
    "recurrent_ppo_lstm": "RecurrentPPO, token LSTM (no LM)",
    "random": "uniform random tokens",
    "base_lm": "base LM samples",
    "best_of_4": "best-of-4 (reward model)",
    "best_of_16": "best-of-16 (reward model)",
    "trl_grpo": "TRL GRPOTrainer (LoRA; external anchor)",
}
METRICS = ("reward_model_score", "gold_score", "kl", "distinct_1", "distinct_2", "perplexity", "length")


@dataclass
class BenchConfig:
    """What every method shares. ``timesteps`` is each learner's environment-step (token) budget."""

    model: str = "default"
    task: str = "positive-review"
    reward_model: str | None = None  # None: the task's default (its shipped learned reward model)
    timesteps: int = 2048
    n_envs: int = 16
    n_steps: int = 32
    batch_size: int = 128
    beta: float = 0.05
    eval_prompts: int = 32
    max_new_tokens: int | None = None
    max_prompt_tokens: int | None = None
    bf16: bool = True
    # Per-method algorithm keyword overrides. TRPO's defaults (15 conjugate-gradient steps, 10 critic epochs per
    # rollout) would make it 3x slower than PPO per step here; the cut is part of what is benchmarked.
    extra: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"trpo": {"cg_max_steps": 5, "n_critic_updates": 2}}
    )


# --- one run ---------------------------------------------------------------------------------------------------


def _learner(method: str, env: Any, cfg: BenchConfig, seed: int) -> Any:
    """The SB3 algorithm for ``method``."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO

    from agents.baselines import BagOfTokens, LastTokenEmbedding
    from agents.train import TrainConfig, make_algorithm

    extra = cfg.extra.get(method, {})
    if method in LM_LEARNERS:
        trpo = method == "trpo"  # one double-backward pass per trainable tensor: the top blocks, not LoRA
        config = TrainConfig(
            model=cfg.model, algo=method, total_timesteps=cfg.timesteps, n_envs=cfg.n_envs, n_steps=cfg.n_steps,
            batch_size=cfg.batch_size, learning_rate=1e-5 if trpo else 1e-4, bf16=cfg.bf16,
            lora=None if trpo else {"r": 16}, train_layers=2 if trpo else None, seed=seed, extra=extra,
        )  # fmt: skip
        algo = make_algorithm(config, env)
        algo.verbose = 0
        return algo
    common = dict(n_steps=cfg.n_steps, learning_rate=3e-4, gamma=1.0, seed=seed, **extra)
    if method == "ppo_bag_of_tokens":
        kwargs = dict(features_extractor_class=BagOfTokens)
        return PPO("MultiInputPolicy", env, batch_size=cfg.batch_size, policy_kwargs=kwargs, **common)
    if method == "recurrent_ppo_lstm":
        kwargs = dict(features_extractor_class=LastTokenEmbedding)
        lstm = RecurrentPPO("MultiInputLstmPolicy", env, batch_size=cfg.batch_size, policy_kwargs=kwargs, **common)
        return lstm
    raise ValueError(f"{method} is not a learner")


def _uniform(vocab: int) -> Any:
    def sample(obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = obs["input_ids"].shape[0]
        return torch.randint(vocab, (n,)), torch.full((n,), -math.log(vocab))

    return sample


class Skipped(Exception):
    """A method that cannot run here (an optional package is missing); its row says why."""


def _trl_grpo(cfg: BenchConfig, seed: int, spaces: tuple[Any, Any]) -> tuple[Any, list[dict[str, float]], float]:
    """TRL's GRPO on the same model, reward model, prompts and token budget; returns the tuned policy for evaluate.

    Differences from the SB3 learners, by TRL's design: 8 completions per prompt with group-normalised rewards
    (no critic), and the KL term (beta = ``cfg.beta``, TRL's k3 estimator) sits in the loss, not in the reward.
    """
    try:
        import trl
    except ImportError:
        raise Skipped("trl is not installed: pip install 'textgen-rl[trl]'") from None
    from datasets import Dataset
    from peft import LoraConfig

    from agents.policies import CausalLMPolicy
    from text_env.core import resolve_reward
    from text_env.models import load_causal_lm, load_tokenizer
    from text_env.prompts import render_prompt
    from text_env.tasks import get_task

    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    reward_model = resolve_reward(cfg.reward_model, task)
    rendered = {render_prompt(tokenizer, p, task.instruction): p for p in task.train_prompts}  # what the env shows
    new_tokens = cfg.max_new_tokens or task.max_new_tokens
    batch, generations = 16, 8
    curve: list[dict[str, float]] = []

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        originals = [rendered[p] for p in prompts]
        scores = reward_model.score(originals, completions)
        gold = task.gold.score(originals, completions)
        tokens = (len(curve) + 1) * batch * new_tokens
        curve.append({"timesteps": float(tokens), "reward_model_score": float(np.mean(scores)),
                      "gold_score": float(np.mean(gold))})  # fmt: skip
        return [float(x) for x in scores]

    with tempfile.TemporaryDirectory() as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp, learning_rate=1e-4, beta=cfg.beta, num_generations=generations,
            per_device_train_batch_size=batch, max_completion_length=new_tokens, temperature=1.0, top_k=0,
            max_steps=max(1, math.ceil(cfg.timesteps / (batch * new_tokens))), seed=seed, use_cpu=True,
            bf16=cfg.bf16, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=load_causal_lm(cfg.model), reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": list(rendered)}), peft_config=LoraConfig(r=16),
        )  # fmt: skip
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        tuned = Path(tmp) / "tuned"
        trainer.model.merge_and_unload().save_pretrained(tuned)
        tokenizer.save_pretrained(tuned)
        policy = CausalLMPolicy(*spaces, lambda _: 0.0, model=str(tuned), bf16=cfg.bf16)  # weights load here
    return policy, curve, seconds


def run_one(method: str, seed: int, cfg: BenchConfig) -> dict[str, Any]:
    """Train (learners) and evaluate one method with one seed; return its metrics and learning curve."""
    from stable_baselines3.common.callbacks import CallbackList

    from agents.callbacks import TextMetrics
    from agents.evaluate import evaluate
    from agents.kl import KLPenalty
    from agents.masks import TopPMask
    from agents.policies import CausalLMPolicy
    from text_env.core import resolve_reward
    from text_env.tasks import get_task
    from text_env.vec_env import make_text_vec_env

    torch.manual_seed(seed)
    task = get_task(cfg.task)
    env_kwargs = dict(
        model=cfg.model, task=task, reward_model=resolve_reward(cfg.reward_model, task),
        max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_tokens,
    )  # fmt: skip
    eval_env = make_text_vec_env(cfg.n_envs, seed=seed, split="eval", **env_kwargs)
    prompts = task.eval_prompts[: cfg.eval_prompts]
    result: dict[str, Any] = {"method": method, "seed": seed, "curve": []}
    started = time.time()
    if method in LM_LEARNERS + PRIORLESS_LEARNERS:
        env = make_text_vec_env(cfg.n_envs, seed=seed, **env_kwargs)
        algo = _learner(method, env, cfg, seed)
        metrics = TextMetrics()
        algo.learn(cfg.timesteps, callback=CallbackList([KLPenalty(cfg.beta), metrics]))
        result["train_seconds"] = time.time() - started
        result["steps_per_second"] = cfg.timesteps / result["train_seconds"]
        result["curve"] = metrics.history
        if method == "maskable_ppo":
            eval_env = TopPMask(eval_env, cfg.model, top_p=0.9, bf16=cfg.bf16)
        evaluation = evaluate(algo.policy, eval_env, prompts, seed=seed)
    elif method in EXTERNAL:
        policy, result["curve"], result["train_seconds"] = _trl_grpo(
            cfg, seed, (eval_env.observation_space, eval_env.action_space)
        )
        result["steps_per_second"] = result["curve"][-1]["timesteps"] / result["train_seconds"]  # at most
        evaluation = evaluate(policy, eval_env, prompts, seed=seed, reference=cfg.model)  # KL to the base model
    else:
        n = int(method.removeprefix("best_of_")) if method.startswith("best_of_") else 1
        if method == "random":
            policy: Any = _uniform(int(eval_env.action_space.n))  # type: ignore[attr-defined]
        else:
            space = eval_env.observation_space, eval_env.action_space
            policy = CausalLMPolicy(*space, lambda _: 0.0, model=cfg.model, bf16=cfg.bf16)
        samples = evaluate(policy, eval_env, [p for p in prompts for _ in range(n)], seed=seed)
        result["train_seconds"] = time.time() - started  # sampling is all the work these methods do
        result["steps_per_second"] = float(samples.n_tokens.sum()) / result["train_seconds"]
        best = samples.reward_model_score.reshape(len(prompts), n).argmax(1) + n * np.arange(len(prompts))
        evaluation = samples.select(best)
        if n > 1:  # KL of best-of-n to its base: log n - (n-1)/n (Stiennon et al. 2020)
            evaluation.kl[:] = math.log(n) - (n - 1) / n
    result.update(evaluation.summary)
    result["eval_samples"] = [
        {"prompt": p, "completion": c} for p, c in zip(evaluation.prompts[:3], evaluation.completions[:3], strict=True)
    ]
    result["total_seconds"] = time.time() - started
    return result


def run_isolated(method: str, seed: int, cfg: BenchConfig) -> dict[str, Any]:
    """:func:`run_one` in a fresh Python process, so that its peak RSS is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--run-one", method, "--seed", str(seed), "--result", str(out),
                   "--config-json", json.dumps(asdict(cfg))]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
            why = f"killed by signal {-done.returncode} (9: out of memory?)" if done.returncode < 0 else "failed"
            return {"method": method, "seed": seed, "error": errors[-1:] or [why]}
        return json.loads(out.read_text())


def _child(method: str, seed: int, cfg: BenchConfig, out: Path) -> None:
    try:
        result = run_one(method, seed, cfg)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    except Skipped as why:
        result = {"method": method, "seed": seed, "error": [f"skipped: {why}"]}
    out.write_text(json.dumps(result))


# --- aggregation and reporting -----------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean and std over seeds of every metric, and the errors of failed runs."""
    table: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        ok = [r for r in runs if r["method"] == method and "error" not in r]
        errors = [r["error"] for r in runs if r["method"] == method and "error" in r]
        row: dict[str, Any] = {"seeds": len(ok), "errors": errors}
        for key in (*METRICS, "train_seconds", "steps_per_second", "peak_rss_gb"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                row[key] = (float(np.mean(values)), float(np.std(values)))
        table[method] = row
    return table


def _cell(row: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in row:
        return "—"
    mean, std = row[key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict[str, dict[str, Any]], cfg: BenchConfig, command: str, machine: str, seeds: int) -> str:
    lines = [
        "# Algorithms compared on TextGen-v0",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Task `{cfg.task}`, model `{cfg.model}`, reward model "
        f"`{cfg.reward_model or 'the task default'}`; every learner gets {cfg.timesteps} environment steps "
        f"(tokens) in rollouts of {cfg.n_envs} envs x {cfg.n_steps} steps, KL penalty beta = {cfg.beta} to the "
        f"same reference LM. LoRA r=16 at lr 1e-4 for the LM learners except TRPO, which fine-tunes the top 2 "
        f"blocks (sb3-contrib TRPO runs a double-backward pass per trainable tensor) with "
        f"{cfg.extra.get('trpo', {})}. Every method is evaluated on the same {cfg.eval_prompts} held-out prompts. "
        f"Mean ± std over {seeds} seeds. KL: nats per completion (best-of-n: the analytic log n - (n-1)/n); "
        "perplexity: of the completions under the reference LM; wall s: training (learners) or sampling "
        "(references) time; steps/s: environment steps (tokens) per second of that time; peak RSS: of the "
        "process that ran the method.",
        "",
        "| method | reward model | gold | KL | distinct-1 | distinct-2 | perplexity | wall s | steps/s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        cells = [
            _cell(row, "reward_model_score"), _cell(row, "gold_score"), _cell(row, "kl", 2),
            _cell(row, "distinct_1"), _cell(row, "distinct_2"), _cell(row, "perplexity", 1),
            _cell(row, "train_seconds", 0), _cell(row, "steps_per_second", 1), _cell(row, "peak_rss_gb", 2),
        ]  # fmt: skip
        if row["errors"]:
            cells[-1] += f" ({len(row['errors'])} failed: {row['errors'][0]})"
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Scores vs environment steps (learners; references as dashed lines), and gold score vs KL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'textgen-rl[plots]'): no plots")
        return []
    colors = {method: plt.get_cmap("tab20")(i % 20) for i, method in enumerate(summary)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    panels = (("gold_score", "gold (VADER)"), ("reward_model_score", "reward model"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, row in summary.items():
            curves = [r["curve"] for r in runs if r["method"] == method and r.get("curve")]
            if curves:
                n = min(len(c) for c in curves)
                steps = np.array([c[i]["timesteps"] for i in range(n) for c in curves[:1]])
                values = np.array([[c[i][key] for i in range(n)] for c in curves])  # (seeds, rollouts)
                mean, std = values.mean(0), values.std(0)
                ax.plot(steps, mean, label=LABELS.get(method, method), color=colors[method])
                ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.15)
            elif key in row:
                ax.axhline(row[key][0], ls="--", lw=1, color=colors[method], label=LABELS.get(method, method))
        ax.set_title(f"{title} score of training episodes (dashed: references, on held-out prompts)", fontsize=9)
        ax.set_xlabel("environment steps (tokens)")
        ax.set_ylabel("mean score")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    curves_png = out / f"{name}_curves.png"
    fig.savefig(curves_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, row in summary.items():
        if "kl" in row and "gold_score" in row:
            (kl, kl_std), (gold, gold_std) = row["kl"], row["gold_score"]
            ax.errorbar(kl, gold, xerr=kl_std, yerr=gold_std, fmt="o", color=colors[method],
                        label=LABELS.get(method, method), capsize=3)  # fmt: skip
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL to the reference LM (nats per completion, symlog)")
    ax.set_ylabel("gold score on held-out prompts")
    ax.set_title("reward–KL frontier: up and to the left is better", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    frontier_png = out / f"{name}_frontier.png"
    fig.savefig(frontier_png, dpi=100)
    plt.close(fig)
    return [curves_png, frontier_png]


# --- command line ------------------------------------------------------------------------------------------------


def _quick_config(tmp: Path) -> BenchConfig:
    """A tiny random LM and the gold reward: checks the harness end to end in seconds."""
    from text_env.models import make_tiny_model

    model = make_tiny_model(tmp / "tiny-lm")
    return BenchConfig(
        model=str(model), reward_model="gold", timesteps=96, n_envs=4, n_steps=8, batch_size=16, eval_prompts=4,
        max_new_tokens=6, max_prompt_tokens=128, bf16=False,
        extra={"trpo": {"cg_max_steps": 2, "n_critic_updates": 1, "line_search_max_iter": 2}},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random LM, gold reward, 2 seeds: seconds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (3; --quick: 2)")
    parser.add_argument("--model", default=None, help="LM of every method ('default')")
    parser.add_argument("--reward-model", default=None, help="reward-model directory or 'gold' (task default)")
    parser.add_argument("--timesteps", type=int, default=None, help="environment steps per learner (2048)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per evaluation (32)")
    parser.add_argument("--out", default="benchmarks/results", help="results directory (%(default)s)")
    parser.add_argument("--name", default=None, help="results file stem (compare_algorithms[_quick])")
    parser.add_argument("--in-process", action="store_true", help="run methods here, not one process each (no RSS)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished runs of an earlier result (same settings)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="with --resume: rewrite table and plots, run nothing"
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:  # child process of run_isolated
        _child(args.run_one, args.seed, BenchConfig(**json.loads(args.config_json)), Path(args.result))
        return {}

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        torch.set_num_threads(1)  # a tiny model is fastest on one thread
    cfg = _quick_config(Path(tmp.name)) if args.quick else BenchConfig()
    for key in ("model", "reward_model", "timesteps", "eval_prompts"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    seeds = args.seeds or (2 if args.quick else 3)
    in_process = args.in_process or args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("compare_algorithms_quick" if args.quick else "compare_algorithms")

    config = asdict(cfg) | ({"model": "tiny random LM (make_tiny_model)"} if args.quick else {})
    runs: list[dict[str, Any]] = []
    for earlier in (out / f"{name}.json", out / f"{name}.partial.json"):
        if args.resume and earlier.exists():
            data = json.loads(earlier.read_text())
            if data["config"] != config:
                parser.error(f"--resume: {earlier} was made with other settings: {data['config']}")
            runs = [r for r in data["runs"] if "error" not in r]
    finished = {(r["method"], r["seed"]) for r in runs}
    for seed in range(seeds):  # seeds outermost: an interrupted run still has whole seeds of every method
        for method in methods:
            if (method, seed) in finished or args.report_only:
                continue
            print(f"{method} seed {seed} ...", end=" ", flush=True)
            if in_process:
                try:
                    run = run_one(method, seed, cfg)
                except Skipped as why:
                    run = {"method": method, "seed": seed, "error": [f"skipped: {why}"]}
                except Exception as error:  # a failed method is a row that says so, not a lost benchmark
                    traceback.print_exc()
                    run = {"method": method, "seed": seed, "error": [f"{type(error).__name__}: {error}"]}
            else:
                run = run_isolated(method, seed, cfg)
            runs.append(run)
            (out / f"{name}.partial.json").write_text(json.dumps({"config": config, "runs": runs}))
            print(run.get("error") or f"gold {run['gold_score']:.3f}, KL {run['kl']:.2f}, {run['total_seconds']:.0f} s")
    runs = [r for r in runs if r["method"] in methods and r["seed"] < seeds]
    runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))  # table and plots in --methods order
    summary = summarize(runs)
    command = "python benchmarks/compare_algorithms.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}"
    )
    table = markdown(summary, replace(cfg, model=config["model"]), command.strip(), machine, seeds)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs}, indent=1))
    pngs = plot(runs, summary, out, name)
    print(table)
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    print("wrote", ", ".join(str(p) for p in [out / f"{name}.md", out / f"{name}.json", *pngs]))
    tmp.cleanup()
    return {"summary": summary, "runs": runs}


if __name__ == "__main__":
    main()
