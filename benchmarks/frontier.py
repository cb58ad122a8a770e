"""Which method, at what KL, at what cost: held-out gold against KL for every method, with Gao et al.'s fits.

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization") fit the gold gain against d = sqrt(KL): best-of-n
follows R(d) = d(alpha - beta d), RL follows R(d) = d(alpha - beta ln d). This benchmark measures both kinds on the
same task, model, reward model, held-out prompts and seeds, at several points of each method:

- ``ppo``, ``a2c``, ``nlpo`` (MaskablePPO with top-p masks): ``textgen train --algo ... --eval-every K``, so the
  held-out prompts are evaluated at evenly spaced updates, plus before and after;
- ``rloo``, ``grpo``: TRL's trainers set up as ``benchmarks/trl_comparison.py`` sets them (same LoRA, prompts rendered
  as the env renders them, reward model, beta, learning rate, completion length, tokens), their adapters copied into
  a ``CausalLMPolicy`` and evaluated at evenly spaced steps;
- ``dpo``: TRL's ``DPOTrainer``, offline, one epoch over the first ``--dpo-pairs`` of the train split of the pairs
  the task's reward model was fitted on, at each beta of ``--dpo-betas``, evaluated at evenly spaced steps;
- ``best_of_n``: n = 1, 2, 4, ..., 64 from one pool of 64 base samples per held-out prompt. Gold, reward-model score
  and perplexity are the expectation over the pool of the best of n drawn with replacement; the KL is that of the
  best-of-n distribution on the pool to a single draw from it (:func:`best_of_n`), beside the bound
  log n - (n - 1)/n: it reaches the bound for distinct rewards and a large pool, and falls below it where samples
  tie (repeated completions).

Every point: held-out gold and reward-model score, KL to the base model on samples, distinct-2, perplexity, training
seconds and tokens generated so far, and samples scored per answer (n for best-of-n, 1 for the rest). Each method
and seed is its own process and its own JSON under ``<out>/frontier_cells`` (committed), so a stopped benchmark resumes,
on another machine too; a learner's run stopped midway continues from its last checkpoint where ``--work`` survived
(the TRL and best-of-n cells start again). Run::

    python benchmarks/frontier.py --work WORK          # positive-review and concepts, 3 seeds, every method
    python benchmarks/frontier.py --tasks positive-review --methods ppo,best_of_n --seeds 1 --work WORK
    python benchmarks/frontier.py --tasks positive-review --table-only   # the kept cells' table, whatever seeds
    python benchmarks/frontier.py --quick              # a tiny model, one point per method (CI)

Writes ``<out>/frontier.md`` (per KL budget of 2, 4, 8, 12 nats: each method's gold, mean +- std over seeds from each
seed's fitted curve, and its training and inference cost there; the fits; every method at the highest KL that all
reached, where they compare even below the first budget; PPO against best-of-16), ``frontier.json``
(every point, every fit) and ``frontier.png`` (gold gain against sqrt(KL), points and fitted curves, per task).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from textgen_train_seeds import run_textgen

TASKS = ("positive-review", "concepts")  # both ship a learned reward model and the pairs it was fitted on
LEARNERS = {"ppo": "ppo", "a2c": "a2c", "nlpo": "maskable_ppo"}  # method -> textgen train --algo
TRL_ONLINE = ("rloo", "grpo")
METHODS = (*LEARNERS, *TRL_ONLINE, "dpo", "best_of_n")
ABLATIONS: dict[str, dict[str, Any]] = {  # PPO variants at the default budget (Xu et al. 2024: what made PPO win)
    "ppo_no_adv_norm": {"advantage_normalization": "none"},
    "ppo_4x_batch": {"n_envs": 64},  # 4x the tokens per rollout, the same total: a quarter of the updates
    "ppo_ref_ema": {"ref_ema": 0.1},  # the reference 10 % of the way to the policy after each update
    "ppo_prompt_group": {"prompt_group": 4},  # RLOO's per-prompt baseline in PPO's rewards (4 answers per prompt)
}
BUDGETS = (2.0, 4.0, 8.0, 12.0)  # KL, nats per completion
METRICS = ("gold_score", "reward_model_score", "kl", "distinct_2", "perplexity")


@dataclass
class Settings:
    """What every method shares (``textgen train``'s defaults unless set) and how many points each takes."""

    points: int = 5  # evaluations along training, the last one after training
    pool: int = 64  # best-of-n: base samples per held-out prompt
    dpo_betas: tuple[float, ...] = (0.05, 0.1, 0.5)
    # DPO's first N train pairs, one epoch of 8 a step. positive-review's whole split (7000 pairs, 875 steps) measured
    # 18 s a step here, 4.4 h a beta; 800 (100 steps) takes about PPO's default training time. None: all of them.
    dpo_pairs: int | None = 800
    generations: int = 4  # RLOO / GRPO completions per prompt
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (--quick: the tiny model's)

    def config(self, task: str, seed: int, **more: Any) -> Any:
        from agents.run import TrainConfig

        return TrainConfig(**{"task": task, "seed": seed, **self.train, **more})


# --- one method, one seed: a list of points ----------------------------------------------------------------------


def _point(summary: dict[str, float], seconds: float, tokens: float, per_answer: float = 1.0, **more: Any) -> dict:
    row = {k: float(summary[k]) for k in METRICS}
    return {**row, "train_seconds": seconds, "tokens": tokens, "samples_per_answer": per_answer, **more}


def learner_points(method: str, task: str, seed: int, settings: Settings, out: Path) -> list[dict]:
    """``textgen train`` with ``--eval-every``: before, every k-th update, after."""
    ablation = ABLATIONS.get(method, {})
    overrides = {**settings.train, **ablation}
    config = settings.config(task, seed, **ablation)
    updates = max(1, config.total_timesteps // (config.n_envs * config.n_steps))
    every = max(1, updates // settings.points)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items() if not isinstance(v, bool)]
    flags += [f"--no-{k.replace('_', '-')}" for k, v in overrides.items() if v is False]
    options = ["--task", task, "--seed", str(seed), "--algo", LEARNERS[method.split("_")[0]],
               "--eval-every", str(every), *flags]  # fmt: skip
    report = run_textgen("train", out, options)  # a run stopped with its session resumes from its checkpoint
    points = [_point(report["before"], 0.0, 0.0)]
    evaluating = 0.0
    for row in report["held_out_history"]:
        points.append(_point(row, row["train_seconds"], row["timesteps"]))
        evaluating += row["eval_seconds"]
    points.append(_point(report["after"], report["train_seconds"] - evaluating, float(config.total_timesteps)))
    return points


class _Evaluator:
    """Held-out evaluation of a TRL model's LoRA adapters, copied into a ``CausalLMPolicy`` of the same LoRA."""

    def __init__(self, config: Any) -> None:
        from agents.run import make_env, run_task

        self.config = config
        self.env = make_env(config, "eval")
        self.prompts = list(run_task(config).examples("eval")[: config.eval_prompts])
        self.policy = None

    def __call__(self, model: Any = None) -> dict[str, float]:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from agents.evaluate import evaluate
        from agents.policies import CausalLMPolicy

        if self.policy is None:
            space = self.env.observation_space, self.env.action_space
            self.policy = CausalLMPolicy(*space, lambda _: 0.0, model=self.config.model, bf16=self.config.bf16,
                                         lora={"r": self.config.lora_r})  # fmt: skip
        if model is not None:
            set_peft_model_state_dict(self.policy.lm, get_peft_model_state_dict(model))
        return evaluate(self.policy, self.env, self.prompts, seed=self.config.seed).summary  # caches reset there


def _points_callback(evaluate: _Evaluator, at: set[int], points: list[dict], counted: dict[str, float]) -> Any:
    """A transformers ``TrainerCallback`` that evaluates the model at the given steps, its time left out."""
    from transformers import TrainerCallback

    class Points(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            counted["started"], counted["evaluating"] = time.perf_counter(), 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step not in at:
                return
            started = time.perf_counter()
            seconds = started - counted["started"] - counted["evaluating"]
            points.append(_point(evaluate(model), seconds, counted["tokens"], step=state.global_step))
            counted["evaluating"] += time.perf_counter() - started

    return Points()


def trl_points(method: str, task: str, seed: int, settings: Settings, beta: float | None = None) -> list[dict]:
    """RLOO / GRPO online, or DPO offline on the reward model's train pairs, with points along training."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from agents.policies import LORA_DEFAULTS
    from agents.run import run_task
    from text_env.core import resolve_reward
    from text_env.models import load_causal_lm, load_tokenizer
    from text_env.prompts import columns_of, render_prompt
    from text_env.rewards import call_scorer

    config = settings.config(task, seed)
    task_ = run_task(config)
    tokenizer = load_tokenizer(config.model)
    evaluate = _Evaluator(config)
    points = [_point(evaluate(), 0.0, 0.0)]
    counted = {"tokens": 0.0}
    new_tokens = config.max_new_tokens or task_.max_new_tokens
    common = dict(
        learning_rate=config.learning_rate, seed=seed, use_cpu=True, bf16=config.bf16, activation_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(**{**LORA_DEFAULTS, "r": config.lora_r})
    with tempfile.TemporaryDirectory() as tmp:
        if method == "dpo":
            pairs = dpo_pairs(task, settings.dpo_pairs)
            per_step = 8
            steps = max(1, len(pairs) // per_step)
            rows = {"prompt": [render_prompt(tokenizer, p.prompt, task_.instruction) for p in pairs],
                    "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs]}  # fmt: skip
            args: Any = trl.DPOConfig(output_dir=tmp, beta=beta, per_device_train_batch_size=per_step,
                                      max_steps=steps, **common)  # fmt: skip
            at = {round(steps * (k + 1) / settings.points) for k in range(settings.points)}
            trainer: Any = trl.DPOTrainer(model=load_causal_lm(config.model), args=args, processing_class=tokenizer,
                                          train_dataset=Dataset.from_dict(rows), peft_config=lora)  # fmt: skip
        else:
            reward_model = resolve_reward(config.reward_model, task_, config.reward_kwargs)
            rendered = {render_prompt(tokenizer, e.prompt, task_.instruction): e for e in task_.examples("train")}

            def reward(prompts: list[str], completions: list[str], completion_ids: list, **_: Any) -> list[float]:
                examples = [rendered[p] for p in prompts]
                scores = call_scorer(reward_model, [e.prompt for e in examples], completions, columns_of(examples),
                                     "reward")  # fmt: skip
                counted["tokens"] += sum(len(ids) for ids in completion_ids)
                return [float(x) for x in scores]

            per_step = config.batch_size // config.n_steps  # PPO's minibatch, in completions
            updates = max(1, config.total_timesteps // (config.n_envs * new_tokens))  # the same tokens as PPO
            steps = updates * config.n_epochs * (config.n_envs // per_step)
            at = {round(steps * (k + 1) / settings.points) for k in range(settings.points)}
            kind = trl.GRPOConfig if method == "grpo" else trl.RLOOConfig
            args = kind(output_dir=tmp, beta=config.beta, num_generations=settings.generations,
                        generation_batch_size=config.n_envs, per_device_train_batch_size=per_step,
                        num_iterations=config.n_epochs, max_completion_length=new_tokens, temperature=1.0, top_k=0,
                        top_p=1.0, max_steps=steps, **common)  # fmt: skip
            trainer_class = trl.GRPOTrainer if method == "grpo" else trl.RLOOTrainer
            prompts = Dataset.from_dict({"prompt": list(rendered)})
            trainer = trainer_class(model=load_causal_lm(config.model), reward_funcs=reward, args=args,
                                    processing_class=tokenizer, train_dataset=prompts, peft_config=lora)  # fmt: skip
        trainer.add_callback(_points_callback(evaluate, at, points, counted))
        trainer.train()
    return points


def dpo_pairs(task: str, limit: int | None) -> list[Any]:
    """The pairs the task's shipped reward model was fitted on: its train split (:func:`split_pairs`, the settings in
    its report.json), the first ``limit`` of them."""
    from text_env.rewards.preferences import load_preferences
    from text_env.rewards.training import split_pairs
    from text_env.tasks import get_task

    directory = Path(str(get_task(task).reward_model))
    split = json.loads((directory / "report.json").read_text())["split"]
    train, _, _ = split_pairs(load_preferences(directory / "prefs.jsonl"), split["validation"], split["test"],
                              split["seed"])  # fmt: skip
    return train[:limit]


def best_of_n_points(task: str, seed: int, settings: Settings) -> list[dict]:
    """n = 1, 2, 4, ... up to the pool, from one pool of base samples per held-out prompt."""
    from agents.evaluate import distinct_n, evaluate
    from agents.policies import CausalLMPolicy
    from agents.run import make_env, run_task

    config = settings.config(task, seed)
    env = make_env(config, "eval")
    prompts = list(run_task(config).examples("eval")[: config.eval_prompts])
    policy = CausalLMPolicy(env.observation_space, env.action_space, lambda _: 0.0, model=config.model,
                            bf16=config.bf16)  # fmt: skip
    started = time.perf_counter()
    pool = evaluate(policy, env, [p for p in prompts for _ in range(settings.pool)], seed=seed)
    seconds = time.perf_counter() - started
    m = settings.pool
    shape = len(prompts), m
    rm, gold = pool.reward_model_score.reshape(shape), pool.gold_score.reshape(shape)
    columns = np.stack([gold, pool.reference_log_prob.reshape(shape), pool.n_tokens.reshape(shape), rm], -1)
    points = []
    n = 1
    while n <= m:
        expected, kls = [], []
        for scores, values in zip(rm, columns, strict=True):
            chance, mean, kl = best_of_n(scores, values, n)
            expected.append(chance @ mean)
            kls.append(kl)
        gold_n, lp_n, tokens_n, rm_n = np.array(expected).T  # (prompts,) each
        first = rm[:, :n].argmax(1)  # a concrete best of n per prompt: the distinct-2 of real answers
        chosen = [pool.completions[i * m + j] for i, j in enumerate(first)]
        summary = {
            "reward_model_score": float(rm_n.mean()), "gold_score": float(gold_n.mean()), "kl": float(np.mean(kls)),
            "distinct_2": distinct_n(chosen, 2), "perplexity": float(np.exp(-lp_n.sum() / tokens_n.sum())),
        }  # fmt: skip
        points.append(_point(summary, 0.0, float(tokens_n.mean()) * n * len(prompts), per_answer=float(n), n=n,
                             kl_bound=math.log(n) - (n - 1) / n, sampling_seconds=seconds * n / m))  # fmt: skip
        n *= 2
    return points


def best_of_n(scores: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best of ``n`` draws (with replacement) from one prompt's pool: per group of equal reward-model ``scores``,
    the chance the best falls in it (ties broken uniformly), the mean of ``values`` ``(M, C)`` in it, and the KL of
    the best of n to a single draw, sum_g P_g log(P_g / p_g). With no ties this is log n - (n - 1)/n as the pool
    grows; ties (repeated completions) bring it below."""
    levels, group = np.unique(scores, return_inverse=True)  # (G,) ascending, (M,) each sample's group
    share = np.bincount(group, minlength=len(levels)) / len(scores)  # (G,) p_g, a single draw
    below = np.concatenate([[0.0], np.cumsum(share)])  # (G + 1,) F before and after each group
    chance = below[1:] ** n - below[:-1] ** n  # (G,) P_g
    mean = np.stack([values[group == g].mean(0) for g in range(len(levels))])  # (G, C)
    kept = chance > 0
    return chance, mean, float(chance[kept] @ np.log(chance[kept] / share[kept]))


def run_cell(task: str, method: str, seed: int, settings: Settings, work: Path, cells: Path) -> dict[str, Any]:
    """One method and seed (a DPO beta is its own method, ``dpo_0.1``): its points, once. Its JSON goes to
    ``cells`` (beside the results, committed: the whole benchmark takes more CPU-hours than one machine's sitting,
    so finished cells are read back on the next), a learner's run directory to ``work``."""
    path = cells / task / method / f"seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if method.split("_")[0] in LEARNERS or method in ABLATIONS:
        runs = work / task / method / f"runs_seed{seed}"
        points = learner_points(method, task, seed, settings, runs)
    else:
        command = [sys.executable, __file__, "--cell", task, method, str(seed), "--result", str(path),
                   "--settings", json.dumps(asdict(settings))]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(path.read_text())
    result = {
        "task": task,
        "method": method,
        "seed": seed,
        "points": points,
        "wall_seconds": time.perf_counter() - started,
        **where_run(settings),
    }
    path.write_text(json.dumps(result, indent=1))
    return result


def where_run(settings: Settings) -> dict[str, Any]:
    """Where a cell ran and in which dtype (cells of one table may come from different machines)."""
    from agents.train import cpu_kind

    return {"machine": cpu_kind(), "bf16": settings.config(TASKS[0], 0).bf16}


def _child(task: str, method: str, seed: int, settings: Settings, path: Path) -> None:
    from agents.train import peak_rss_gb

    started = time.perf_counter()
    if method == "best_of_n":
        points = best_of_n_points(task, seed, settings)
    elif method.startswith("dpo_"):
        points = trl_points("dpo", task, seed, settings, beta=float(method.removeprefix("dpo_")))
    else:
        points = trl_points(method, task, seed, settings)
    seconds = time.perf_counter() - started
    result = {"task": task, "method": method, "seed": seed, "points": points, "wall_seconds": seconds,
              "peak_rss_gb": peak_rss_gb(), **where_run(settings)}  # fmt: skip
    if method.startswith("dpo_"):
        result["pairs"] = len(dpo_pairs(task, settings.dpo_pairs))
    path.write_text(json.dumps(result, indent=1))


# --- fits, budgets, report ---------------------------------------------------------------------------------------


def fit_gao(kl: np.ndarray, gain: np.ndarray, form: str) -> dict[str, float]:
    """Least squares of ``gain = d(alpha - beta d)`` (``form="bon"``) or ``d(alpha - beta ln d)`` (``"rl"``) on
    d = sqrt(KL); the peak d* (where the fitted gain is largest) and R^2."""
    d = np.sqrt(np.clip(kl, 0.0, None))
    second = d**2 if form == "bon" else d * np.log(np.where(d > 0, d, 1.0))
    features = np.stack([d, -second], 1)
    (alpha, beta), *_ = np.linalg.lstsq(features, gain, rcond=None)
    fitted = features @ np.array([alpha, beta])
    total = float(((gain - gain.mean()) ** 2).sum())
    r2 = 1.0 - float(((gain - fitted) ** 2).sum()) / total if total > 0 else float("nan")
    if beta <= 0:  # no turn within reach: the gain keeps growing
        peak = float("inf")
    elif form == "bon":
        peak = alpha / (2 * beta)
    else:
        peak = math.exp(min(alpha / beta - 1, 700.0))  # a turn beyond e^700 (a straight line's beta ~ 1e-17)
    return {"alpha": float(alpha), "beta": float(beta), "d_star": float(peak), "r2": r2, "points": len(d)}


def fitted_gain(fit: dict[str, float], kl: float, form: str) -> float:
    d = math.sqrt(kl)
    second = d**2 if form == "bon" else (d * math.log(d) if d > 0 else 0.0)
    return fit["alpha"] * d - fit["beta"] * second


def _at(kl: float, points: list[dict], key: str) -> float:
    """``key`` at ``kl``, linearly between the points (sorted by KL) on either side."""
    return float(np.interp(kl, [p["kl"] for p in points], [p[key] for p in points]))


def _form(method: str) -> str:
    return "bon" if method == "best_of_n" else "rl"


class SeedFit(NamedTuple):
    """One seed of one method: its fit, the KL range its points span, its base gold and its points."""

    fit: dict[str, float]
    low: float
    top: float
    base: float
    points: list[dict]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and method: the pooled fit (gain over each seed's base gold) and, per KL budget, the gold from each
    seed's own fit (mean, std) where that seed's points span the budget, with the training and inference cost there;
    and ``common``: every method's gold at the highest KL that every seed of every method reached, where all compare.
    A method whose every seed starts above a KL (NLPO: its top-p mask alone moves the untrained policy) is not
    extrapolated down to it: ``starts_at`` holds its lowest KL, and its ``common`` is ``None`` below that."""
    summary: dict[str, Any] = {}
    for task in sorted({r["task"] for r in results}):
        summary[task] = {}
        seeds_of: dict[str, list[SeedFit]] = {}
        for method in sorted({r["method"] for r in results if r["task"] == task}):
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            form = _form(method)
            kls, gains, per_seed = [], [], []  # per_seed: one SeedFit per seed
            for run in runs:
                points = sorted(run["points"], key=lambda p: p["kl"])  # by KL, for interpolating costs
                base = run["points"][0]["gold_score"]  # before training; best-of-1: the base model's samples
                kl = np.array([p["kl"] for p in points])
                gain = np.array([p["gold_score"] - base for p in points])
                kls.append(kl)
                gains.append(gain)
                per_seed.append(SeedFit(fit_gao(kl, gain, form), float(kl.min()), float(kl.max()), base, points))
            fit = fit_gao(np.concatenate(kls), np.concatenate(gains), form)
            budgets = {}
            for budget in BUDGETS:
                reached = [s for s in per_seed if s.low <= budget <= s.top]
                if not reached:
                    continue
                gold = [s.base + fitted_gain(s.fit, budget, form) for s in reached]
                cost = [_at(budget, s.points, "train_seconds") for s in reached]
                answer = [_at(budget, s.points, "samples_per_answer") for s in reached]
                budgets[str(budget)] = {"gold": float(np.mean(gold)), "gold_std": float(np.std(gold)),
                                        "seeds": len(reached), "train_seconds": float(np.mean(cost)),
                                        "samples_per_answer": float(np.mean(answer))}  # fmt: skip
            summary[task][method] = {"fit": fit, "budgets": budgets, "seeds": len(runs),
                                     "starts_at": min(s.low for s in per_seed),
                                     "max_kl": float(np.mean([s.top for s in per_seed])),
                                     "top_kl": max(s.top for s in per_seed)}  # fmt: skip
            seeds_of[method] = per_seed
        # a sample estimate of KL can read a hair below 0 for an untrained policy
        common = max(0.0, min(s.top for per_seed in seeds_of.values() for s in per_seed))
        for method, per_seed in seeds_of.items():
            if summary[task][method]["starts_at"] > common:
                summary[task][method]["common"] = None
                continue
            gold = [s.base + fitted_gain(s.fit, common, _form(method)) for s in per_seed]
            summary[task][method]["common"] = {
                "kl": common,
                "gold": float(np.mean(gold)),
                "gold_std": float(np.std(gold)),
            }
    return summary


def _machines(results: list[dict[str, Any]]) -> dict[str, int]:
    """How many cells ran on each machine and dtype (bf16 is on by default only where the CPU runs it natively)."""
    kinds = [f"{r.get('machine', '?')}, {'bf16' if r.get('bf16', True) else 'float32'}" for r in results]
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def markdown(summary: dict[str, Any], results: list[dict[str, Any]], command: str, machine: str) -> str:
    lines = [
        "# Gold against KL: every method, Gao et al.'s fits",
        "",
        f"Command: `{command}`",
        "",
        f"Table written on: {machine}. Cells (a method and seed each, kept in frontier_cells/) ran on: "
        + "; ".join(f"{where} ({n})" for where, n in _machines(results).items()),
        "",
    ]
    for task, methods in summary.items():
        lines += [
            f"## {task}",
            "",
            "Held-out gold at each KL budget (nats per completion): mean ± std over the seeds "
            "that reached it (at any point of training), each from its own fitted curve; training seconds and "
            "samples per answer there.",
            "",
        ]
        lines += ["| method | " + " | ".join(f"KL {b:g}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
        for method, row in methods.items():
            cells = []
            for budget in BUDGETS:
                cell = row["budgets"].get(str(budget))
                below = budget < row["starts_at"]
                cells.append(("starts above" if below else "not reached") if cell is None else
                             f"{_gold(cell, cell['seeds'])} (seeds {cell['seeds']}/{row['seeds']}, "
                             f"{cell['train_seconds']:.0f} s, {cell['samples_per_answer']:.0f}/answer)")  # fmt: skip
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| method | seeds | form | alpha | beta | d* | R² | points | highest KL (mean) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in methods.items():
            f = row["fit"]
            lines.append(f"| {method} | {row['seeds']} | {_form(method)} | {f['alpha']:.4f} | {f['beta']:.4f} | "
                         f"{_d_star(f['d_star'])} | {f['r2']:.2f} | {f['points']} | {row['max_kl']:.2f} |")  # fmt: skip
        common = next(row["common"]["kl"] for row in methods.values() if row["common"] is not None)
        compared = {method: row for method, row in methods.items() if row["common"]}
        ranked = sorted(compared.items(), key=lambda item: -item[1]["common"]["gold"])
        above = [f"{m} (its lowest KL {row['starts_at']:.2f})" for m, row in methods.items() if m not in compared]
        lines += ["", f"At {common:.2f} nats, the highest KL that every seed of every method reached, each from its "
                  "fitted curve: " + ", ".join(f"{method} {_gold(row['common'], row['seeds'])}"
                                              for method, row in ranked) + "."
                  + (f" Starting above it: {', '.join(above)}." if above else "")]  # fmt: skip
        pairs = sorted({r["pairs"] for r in results if r["task"] == task and "pairs" in r})
        if pairs:
            used = " or ".join(map(str, pairs))
            lines += ["", f"DPO: one epoch over the first {used} train pairs of the reward model."]
        if "best_of_n" in methods and (against := ppo_against_best_of_16(methods, results, task)):
            lines += ["", *against]
        lines.append("")
    return "\n".join(lines) + "\n"


def _gold(stats: dict[str, float], seeds: int) -> str:
    """``stats``' gold, ``mean ± std`` over ``seeds``; one seed has no spread to show (not ``± 0.000``)."""
    return f"{stats['gold']:.3f} ± {stats['gold_std']:.3f}" if seeds > 1 else f"{stats['gold']:.3f}"


def _d_star(d: float) -> str:
    """The fitted peak, or ``> 1000`` (``inf`` when the fit never turns): a turn that far out is no turn in reach."""
    return f"{d:.2f}" if d < 1e3 else ("inf" if math.isinf(d) else "> 1000")


def ppo_against_best_of_16(methods: dict[str, Any], results: list[dict[str, Any]], task: str) -> list[str]:
    """For PPO and each of its ablations: the KL at which its fitted gold gain reaches best-of-16's measured one (mean
    over seeds), and the inference samples that saves; a sentence each."""
    sixteen = [p["gold_score"] - r["points"][0]["gold_score"] for r in results if r["task"] == task
               and r["method"] == "best_of_n" for p in r["points"] if p.get("n") == 16]  # fmt: skip
    if not sixteen:
        return ["Best-of-16 was not measured (a pool of fewer than 16 samples per prompt)."]
    target = float(np.mean(sixteen))
    lines = []
    for method in sorted(m for m in methods if m == "ppo" or m.startswith("ppo_")):
        fit, top = methods[method]["fit"], methods[method]["top_kl"]  # as far as any seed measured
        reached = [kl for kl in np.linspace(0.01, max(top, 0.01), 400) if fitted_gain(fit, float(kl), "rl") >= target]
        lines.append(
            f"- {method} matches best-of-16's gain (+{target:.3f}) at KL {reached[0]:.2f} nats with one sample per "
            "answer: 16x fewer samples generated and scored at inference."
            if reached
            else f"- {method}'s fitted gain does not reach best-of-16's (+{target:.3f}) within its highest measured "
            f"KL ({top:.1f} nats)."
        )
    return lines


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    from agents.train import pyplot

    plt = pyplot()
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for k, (method, row) in enumerate(summary[task].items()):
            color = f"C{k % 10}"
            for run in (r for r in results if r["task"] == task and r["method"] == method):
                base = run["points"][0]["gold_score"]
                ax.scatter([math.sqrt(max(p["kl"], 0)) for p in run["points"]],
                           [p["gold_score"] - base for p in run["points"]], color=color, s=12, alpha=0.6)  # fmt: skip
            d = np.linspace(0, math.sqrt(max(row["max_kl"], 1e-3)), 100)
            ax.plot(d, [fitted_gain(row["fit"], float(x) ** 2, _form(method)) for x in d], color=color, label=method)
        ax.set(title=task, xlabel="sqrt(KL to the base model)", ylabel="held-out gold gain over the base")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quick_settings(tmp: Path) -> Settings:
    """A tiny random LM, the gold reward, one point per method: the whole harness in a minute."""
    from text_env.models import make_tiny_model
    from text_env.tasks import get_task

    # 4 envs, so that every ablation runs as it is (the prompt group has 4 answers).
    # The tiny LM's 128-token BPE splits text about 2.6x finer than SmolLM2's: 3x the tasks' room for the prompt.
    room = 3 * max(get_task(task).max_prompt_tokens for task in TASKS)
    model = make_tiny_model(tmp / "tiny-lm", max_positions=room + 64)
    train = dict(model=str(model), reward_model="gold", total_timesteps=32, n_envs=4, n_steps=8, batch_size=8,
                 max_new_tokens=4, max_prompt_tokens=room, eval_prompts=2, bf16=False, n_epochs=1)  # fmt: skip
    return Settings(points=1, pool=4, dpo_betas=(0.1,), dpo_pairs=8, generations=2, train=train)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join([*METHODS, *ABLATIONS]))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--points", type=int, default=5, help="evaluations along training (learners, TRL, DPO)")
    parser.add_argument(
        "--dpo-pairs",
        type=int,
        default=Settings.dpo_pairs,
        help="DPO on the first N train pairs, one epoch (default: %(default)s; 0: all of them)",
    )
    parser.add_argument("--dpo-betas", default="0.05,0.1,0.5", help="DPO's β, one run each")
    parser.add_argument("--work", default="frontier_work", help="the learners' run directories")
    parser.add_argument("--quick", action="store_true", help="a tiny model and one point per method (CI)")
    parser.add_argument(
        "--table-only", action="store_true", help="run nothing: the table of the kept cells there are, any seeds"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)  # a child: TASK METHOD SEED
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        settings = Settings(**{**json.loads(args.settings), "dpo_betas": tuple(json.loads(args.settings)["dpo_betas"])})
        _child(args.cell[0], args.cell[1], int(args.cell[2]), settings, Path(args.result))
        return {}
    command = " ".join(["python benchmarks/frontier.py", *(sys.argv[1:] if argv is None else argv)])
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {*METHODS, *ABLATIONS})
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join([*METHODS, *ABLATIONS])}")
    if args.dpo_pairs < 0:  # a negative slice would silently drop pairs from the end
        parser.error(f"--dpo-pairs must be 0 (all pairs) or a positive count, got {args.dpo_pairs}")
    if args.points < 1 or args.seeds < 1:
        parser.error("--points and --seeds must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        settings = (
            quick_settings(Path(tmp))
            if args.quick
            else Settings(
                points=args.points,
                dpo_pairs=args.dpo_pairs or None,
                dpo_betas=tuple(float(b) for b in args.dpo_betas.split(",")),
            )
        )
        work = Path(tmp) / "work" if args.quick else Path(args.work)
        seeds = 1 if args.quick else args.seeds
        cells = [m for m in methods if m != "dpo"] + (
            [f"dpo_{b:g}" for b in settings.dpo_betas] if "dpo" in methods else []
        )
        kept = work if args.quick else Path(args.out) / "frontier_cells"  # one JSON per task, method and seed
        if args.table_only:
            results = [json.loads(path.read_text()) for task in args.tasks.split(",") for method in cells
                       for path in sorted((kept / task / method).glob("seed*.json"))]  # fmt: skip
            if not results:
                parser.error(f"--table-only: no kept cells of {', '.join(cells)} under {kept}")
        else:
            results = [run_cell(task, method, seed, settings, work, kept) for task in args.tasks.split(",")
                       for method in cells for seed in range(seeds)]  # fmt: skip
    from agents.train import cpu_kind

    summary = summarize(results)
    name = "frontier_quick" if args.quick else "frontier"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{cpu_kind()}"
    (out / f"{name}.json").write_text(json.dumps({"command": command, "machine": machine, "summary": summary,
                                                   "runs": results}, indent=1))  # fmt: skip
    (out / f"{name}.md").write_text(markdown(summary, results, command, machine))
    plot(results, summary, out / f"{name}.png")
    print(markdown(summary, results, command, machine))
    return {"summary": summary, "runs": results}


if __name__ == "__main__":
    main()
