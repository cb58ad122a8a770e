"""Does dialogue's gold favour long replies? Sentence chrF against reply length, on one ``textgen evaluate``.

Dialogue's gold is sentence chrF (sacrebleu's defaults: character 6-grams, beta 2, so recall weighs 4x precision).
The references are short (median 6 SmolLM2 tokens on the train split) while the base model's replies run to the
32-token cap, so a bound at the references' lengths and a supervised model that answers at those lengths both pull
against a gold that may pay for length as such. This script separates length from content, from the samples that
``textgen evaluate`` keeps (the same prompts and sampling seed for every model):

- every model's mean chrF at beta 2 (the gold), 1 and 0.5 (recall weighed 4x, 1x, 1/4 precision) and its length;
- the first model's replies cut to their first k tokens: what a length bound costs a reply that keeps its content;
- the references scored against the other references of the same prompt (prompts with at least two): what a reply
  of a reference's own length and style scores;
- with ``--spread`` (an evaluate of K >= 2 samples per prompt, e.g. of train prompts): how much of chrF's variance
  over the first model's samples lies between prompts rather than within one. A run meets each prompt about once, so
  that share is noise in the advantages unless the value head learns each prompt's expected score.

Run::

    textgen evaluate default runs/sft-dialogue-<time> --task dialogue --n-prompts 325 --out runs/eval
    textgen evaluate default --task dialogue --prompts train.jsonl --reference-column references --samples 4 \
        --out runs/spread
    python benchmarks/dialogue_gold.py runs/eval/evaluate-dialogue-<time> --spread runs/spread/evaluate-dialogue-<time>

Writes ``<out>/dialogue_gold.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

BETAS = (2.0, 1.0, 0.5)  # 2: sacrebleu's default, the task's gold
CUTS = (4, 8, 13, 20, 32)  # tokens; 13: the constrained benchmark's length bound (the references' 75th percentile)


def chrf(beta: float) -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF(beta=beta)


def mean_chrf(metric: Any, replies: list[str], references: list[list[str]]) -> float:
    """Mean sentence chrF in [0, 1], the best over each prompt's references; an empty reply scores 0."""
    scores = [
        metric.sentence_score(r, refs).score / 100 if r else 0.0 for r, refs in zip(replies, references, strict=True)
    ]
    return float(np.mean(scores))


def measure(report: dict[str, Any]) -> dict[str, Any]:
    """The three measurements above, from a ``textgen evaluate`` report of the dialogue task."""
    from text_env.models import load_tokenizer
    from text_env.tasks import get_task

    settings = report["settings"]
    if settings["task"] != "dialogue" or settings.get("data") != "dialogue eval split":
        raise SystemExit(f"need a textgen evaluate report of the dialogue task's eval split, got {settings['task']!r}")
    models = settings["models"]
    task = get_task("dialogue")
    references_of = {e.prompt: list(e.references) for e in task.examples("eval")}
    samples = report["samples"]
    references = [references_of[s["prompt"]] for s in samples]
    tokenizer = load_tokenizer(models[0])
    rows = []
    for model in models:
        replies = [s[model].strip() for s in samples]
        lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
        row = {f"chrf_beta{b:g}": mean_chrf(chrf(b), replies, references) for b in BETAS}
        rows.append({"model": model, **row, "length": float(np.mean(lengths))})
    gold = chrf(BETAS[0])
    first = [tokenizer(s[models[0]].strip(), add_special_tokens=False)["input_ids"] for s in samples]
    cuts = {k: mean_chrf(gold, [tokenizer.decode(ids[:k]).strip() for ids in first], references) for k in CUTS}
    several = [refs for refs in references_of.values() if len(refs) >= 2]
    held_out = [(r, refs[:i] + refs[i + 1 :]) for refs in several for i, r in enumerate(refs)]
    leave_one_out = {f"chrf_beta{b:g}": mean_chrf(chrf(b), *map(list, zip(*held_out, strict=True))) for b in BETAS}
    return {
        "models": rows, "cut_first_model": {str(k): v for k, v in cuts.items()},
        "references_leave_one_out": {"prompts": len(several), **leave_one_out}, "n_prompts": len(samples),
        "seed": settings["seed"], "evaluation": f"textgen evaluate {' '.join(models)} --task dialogue "
        f"--n-prompts {len(samples)} --seed {settings['seed']}",
    }  # fmt: skip


