"""The base model on every task: its mean gold score on the first eval prompts, and, for tasks judged against
references, the corpus metrics papers report: BLEU and chrF (``sacrebleu``), ROUGE-1/2/L F1 (``rouge-score``).

What RL starts from, per task: a gold near its ceiling would leave nothing to learn. Completions are sampled the
way ``textgen train`` evaluates (:func:`agents.evaluate.evaluate`: one episode per prompt in the task's env, the
task's length and stop strings, the untrained :class:`~agents.policies.CausalLMPolicy`), with the gold scorer as
reward. BLEU, chrF and ROUGE are on a 0-100 scale; the gold is on its scorer's own scale.

Run: ``python benchmarks/tasks.py`` (every registered task, default model) writes ``benchmarks/results/tasks.md``
and ``tasks.json``; ``--tasks code --split train`` measures one task on its train split, keeping the other rows.
``--train`` also runs ``textgen train --task X --seed S`` (the default budget and reward: the task's shipped reward
model, or its gold when none ships; options after ``--`` go to it) in its own process per task and reports the
held-out gold before and after, the KL and distinct-2; finished runs under ``--runs`` are reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from textgen_train_seeds import run_seed, settings_key

from agents.evaluate import evaluate_base_model
from agents.run import BF16_HELP, TrainConfig
from text_env.models import DEFAULT_BF16, DEFAULT_MODEL
from text_env.prompts import Example
from text_env.rewards import scorer_name
from text_env.tasks import get_task, list_tasks

REFERENCE_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")


def reference_metrics(completions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, several references per completion allowed) and the mean best-reference
    ROUGE-1/2/L F1 (rouge-score, stemmed), all 0-100."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]  # None: no k-th
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [rouge.score_multi(list(refs), completion) for completion, refs in zip(completions, references, strict=True)]
    return {
        "bleu": BLEU().corpus_score(list(completions), streams).score,  # type: ignore[arg-type]
        "chrf": CHRF().corpus_score(list(completions), streams).score,  # type: ignore[arg-type]
        **{key: 100 * float(np.mean([row[key].fmeasure for row in rows])) for key in ("rouge1", "rouge2", "rougeL")},
    }


def measure_task(
    name: str,
    model: str,
    n_prompts: int,
    n_envs: int,
    seed: int,
    bf16: bool,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    split: str = "eval",
) -> dict[str, Any]:
    """The base model on the first ``n_prompts`` prompts of task ``name``'s ``split``: gold and, with references,
    the reference metrics; with a gold that counts solved problems (``pass_at_1``), that fraction too."""
    task = get_task(name)
    examples: list[Example] = task.examples(split)[:n_prompts]
    started = time.time()
    evaluation = evaluate_base_model(
        name, model, n_prompts, split=split, seed=seed, n_envs=n_envs, bf16=bf16, max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )  # fmt: skip
    result: dict[str, Any] = {
        "task": name, "split": split, "gold_metric": scorer_name(task.gold), "n_prompts": len(examples),
        "n_eval": len(task.examples("eval")), "n_train": len(task.examples("train")),
        "gold_mean": float(evaluation.gold_score.mean()), "gold_std": float(evaluation.gold_score.std()),
        "length": float(evaluation.n_tokens.mean()), "seconds": time.time() - started,
    }  # fmt: skip
    if hasattr(task.gold, "pass_at_1"):  # code: the fraction of problems whose every test passes
        result["pass_at_1"] = task.gold.pass_at_1(evaluation.gold_score)
    if all(e.references for e in examples):
        result |= reference_metrics(evaluation.completions, [e.references for e in examples])
    result["samples"] = [
        {"prompt": e.prompt, "completion": c, "references": list(e.references), "gold": float(g)}
        for e, c, g in zip(examples[:3], evaluation.completions[:3], evaluation.gold_score[:3], strict=True)
    ]
    return result


def train_task(name: str, seed: int, runs: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``textgen train --task NAME --seed SEED [EXTRA]``, every other setting its default, in its own process (a
    finished run of the same settings under ``runs`` is reused): held-out gold before and after, KL, distinct-2."""
    out = runs / settings_key(list(extra), TrainConfig(), name) / name
    report = run_seed(seed, ["--task", name, *extra], out)
    before, after = report["before"], report["after"]
    chosen = report["config"]["reward_model"]  # None: the task's default
    shipped = get_task(name).reward_model
    reward = chosen or ("learned (shipped)" if shipped else "gold")
    # A run made before reward scaling and the VmHWM peak (2026-12-02) has no reward_scaling in its config: it
    # trained on the raw gold, and its peak RSS counted this benchmark's own peak too (getrusage across exec). One
    # made before the winsorised std (2026-12-03) has no final_reward_scale: it divided by the plain running std.
    made_before = "reward_scaling" not in report["config"]
    if reward == "gold":
        scaled = not made_before and TrainConfig(**report["config"]).scales_rewards
        reward = "gold ÷ running std" if scaled else "gold (unscaled)"
        if scaled and report.get("final_reward_scale") is not None:
            reward = f"gold ÷ winsorised std ({report['final_reward_scale']:.3f})"
    return {
        "seed": seed, "reward": reward, "peak_rss_upper_bound": made_before,
        "eval_prompts": report["config"]["eval_prompts"], "gold_before": before["gold_score"],
        "gold_after": after["gold_score"], "kl": after["kl"], "distinct_2": after["distinct_2"],
        "rm_before": before["reward_model_score"], "rm_after": after["reward_model_score"],
        "minutes": report["train_seconds"] / 60, "peak_rss_gb": report["peak_rss_gb"],
        "total_timesteps": report["config"]["total_timesteps"], "machine": report.get("machine", ""),
    }  # fmt: skip


