"""``textgen evaluate A B --human``: a blind side-by-side of two models, judged by people on the labeling page.

Both models' completions of the same prompts (``agents.compare.compare_models``'s samples) become pairs on the page
of ``textgen label``, each shown with the sides in a random order fixed per pair and without the models' names.
Judgements are appended to a JSONL file as labels are (:class:`agents.labeling.LabelStore`: decisive ones as
preference lines, ties and skips beside), each line holding which model was on side A (``ab_sides``), so that a
restart resumes where each person stopped and nothing is lost or counted twice. :func:`ab_report` turns them into
the win rate of A over B with a Wilson 95 % interval (ties counted apart), the agreement between annotators, and the
task's gold scorer's verdict on the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agents.labeling import LabelPair, LabelStore, load_pairs_to_label
from text_env.prompts import Example

__all__ = ["SIDES", "ab_report", "markdown", "pairs_path", "wilson_interval", "write_ab_pairs"]

SIDES = "ab_sides"
"""The field of a pair (and of every judgement of it) that says which model the page showed as A: ``"AB"`` (model A
on side A) or ``"BA"``; never shown on the page."""
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def pairs_path(data: str | os.PathLike[str]) -> Path:
    """Where the pairs to judge are kept, beside the judgements: ``<data stem>.to-judge.jsonl``."""
    data = Path(data)
    return data.with_name(f"{data.stem}.to-judge.jsonl")


def write_ab_pairs(
    examples: Sequence[Example], a: Sequence[str], b: Sequence[str], path: str | os.PathLike[str], models: Sequence[str]
) -> list[LabelPair]:
    """Write one pair per prompt whose two models' completions differ, sides in an order drawn from a hash of the
    pair (the same on every machine, unrelated to which model wrote what), and return them as the page reads them.

    :param models: the names of A and B, kept in the file's first line for the report, never on the page.
    """
    lines = []
    for example, x, y in zip(examples, a, b, strict=True):
        if x == y:  # nothing to judge: the report counts these apart
            continue
        flip = hashlib.sha256(json.dumps([example.prompt, x, y]).encode()).digest()[0] % 2
        shown = (y, x) if flip else (x, y)
        record = {"prompt": example.prompt, "a": shown[0], "b": shown[1], **example.columns(),
                  SIDES: "BA" if flip else "AB"}  # fmt: skip
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise ValueError("the two models wrote the same completion for every prompt: there is nothing to judge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.with_name(path.stem + ".models.json")).write_text(
        json.dumps({"A": models[0], "B": models[1], "prompts": len(examples), "identical": len(examples) - len(lines)})
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)  # whole or absent: judgements refer to its pairs
    return load_pairs_to_label(path)


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``wins / n`` (``(0, 1)`` when ``n`` is 0): unlike the normal
    approximation it stays inside [0, 1] and behaves at 0 and ``n`` wins, as a small side-by-side needs."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(wins: int, losses: int) -> dict[str, Any]:
    n = wins + losses
    low, high = wilson_interval(wins, n)
    return {"wins": wins, "losses": losses, "rate": wins / n if n else None, "interval": [low, high]}


def ab_report(store: LabelStore, pairs_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The side-by-side's result so far: every person's judgement of every pair counts once.

    ``people``: A's wins over B among decisive judgements (A or B better), their rate and Wilson 95 % interval; ties
    counted apart; skips left out. ``agreement``: between annotators, over pairs two or more judged. ``gold``: the
    task's gold scorer on the same pairs (those judged by someone): how often it prefers A, with its interval, and
    how often people's decisive judgements side with it.
    """
    names = json.loads(Path(pairs_file).with_name(Path(pairs_file).stem + ".models.json").read_text())
    wins = {"A": 0, "B": 0}
    ties = skips = 0
    gold = {"A": 0, "B": 0, "tie": 0}
    with_gold = judged_with_gold = 0
    for i, pair in enumerate(store.pairs):
        labels = store.labels[pair.pair_id]
        order = pair.meta[SIDES]  # "AB": side a is model A
        side_model = {"a": order[0], "b": order[1]}
        votes = [label for label in labels.values() if label != "skip"]
        skips += len(labels) - len(votes)
        gold_pick = None
        if store.gold_scores is not None and votes:
            score_a, score_b = store.gold_scores[i]
            gold_pick = "tie" if score_a == score_b else side_model["a" if score_a > score_b else "b"]
            gold[gold_pick] += 1
        for label in votes:
            if label == "tie":
                ties += 1
                continue
            wins[side_model[label]] += 1
            if gold_pick in ("A", "B"):
                judged_with_gold += 1
                with_gold += side_model[label] == gold_pick
    stats = store.stats()
    return {
        "models": {"A": names["A"], "B": names["B"]},
        "pairs": len(store.pairs), "identical_completions": names["identical"],
        "people": {**_rate(wins["A"], wins["B"]), "ties": ties, "skips": skips, "annotators": stats["annotators"]},
        "agreement": stats["agreement"],
        "gold": None if store.gold_scores is None else {
            **_rate(gold["A"], gold["B"]), "ties": gold["tie"],
            "people_agree": with_gold / judged_with_gold if judged_with_gold else None,
        },
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    """The report as a short table (the names of A and B are shown here, at the end, not on the page)."""

    def cell(result: dict[str, Any] | None) -> str:
        if result is None or result["rate"] is None:
            return "–"
        low, high = result["interval"]
        return f"{result['rate']:.3f} [{low:.3f}, {high:.3f}] ({result['wins']} : {result['losses']})"

    people, gold, agreement = report["people"], report["gold"], report["agreement"]
    lines = [
        f"A = {report['models']['A']}, B = {report['models']['B']}: {report['pairs']} pairs "
        f"({report['identical_completions']} prompts with identical completions left out)",
        "",
        "| judge | win rate of A over B [Wilson 95 %] (A : B) | ties |",
        "|---|---|---|",
        f"| people ({sum(people['annotators'].values())} judgements by {len(people['annotators'])}) | "
        f"{cell(people)} | {people['ties']} |",
    ]
    if gold is not None:
        lines.append(f"| gold scorer, on the pairs people judged | {cell(gold)} | {gold['ties']} |")
    if agreement:
        lines.append(f"\nAnnotators agree on {agreement['rate']:.0%} of answers, over {agreement['pairs']} pairs.")
    if gold is not None and gold["people_agree"] is not None:
        lines.append(f"People side with the gold scorer in {gold['people_agree']:.0%} of their decisive judgements.")
    return "\n".join(lines)
