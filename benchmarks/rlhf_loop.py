"""The iterated RLHF loop (``textgen rlhf``) over seeds, against one-shot ``textgen train`` and best-of-16.

Per seed, each in its own process (its own peak memory): ``textgen rlhf --seed S`` (``--rounds`` rounds of
``--tokens-per-round`` PPO tokens and ``--pairs-per-round`` fresh pairs from the simulated annotator),
``textgen train --seed S`` with the same total PPO tokens against the round-0 reward model, and best-of-16 with the
round-0 reward model (``benchmarks/compare_algorithms.py``'s method) on the same held-out prompts. Run::

    python benchmarks/rlhf_loop.py                      # 3 seeds x 4 rounds of 10,240 tokens and 256 pairs
    python benchmarks/rlhf_loop.py --rounds 2 -- --beta 0.1   # anything after -- goes to textgen rlhf and train

Writes ``<out>/<name>.md`` (per seed and mean/worst, per round, the issue's targets, the exact command),
``<name>.json`` (every report) and ``<name>.png`` (gold per round for each seed; gold and proxy against √KL).
Finished runs under ``--runs`` are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from compare_algorithms import BenchConfig, run_isolated
from textgen_train_seeds import run_seed, seed_rows, settings_key

from agents.rlhf import RLHFConfig
from agents.train import cpu_kind, pyplot

METHODS = ("rlhf", "train", "best_of_16")


def run_method(
    method: str, seed: int, loop: list[str], extra: list[str], runs: Path, rlhf: dict[str, Any] | None
) -> dict[str, Any]:
    """One method for one seed in its own process, or its result from an earlier call with the same settings."""
    saved = runs / method / f"seed{seed}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    started = time.time()
    if method == "rlhf":
        result = run_seed(seed, [*loop, *extra], runs / method, "rlhf")
    elif method == "train":  # the same PPO tokens at once, against the round-0 reward model
        config = rlhf["config"]  # type: ignore[index]
        total = config["rounds"] * config["tokens_per_round"]
        result = run_seed(seed, ["--total-timesteps", str(total), *extra], runs / method)
    else:  # best-of-16 with the round-0 reward model, on the loop's held-out prompts and settings
        shared = {k: v for k, v in rlhf["config"]["train"].items() if k not in ("algo", "seed")}  # type: ignore[index]
        result = run_isolated("best_of_16", seed, BenchConfig(shared))
        if "error" in result:
            raise RuntimeError(f"best-of-16, seed {seed}: {result['error']}")
    result["wall_minutes"] = (time.time() - started) / 60
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


def summarize(seeds: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per seed: the loop's round-0 and final held-out scores, and the baselines' gold."""
    rows = []
    for s in seeds:
        rounds = s["rlhf"]["rounds"]
        first, last = rounds[0]["eval"], rounds[-1]["eval"]
        row = {
            "seed": s["seed"], "gold_round0": first["gold_score"], "gold_final": last["gold_score"],
            "rm_final": last["reward_model_score"], "kl_final": last["kl"], "distinct_2_final": last["distinct_2"],
            "loop_minutes": s["rlhf"].get("wall_minutes", math.nan), "loop_peak_rss_gb": s["rlhf"]["peak_rss_gb"],
        }  # fmt: skip
        if "train" in s:
            row.update(train_gold=s["train"]["after"]["gold_score"], train_kl=s["train"]["after"]["kl"])
        if "best_of_16" in s:
            row["best_of_16_gold"] = s["best_of_16"]["gold_score"]
        rows.append(row)
    return rows