def _trained_markdown(results: list[dict[str, Any]]) -> list[str]:
    """The table of the ``--train`` runs, if any row has one."""
    rows = [r for r in results if "trained" in r]
    if not rows:
        return []
    machines = list(dict.fromkeys(r["trained"]["machine"] or "this machine" for r in rows))  # the CPU kind varies
    lines = [
        "", "## After `textgen train --task X` (default budget, one seed)", "",
        f"Each task trained by `textgen train --task X --seed {rows[0]['trained']['seed']}` with every other setting "
        f"its default ({rows[0]['trained']['total_timesteps']} PPO tokens, LoRA, β = the default), rewarded by the "
        "task's shipped reward model, or by its gold where none ships (`gold ÷ winsorised std (s)`: divided by a "
        "winsorised std s of its rewards, `--reward-scaling auto`: since 2026-12-05 the base model's, measured once "
        "before training; a run made before divided by the running std of the policy's own episode rewards, s at "
        "the end of training; a `gold "
        "÷ running std` row was trained before the std was winsorised, by the plain std; a `gold (unscaled)` row "
        "before rewards were scaled, as `--reward-scaling none` trains today, and its peak RSS, marked ≤, counted "
        "this benchmark's own process too: an upper bound); held-out gold on the task's first eval prompts before "
        "and after (the number of prompts is given), KL in nats per completion to the base model; minutes of "
        "training on "
        f"{machines[0] if len(machines) == 1 else 'the machine named under the table'}.", "",
        "| task | reward | eval prompts | gold before | gold after | gain | KL | distinct-2 | reward before → after "
        "| minutes | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        t = r["trained"]
        lines.append(
            f"| {r['task']} | {t['reward']} | {t['eval_prompts']} | {t['gold_before']:.3f} | {t['gold_after']:.3f} | "
            f"{t['gold_after'] - t['gold_before']:+.3f} | {t['kl']:.2f} | {t['distinct_2']:.3f} | "
            f"{t['rm_before']:.3f} → {t['rm_after']:.3f} | {t['minutes']:.1f} | "
            f"{'≤ ' if t.get('peak_rss_upper_bound', True) else ''}{t['peak_rss_gb']:.2f} |"
        )
    if len(machines) > 1:
        lines += ["", *(f"- {r['task']}: {r['trained']['machine'] or 'this machine'}" for r in rows)]
    return lines


def _markdown(results: list[dict[str, Any]], model: str) -> str:
    commands = dict.fromkeys(r["command"] for r in results)
    lines = [
        "# The base model on every task",
        "",
        *(f"`{command}`  " for command in commands),
        "",
        f"Model: `{model}`, untrained, sampled (temperature 1) in each task's env with its length and stop strings "
        "(`agents.evaluate.evaluate`); the first eval prompts of each task. Gold on its scorer's scale (mean ± std "
        "over prompts); BLEU and chrF are sacrebleu corpus scores, ROUGE the mean best-reference F1 (rouge-score), "
        f"all 0-100; pass@1 (code) is the fraction of problems whose every test passes, one sample each. "
        f"{platform.platform()}, Python {platform.python_version()}.",
        "",
        "| task | gold metric | prompts (of eval / train) | gold | pass@1 | BLEU | chrF | ROUGE-1 | ROUGE-2 | "
        "ROUGE-L | tokens | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        refs = " | ".join(f"{r[k]:.1f}" if k in r else "–" for k in REFERENCE_METRICS)
        solved = f"{r['pass_at_1']:.3f}" if "pass_at_1" in r else "–"
        task = r["task"] if r["split"] == "eval" else f"{r['task']} ({r['split']} split)"
        lines.append(
            f"| {task} | {r['gold_metric']} | {r['n_prompts']} ({r['n_eval']} / {r['n_train']}) | "
            f"{r['gold_mean']:+.3f} ± {r['gold_std']:.3f} | {solved} | {refs} | {r['length']:.1f} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines + _trained_markdown(results)) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(list_tasks()), help="comma-separated tasks (default: all registered)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default' (embedded SmolLM2) or a model directory")
    p.add_argument("--prompts", type=int, default=32, help="first prompts of the split per task (%(default)s)")
    p.add_argument("--split", default="eval", choices=("eval", "train"), help="prompt split (%(default)s)")
    p.add_argument("--n-envs", type=int, default=16, help="episodes sampled in parallel (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="episode length (default: each task's)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="room for the prompt (default: each task's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=DEFAULT_BF16, help=BF16_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory of tasks.md / .json")
    p.add_argument("--name", default="tasks", help="file stem of the results (%(default)s)")
    p.add_argument("--train", action="store_true", help="also `textgen train --task X --seed SEED` per task")
    p.add_argument("--runs", default="runs/tasks_benchmark", help="--train's run directories (finished ones reused)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # more textgen train options for --train
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.model != DEFAULT_MODEL:
        extra = ["--model", args.model, *extra]
    names = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(names) - set(list_tasks()))
    if unknown:
        p.error(f"unknown tasks {unknown}; registered: {', '.join(list_tasks())}")
    command = shlex.join(["python", "benchmarks/tasks.py", *argv])
    results = []
    for name in names:
        settings = (args.model, args.prompts, args.n_envs, args.seed, args.bf16)
        results.append(measure_task(name, *settings, args.max_new_tokens, args.max_prompt_tokens, args.split))
        results[-1]["command"] = command
        if args.train:
            results[-1]["trained"] = train_task(name, args.seed, Path(args.runs), extra)
        print(f"{name}: gold {results[-1]['gold_mean']:+.3f} ({results[-1]['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _merged(out / f"{args.name}.json", results)
    record = {"command": command, "config": vars(args), "results": table}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    (out / f"{args.name}.md").write_text(_markdown(table, args.model))
    return results


def _merged(path: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier ``path`` (each with the command that measured it), those of the same (task, split) as
    one of ``results`` replaced by it in place, then the other ``results``: one run may measure one task without
    dropping the other tasks' rows."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    new = {(r["task"], r["split"]): r for r in results}
    rows = [{"split": "eval", "command": earlier.get("command", "?")} | r for r in earlier.get("results", [])]
    table = [new.pop((r["task"], r["split"]), r) for r in rows]
    return table + list(new.values())


if __name__ == "__main__":
    main()
