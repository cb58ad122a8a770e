"""``textgen train`` over several seeds: the main job's held-out gain, judged by its mean and its worst seed.

Each seed is a separate ``textgen train`` process (its own peak memory), with the default settings unless
options say otherwise. Run::

    python benchmarks/textgen_train_seeds.py                 # 3 seeds of the default job (~40 min here)
    python benchmarks/textgen_train_seeds.py --seeds 3 -- --beta 0.1   # anything after -- goes to textgen train

Writes ``<out>/<name>.md`` (per seed and mean/worst: gold and reward-model score before/after, KL, distinct-2,
wall time, peak RSS), ``<name>.json`` (every report) and ``<name>.png`` (gold and reward-model score per rollout,
every seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from agents.train import cpu_kind, pyplot
from text_env.tasks import get_task


def settings_key(options: list[str], defaults: Any, task: str) -> str:
    """A short hash of what decides a benchmark's runs: the command-line options, the resolved defaults (a
    dataclass instance) and the bytes of ``task``'s shipped reward-model head, so that a changed default or a
    re-shipped reward model never reuses old runs."""
    shipped = Path(get_task(task).reward_model or ".", "head.safetensors")
    rm = hashlib.sha1(shipped.read_bytes()).hexdigest() if shipped.is_file() else ""
    settings = json.dumps(asdict(defaults), sort_keys=True, default=str)
    return hashlib.sha1(" ".join([*options, settings, rm]).encode()).hexdigest()[:10]


def finished(out: Path) -> dict[str, Any] | None:
    """The report of the run under ``out``, when one finished there."""
    reports = sorted(out.glob("*/report.json"))
    return json.loads(reports[-1].read_text()) if reports else None


def run_textgen(command: str, out: Path, args: list[str]) -> dict[str, Any]:
    """``textgen COMMAND ARGS --out OUT`` (a command that makes a run directory: train, rlhf, sft) in its own
    process, once; its report. A run that finished under ``out`` is read back (e.g. seeds run side by side by hand),
    and one that was interrupted there (``config.json``, no report) continues with ``--resume``: a benchmark stopped
    mid-run loses the steps since the run's last checkpoint, not the run."""
    report = finished(out)
    if report is None:
        stopped = sorted(out.glob("*/config.json"))
        given = ["--resume", str(stopped[-1].parent)] if stopped else [*args, "--out", str(out)]
        subprocess.run([sys.executable, "-m", "agents.cli", command, *given], check=True)
        report = finished(out)
    assert report is not None, f"textgen {command} left no report under {out}"
    return report


def run_seed(seed: int, extra: list[str], runs: Path, command_name: str = "train") -> dict[str, Any]:
    """One ``textgen train --seed SEED`` (or ``rlhf``) under ``runs/seed<SEED>``, once (:func:`run_textgen`)."""
    return run_textgen(command_name, runs / f"seed{seed}", ["--seed", str(seed), *extra])


def summarize(reports: list[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    for r in reports:
        b, a = r["before"], r["after"]
        rows.append({
            "seed": r["config"]["seed"], "gold_before": b["gold_score"], "gold_after": a["gold_score"],
            "gold_gain": a["gold_score"] - b["gold_score"], "rm_before": b["reward_model_score"],
            "rm_after": a["reward_model_score"], "kl": a["kl"], "distinct_2": a["distinct_2"],
            "minutes": r["train_seconds"] / 60, "peak_rss_gb": r["peak_rss_gb"],
        })  # fmt: skip
        late = [h["gold_score"] for h in r.get("held_out_history", []) if h["timesteps"] > 5 * _rollout(r)]
        if late:  # --eval-every: did held-out gold ever fall below its start after iteration 5?
            rows[-1]["heldout_min_after_5"] = min(late)
    return rows


def _rollout(report: dict[str, Any]) -> int:
    """Tokens per rollout (an RLlib iteration: the same n_envs x n_steps)."""
    return int(report["config"]["n_envs"]) * int(report["config"]["n_steps"])


def markdown(rows: list[dict[str, float]], command: str, machine: str) -> str:
    keys = ["gold_before", "gold_after", "gold_gain", "rm_before", "rm_after", "kl", "distinct_2", "minutes",
            "peak_rss_gb"]  # fmt: skip
    if all("heldout_min_after_5" in row for row in rows):
        keys.insert(3, "heldout_min_after_5")
    lines = [
        "# `textgen train` over seeds", "", f"Command: `{command}`", "", f"Machine: {machine}.", "",
        "Held-out: the task's first 80 evaluation prompts, before and after training. KL: nats per completion to "
        "the base model. minutes: training only (the evaluations before and after are not counted). Worst: the "
        "lowest gold gain, the highest KL and peak RSS, the lowest distinct-2. heldout_min_after_5 (runs with "
        "--eval-every): the lowest held-out gold evaluated after iteration 5.", "",
        "| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
    ]  # fmt: skip
    lines += seed_rows(rows, keys, worst={"kl": max, "minutes": max, "peak_rss_gb": max})
    return "\n".join(lines) + "\n"


def seed_rows(rows: list[dict[str, float]], keys: list[str], worst: dict[str, Any]) -> list[str]:
    """Markdown rows: one per seed, then the mean and the worst over seeds (``min``, or ``worst[key]``: ``max``
    where more is worse)."""
    lines = [f"| {row['seed']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for row in rows]
    lines.append("| **mean** | " + " | ".join(f"{np.mean([r[k] for r in rows]):.3f}" for k in keys) + " |")
    lines.append("| **worst** | " + " | ".join(f"{worst.get(k, min)(r[k] for r in rows):.3f}" for k in keys) + " |")
    return lines


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in reports:
        steps = [h["timesteps"] for h in r["history"]]
        seed = r["config"]["seed"]
        line = axes[0].plot(steps, [h["gold_score"] for h in r["history"]], label=f"seed {seed}")[0]
        held_out = r.get("held_out_history", [])
        if held_out:  # --eval-every: the held-out gold along training, dashed in the seed's colour
            axes[0].plot([h["timesteps"] for h in held_out], [h["gold_score"] for h in held_out], "o--", ms=3,
                         color=line.get_color(), label=f"seed {seed}, held-out")  # fmt: skip
        axes[1].plot(steps, [h["reward_model_score"] for h in r["history"]], label=f"seed {seed}")
    for ax, title in zip(axes, ("gold score", "reward-model score"), strict=True):
        ax.set_title(f"{title} of the training episodes, per rollout (dashed: held-out)", fontsize=9)
        ax.set_xlabel("environment steps (tokens)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="textgen_train_seeds")
    parser.add_argument(
        "--runs", default=None,
        help="keep the runs in RUNS/seed<S> and reuse the finished ones (default: a temporary directory); "
        "to run seeds side by side: `textgen train --seed S --out RUNS/seedS <options>` per seed, then this",
    )  # fmt: skip
    args = parser.parse_args(ours)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        reports = [run_seed(seed, extra, runs) for seed in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/textgen_train_seeds.py " + " ".join(argv)
    table = markdown(summarize(reports), command.strip(), reports[0].get("machine", cpu_kind()))
    (out / f"{args.name}.md").write_text(table + f"\n![gold and reward-model score per rollout]({args.name}.png)\n")
    (out / f"{args.name}.json").write_text(json.dumps(reports, indent=1))
    plot(reports, out / f"{args.name}.png")
    print(table)


if __name__ == "__main__":
    main()