def targets(rows: list[dict[str, float]]) -> list[str]:
    """Issue 12's targets, each met or not, with the numbers that decide it."""

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    mean = float(np.mean([r["gold_final"] for r in rows]))
    below = [r["seed"] for r in rows if r["gold_final"] < r["gold_round0"]]
    lines = [
        f"- Mean held-out gold after the last round ≥ 0.75: {verdict(mean >= 0.75)} ({mean:.3f}).",
        f"- No seed ends below its round-0 gold: {verdict(not below)}" + (f" (seeds {below})." if below else "."),
    ]
    if all("train_gold" in r for r in rows):
        train_mean, train_worst = np.mean([r["train_gold"] for r in rows]), min(r["train_gold"] for r in rows)
        worst = min(r["gold_final"] for r in rows)
        lines.append(
            f"- Beats one-shot `textgen train` at equal PPO tokens on mean and worst seed: "
            f"{verdict(mean > train_mean and worst > train_worst)} (mean {mean:.3f} vs {train_mean:.3f}, worst "
            f"{worst:.3f} vs {train_worst:.3f})."
        )
    if all("best_of_16_gold" in r for r in rows):
        best = float(np.mean([r["best_of_16_gold"] for r in rows]))
        lines.append(
            f"- Beats best-of-16 with the round-0 reward model (mean gold): {verdict(mean > best)} "
            f"({mean:.3f} vs {best:.3f})."
        )
    return lines


