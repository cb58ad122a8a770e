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
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.train import pyplot
from text_env.extras import MissingExtra, require

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
    """What the methods share, as :class:`agents.run.TrainConfig` fields (each method starts from its preset:
    ``TrainConfig.for_algo``), and per-method overrides. The default budget is a fifth of ``textgen train``'s."""

    shared: dict[str, Any] = field(default_factory=lambda: {"total_timesteps": 2048, "eval_prompts": 32})
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config(self, method: str, seed: int = 0) -> Any:
        """The run settings of ``method`` (non-learners: those of ``ppo``, for the env and the LM)."""
        from agents.run import TrainConfig

        algo = method if method in LM_LEARNERS + PRIORLESS_LEARNERS else "ppo"
        return TrainConfig.for_algo(algo, seed=seed, **self.shared, **self.overrides.get(method, {}))


# --- one run ---------------------------------------------------------------------------------------------------


def _uniform(vocab: int) -> Any:
    def sample(obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = obs["input_ids"].shape[0]
        return torch.randint(vocab, (n,)), torch.full((n,), -math.log(vocab))

    return sample


class Skipped(Exception):
    """A method that cannot run here (an optional package is missing); its row says why."""


def _trl_grpo(cfg: Any, spaces: tuple[Any, Any]) -> tuple[Any, list[dict[str, float]], float]:
    """TRL's GRPO on the same model, reward model, prompts and token budget; returns the tuned policy for evaluate.

    Differences from the SB3 learners, by TRL's design: 8 completions per prompt with group-normalised rewards
    (no critic), and the KL term (beta = ``cfg.beta``, TRL's k3 estimator) sits in the loss, not in the reward.

    :param cfg: the :class:`agents.run.TrainConfig` of ``ppo`` (model, reward model, budget, LoRA rank, lr).
    """
    try:
        require("trl", "the GRPO anchor")
    except MissingExtra as err:
        raise Skipped(str(err)) from None
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from agents.policies import CausalLMPolicy
    from text_env.core import resolve_reward
    from text_env.models import load_causal_lm, load_tokenizer
    from text_env.prompts import columns_of, render_prompt
    from text_env.rewards import call_scorer
    from text_env.tasks import get_task

    task = get_task(cfg.task)
    tokenizer = load_tokenizer(cfg.model)
    reward_model = resolve_reward(cfg.reward_model, task)
    # what the env shows -> the record it came from (its references and meta are the scorers' columns)
    rendered = {render_prompt(tokenizer, e.prompt, task.instruction): e for e in task.examples("train")}
    new_tokens = cfg.max_new_tokens or task.max_new_tokens
    batch, generations = 16, 8
    curve: list[dict[str, float]] = []

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        examples = [rendered[p] for p in prompts]
        originals, columns = [e.prompt for e in examples], columns_of(examples)
        scores = call_scorer(reward_model, originals, completions, columns, "reward_model")
        gold = call_scorer(task.gold, originals, completions, columns, "gold scorer")
        tokens = (len(curve) + 1) * batch * new_tokens
        curve.append({"timesteps": float(tokens), "reward_model_score": float(np.mean(scores)),
                      "gold_score": float(np.mean(gold))})  # fmt: skip
        return [float(x) for x in scores]

    with tempfile.TemporaryDirectory() as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp, learning_rate=cfg.learning_rate, beta=cfg.beta, num_generations=generations,
            per_device_train_batch_size=batch, max_completion_length=new_tokens, temperature=1.0, top_k=0,
            max_steps=max(1, math.ceil(cfg.total_timesteps / (batch * new_tokens))), seed=cfg.seed, use_cpu=True,
            bf16=cfg.bf16, activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=load_causal_lm(cfg.model), reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": list(rendered)}), peft_config=LoraConfig(r=cfg.lora_r),
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
    from agents.evaluate import evaluate
    from agents.policies import CausalLMPolicy
    from agents.run import build_run, make_env
    from text_env.tasks import get_task

    torch.manual_seed(seed)
    config = cfg.config(method, seed)
    result: dict[str, Any] = {"method": method, "seed": seed, "curve": []}
    started = time.time()
    if method in LM_LEARNERS + PRIORLESS_LEARNERS:
        run = build_run(config, verbose=0)  # the same envs, masks, policy, buffer and callbacks as textgen train
        run.algo.learn(config.total_timesteps, callback=run.callbacks())
        result["train_seconds"] = time.time() - started
        result["steps_per_second"] = config.total_timesteps / result["train_seconds"]
        result["curve"] = run.metrics.history
        evaluation = run.evaluate()
    else:
        eval_env = make_env(config, "eval")
        prompts = get_task(config.task).examples("eval")[: config.eval_prompts]
        if method in EXTERNAL:
            policy, result["curve"], result["train_seconds"] = _trl_grpo(
                config, (eval_env.observation_space, eval_env.action_space)
            )
            result["steps_per_second"] = result["curve"][-1]["timesteps"] / result["train_seconds"]  # at most
            evaluation = evaluate(policy, eval_env, prompts, seed=seed, reference=config.model)  # KL to the base
        else:
            n = int(method.removeprefix("best_of_")) if method.startswith("best_of_") else 1
            if method == "random":
                policy: Any = _uniform(int(eval_env.action_space.n))  # type: ignore[attr-defined]
            else:
                space = eval_env.observation_space, eval_env.action_space
                policy = CausalLMPolicy(*space, lambda _: 0.0, model=config.model, bf16=config.bf16)
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
    from agents.train import peak_rss_gb

    try:
        result = run_one(method, seed, cfg)
        result["peak_rss_gb"] = peak_rss_gb()  # VmHWM: ru_maxrss would carry the parent's peak over exec
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


def markdown(
    summary: dict[str, dict[str, Any]], cfg: BenchConfig, command: str, machine: str, seeds: int, model: str
) -> str:
    base, trpo = cfg.config("ppo"), cfg.config("trpo")
    lines = [
        "# Algorithms compared on TextGen-v0",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}. Task `{base.task}`, model `{model}`, reward model "
        f"`{base.reward_model or 'the task default'}`; every learner gets {base.total_timesteps} environment steps "
        f"(tokens) in rollouts of {base.n_envs} envs x {base.n_steps} steps, KL penalty beta = {base.beta} to the "
        f"same reference LM. LoRA r={base.lora_r} at lr {base.learning_rate} for the LM learners except TRPO, "
        f"which fine-tunes the top {trpo.train_layers} blocks at lr {trpo.learning_rate} (sb3-contrib TRPO runs a "
        f"double-backward pass per trainable tensor) with {trpo.algo_kwargs}; settings: agents.run.PRESETS. "
        f"Every method is evaluated on the same {base.eval_prompts} held-out prompts. "
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


def plot(
    runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], out: Path, name: str, gold_name: str = "gold scorer"
) -> list[Path]:
    """Scores vs environment steps (learners; references as dashed lines), and gold score vs KL."""
    plt = pyplot()
    colors = {method: plt.get_cmap("tab20")(i % 20) for i, method in enumerate(summary)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    panels = (("gold_score", f"gold ({gold_name})"), ("reward_model_score", "reward model"))
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


def _quick_config(tmp: Path, task: str = "positive-review") -> BenchConfig:
    """A tiny random LM and the gold reward: checks the harness end to end in seconds, on any task."""
    from text_env.models import make_tiny_model
    from text_env.tasks import get_task

    # The tiny LM's 128-token BPE splits text about 2.6x finer than SmolLM2's: 3x the task's room for the prompt.
    room = 3 * get_task(task).max_prompt_tokens
    model = make_tiny_model(tmp / "tiny-lm", max_positions=room + 64)
    shared = dict(
        task=task, model=str(model), reward_model="gold", total_timesteps=96, n_envs=4, n_steps=8, batch_size=16,
        eval_prompts=4, max_new_tokens=6, max_prompt_tokens=room, bf16=False,
    )  # fmt: skip
    # TRPO's Fisher-vector products differentiate the pass twice, through the math attention kernel: on the long
    # prompts of summarize-docstring each costs seconds even for the tiny LM, so the quick run solves with one.
    return BenchConfig(
        shared, {"trpo": {"algo_kwargs": {"cg_max_steps": 1, "n_critic_updates": 1, "line_search_max_iter": 1}}}
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random LM, gold reward, 2 seeds: seconds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (3; --quick: 2)")
    parser.add_argument("--task", default=None, help="task of every method (positive-review)")
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
    cfg = _quick_config(Path(tmp.name), args.task or "positive-review") if args.quick else BenchConfig()
    for key, field_name in (("task", "task"), ("model", "model"), ("reward_model", "reward_model"),
                            ("timesteps", "total_timesteps"), ("eval_prompts", "eval_prompts")):  # fmt: skip
        if getattr(args, key) is not None:
            cfg.shared[field_name] = getattr(args, key)
    seeds = args.seeds or (2 if args.quick else 3)
    in_process = args.in_process or args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("compare_algorithms_quick" if args.quick else "compare_algorithms")

    model = "tiny random LM (make_tiny_model)" if args.quick else cfg.shared.get("model", "default")
    config = asdict(cfg) | {"shared": cfg.shared | {"model": model}}
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
    table = markdown(summary, cfg, command.strip(), machine, seeds, model)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps({"config": config, "summary": summary, "runs": runs}, indent=1))
    from text_env.rewards import scorer_name
    from text_env.tasks import get_task

    pngs = plot(runs, summary, out, name, scorer_name(get_task(cfg.config("ppo").task).gold))
    print(table)
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    print("wrote", ", ".join(str(p) for p in [out / f"{name}.md", out / f"{name}.json", *pngs]))
    tmp.cleanup()
    return {"summary": summary, "runs": runs}


if __name__ == "__main__":
    main()
