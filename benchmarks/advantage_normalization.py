"""Advantage normalisation per minibatch (SB3's ``normalize_advantage``) against once over the rollout, over seeds.

A minibatch of whole episodes holds few of them (128 tokens: 4 episodes of 32), so per-minibatch normalisation takes
its mean and std from 4 correlated episodes; ``--advantage-normalization rollout`` normalises once over the rollout.
Each variant is ``textgen train --advantage-normalization X`` over the same seeds, otherwise the defaults. Run::

    python benchmarks/advantage_normalization.py --runs RUNS   # RUNS/<variant>/seed<S>; finished runs are reused

Writes ``<out>/advantage_normalization.md`` and ``.json``: per variant, each seed's held-out gold gain, KL and
distinct-2, and their mean and worst.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from textgen_train_seeds import run_seed, summarize

from agents.train import cpu_kind

VARIANTS = ("minibatch", "rollout")
KEYS = ("gold_before", "gold_after", "gold_gain", "kl", "distinct_2", "minutes", "peak_rss_gb")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", default=None, help="keep the runs in RUNS/<variant>/seed<S> (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        reports = {
            v: [run_seed(s, ["--advantage-normalization", v], runs / v) for s in range(args.seeds)] for v in VARIANTS
        }
    rows = {v: summarize(r) for v, r in reports.items()}
    command = "python benchmarks/advantage_normalization.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Advantage normalisation: per minibatch or once over the rollout", "", f"Command: `{command.strip()}`", "",
        f"Machine: {reports[VARIANTS[0]][0].get('machine', cpu_kind())}. Held-out: positive-review's first 80 eval "
        "prompts before and after `textgen train` (default settings but the normalisation). KL: nats per completion "
        "to the base model. Worst: the lowest gain and distinct-2, the highest KL.", "",
        "| normalisation | seed | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|",
    ]  # fmt: skip
    for variant, seeds in rows.items():
        for row in seeds:
            lines.append(f"| {variant} | {row['seed']} | " + " | ".join(f"{row[k]:.3f}" for k in KEYS) + " |")
        mean = " | ".join(f"{np.mean([r[k] for r in seeds]):.3f}" for k in KEYS)
        worst = {k: (max if k in ("kl", "minutes", "peak_rss_gb") else min)(r[k] for r in seeds) for k in KEYS}
        lines.append(f"| {variant} | **mean** | {mean} |")
        lines.append(f"| {variant} | **worst** | " + " | ".join(f"{worst[k]:.3f}" for k in KEYS) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "advantage_normalization.md").write_text("\n".join(lines) + "\n")
    (out / "advantage_normalization.json").write_text(json.dumps(reports, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