def markdown(seeds: list[dict[str, Any]], command: str, machine: str) -> str:
    rows = summarize(seeds)
    keys = [k for k in ("gold_round0", "gold_final", "rm_final", "kl_final", "distinct_2_final", "train_gold",
                        "train_kl", "best_of_16_gold", "loop_minutes", "loop_peak_rss_gb") if k in rows[0]]  # fmt: skip
    worst = {"kl_final": max, "train_kl": max, "loop_minutes": max, "loop_peak_rss_gb": max}
    config = seeds[0]["rlhf"]["config"]
    lines = [
        "# The iterated RLHF loop over seeds", "", f"Command: `{command}`", "", f"Machine: {machine}.", "",
        f"Loop: {config['rounds']} rounds of {config['tokens_per_round']} PPO tokens and {config['pairs_per_round']} "
        f"fresh pairs ({config['annotator']} annotator); one-shot `textgen train`: "
        f"{config['rounds'] * config['tokens_per_round']} PPO tokens against the round-0 reward model; best-of-16: "
        "the round-0 reward model picks one of 16 base-model samples per prompt. Held-out: the task's first "
        f"{config['train']['eval_prompts']} evaluation prompts, one sample per prompt. KL: nats per completion to the "
        "base model. Worst: the lowest gold, the highest KL, time and memory.", "",
        "| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
    ]  # fmt: skip
    lines += seed_rows(rows, keys, worst)
    lines += [
        "", "## Targets", "", *targets(rows), "", "## Per round", "",
        "| seed | round | gold | reward-model score | KL | the round's reward model on its fresh pairs: accuracy "
        "(labels / gold) | refit: pairs, test accuracy (labels / gold), seconds |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in seeds:
        for r in s["rlhf"]["rounds"]:
            e, prev, refit = r["eval"], r.get("previous_reward_model_on_fresh_pairs"), r.get("refit")
            judged = f"{_cell(prev['accuracy'])} / {_cell(prev['gold_accuracy'])}" if prev else ""
            fitted = f"{refit['n_pairs']}, {_cell(refit['accuracy'])} / {_cell(refit['gold_accuracy'])}, " \
                     f"{refit['seconds']:.0f}" if refit else ""  # fmt: skip
            lines.append(
                f"| {s['seed']} | {r['round']} | {e['gold_score']:.3f} | {e['reward_model_score']:.3f} | "
                f"{e['kl']:.2f} | {judged} | {fitted} |"
            )
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot(seeds: list[dict[str, Any]], path: Path) -> None:
    """Left: held-out gold per round for each seed, with one-shot train (x) and best-of-16 (dotted). Right: gold
    (o) and proxy (s) against √KL, rounds connected (Gao et al. 2022's axes)."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, s in enumerate(seeds):
        color, rounds = f"C{i % 10}", s["rlhf"]["rounds"]
        x = [r["round"] for r in rounds]
        left.plot(x, [r["eval"]["gold_score"] for r in rounds], "o-", color=color, label=f"seed {s['seed']}: loop")
        if "train" in s:
            left.plot([x[-1]], [s["train"]["after"]["gold_score"]], "x", color=color, ms=10, mew=2)
        if "best_of_16" in s:
            left.axhline(s["best_of_16"]["gold_score"], color=color, ls=":", lw=1)
        kl = [math.sqrt(max(r["eval"]["kl"], 0.0)) for r in rounds]
        right.plot(kl, [r["eval"]["gold_score"] for r in rounds], "o-", color=color, label=f"seed {s['seed']} gold")
        right.plot(kl, [r["eval"]["reward_model_score"] for r in rounds], "s--", color=color, mfc="none",
                   label=f"seed {s['seed']} reward model of the round")  # fmt: skip
        for k, g, r in zip(kl, (r["eval"]["gold_score"] for r in rounds), x, strict=True):
            right.annotate(str(r), (k, g), textcoords="offset points", xytext=(4, 4), fontsize=7)
    left.set_xticks(range(len(seeds[0]["rlhf"]["rounds"])))
    left.set_xlabel("round (0: the base policy)")
    left.set_ylabel("held-out gold score")
    left.set_title("gold per round; x: one-shot textgen train at equal PPO tokens; dotted: best-of-16", fontsize=9)
    left.legend(fontsize=8)
    right.set_xlabel("√KL to the base model (KL in nats per completion)")
    right.set_ylabel("held-out score")
    right.set_title("gold (o) and reward-model score (s) against √KL; numbers: rounds", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--only-seeds", help="run just these seeds (e.g. 1,2: one process per seed, side by side), no table"
    )
    parser.add_argument("--rounds", type=int, default=RLHFConfig.rounds)
    parser.add_argument("--tokens-per-round", type=int, default=RLHFConfig.tokens_per_round)
    parser.add_argument("--pairs-per-round", type=int, default=RLHFConfig.pairs_per_round)
    parser.add_argument("--methods", default=",".join(METHODS), help="rlhf and any of train, best_of_16")
    parser.add_argument(
        "--runs",
        default="runs/rlhf_loop_benchmark",
        help="run directories; finished runs of the same settings are reused",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="rlhf_loop")
    args = parser.parse_args(ours)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "rlhf" not in methods or set(methods) - set(METHODS):
        parser.error(f"--methods: rlhf and any of train, best_of_16, not {args.methods!r}")
    loop = ["--rounds", str(args.rounds), "--tokens-per-round", str(args.tokens_per_round), "--pairs-per-round",
            str(args.pairs_per_round)]  # fmt: skip
    # Other settings, other runs: defaults and the round-0 reward model are part of the key.
    runs = Path(args.runs) / settings_key([*loop, *extra], RLHFConfig(), "positive-review")
    chosen = [int(x) for x in args.only_seeds.split(",")] if args.only_seeds else range(args.seeds)
    seeds = []
    for seed in chosen:
        result: dict[str, Any] = {"seed": seed}
        for method in [m for m in METHODS if m in methods]:  # rlhf first: the others take its settings
            print(f"{method} seed {seed} ...", flush=True)
            result[method] = run_method(method, seed, loop, extra, runs, result.get("rlhf"))
        seeds.append(result)
    if args.only_seeds:  # their runs are saved for the full command, which writes the table
        return {"seeds": seeds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/rlhf_loop.py " + " ".join(argv)).strip()
    table = markdown(seeds, command, seeds[0]["rlhf"].get("machine", cpu_kind()))
    (out / f"{args.name}.md").write_text(table + f"\n![gold per round and against √KL]({args.name}.png)\n")
    record = {"command": command, "seeds": seeds}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    plot(seeds, out / f"{args.name}.png")
    print(table)
    return record


if __name__ == "__main__":
    main()