def spread(report: dict[str, Any]) -> dict[str, Any]:
    """The first model's chrF over K samples per prompt: its variance, the mean variance within a prompt, and the
    share between prompts (1 - within / total)."""
    model = report["settings"]["models"][0]
    if report["settings"]["samples"] < 2 or "chrf" not in report.get("per_sample", {}).get(model, {}):
        raise SystemExit("--spread needs a textgen evaluate report of 2 or more --samples on prompts with references")
    chrf = np.array(report["per_sample"][model]["chrf"]) / 100  # (N, K)
    total, within = float(chrf.var(ddof=1)), float(chrf.var(axis=1, ddof=1).mean())
    return {"model": model, "data": report["settings"]["data"], "prompts": chrf.shape[0], "samples": chrf.shape[1],
            "variance": total, "within_prompt": within, "between_share": 1 - within / total}  # fmt: skip


def table(result: dict[str, Any], command: str) -> str:
    betas = " | ".join(f"chrF β={b:g}" for b in BETAS)
    lines = [
        "# Dialogue's gold against reply length", "",
        f"`{command}` on a `textgen evaluate` of {result['n_prompts']} held-out "
        f"prompts: `{result['evaluation']}`.", "",
        f"| model | {betas} | length (tokens) |", "|---|" + "---|" * (len(BETAS) + 1),
    ]  # fmt: skip
    for row in result["models"]:
        scores = " | ".join(f"{row[f'chrf_beta{b:g}']:.3f}" for b in BETAS)
        lines.append(f"| {row['model']} | {scores} | {row['length']:.1f} |")
    loo = result["references_leave_one_out"]
    lines += [
        "", f"The first model's replies cut to their first k tokens (gold, chrF β={BETAS[0]:g}):", "",
        "| k | " + " | ".join(result["cut_first_model"]) + " |", "|---|" + "---|" * len(result["cut_first_model"]),
        "| gold | " + " | ".join(f"{v:.3f}" for v in result["cut_first_model"].values()) + " |", "",
        f"Each reference against the other references of its prompt ({loo['prompts']} held-out prompts with two or "
        "more): " + ", ".join(f"chrF β={b:g} {loo[f'chrf_beta{b:g}']:.3f}" for b in BETAS) + ".",
    ]  # fmt: skip
    if "spread" in result:
        sp = result["spread"]
        lines += [
            "", f"chrF of {sp['model']}, {sp['samples']} samples of each of {sp['prompts']} prompts ({sp['data']}): "
            f"variance {sp['variance']:.5f}, of which {sp['within_prompt']:.5f} within a prompt: "
            f"**{sp['between_share']:.0%} lies between prompts**.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluation", type=Path, help="a textgen evaluate run directory (or its report.json)")
    parser.add_argument("--spread", type=Path, help="a textgen evaluate of 2+ samples per prompt (or its report.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    reports = []
    for given in (args.evaluation, args.spread):
        path = given / "report.json" if given is not None and given.is_dir() else given
        if path is not None and not path.is_file():
            parser.error(f"{path} is not a textgen evaluate report (report.json)")
        reports.append(json.loads(path.read_text()) if path is not None else None)
    result = measure(reports[0]) | ({"spread": spread(reports[1])} if reports[1] is not None else {})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dialogue_gold.json").write_text(json.dumps(result, indent=1) + "\n")
    command = " ".join(["python benchmarks/dialogue_gold.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "dialogue_gold.md").write_text(table(result, command))
    print(table(result, command))
    return result


if __name__ == "__main__":
    main()
