"""Annotators turn two completions of a prompt into a preference pair.

``SimulatedAnnotator`` is the standard way to study RLHF without raters: a gold scorer plays the human, with
Bradley–Terry noise so that labels disagree with the gold ranking as often as real annotators do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from text_env.prompts import Example, columns_of, load_examples
from text_env.rewards import Scorer, call_scorer
from text_env.rewards.preferences import PreferencePair

__all__ = ["HumanAnnotator", "SimulatedAnnotator"]


class SimulatedAnnotator:
    """Prefers ``a`` over ``b`` with probability ``sigmoid(beta * (gold(a) - gold(b)))``.

    :param gold: the gold scorer (e.g. the task's).
    :param beta: label sharpness; ``inf`` gives noise-free labels, 0 coin flips.
    :param seed: seeds the label noise.
    """

    def __init__(self, gold: Scorer, beta: float = 10.0, seed: int = 0) -> None:
        if not beta >= 0:  # also rejects NaN, which would silently label every pair 'b preferred'
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.gold, self.beta = gold, beta
        self.rng = np.random.default_rng(seed)

    def prefer_first_probability(self, gold_a: np.ndarray, gold_b: np.ndarray) -> np.ndarray:
        """``P(a ≻ b)`` under the Bradley–Terry model."""
        diff = np.asarray(gold_a, dtype=np.float64) - np.asarray(gold_b, dtype=np.float64)
        if np.isinf(self.beta):
            return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        return 1.0 / (1.0 + np.exp(-self.beta * diff))

    def label(self, prompts: Sequence[str | Example], a: Sequence[str], b: Sequence[str]) -> list[PreferencePair]:
        """Label each ``(prompt, a, b)``; the pair's ``margin`` is left unset (it is not observed by a human).

        :param prompts: strings or example records; a record's columns reach the gold scorer and the pair.
        """
        examples = load_examples(list(prompts)) if len(prompts) else []
        texts, columns = [e.prompt for e in examples], columns_of(examples)
        gold_a = call_scorer(self.gold, texts, a, columns, "gold scorer")
        gold_b = call_scorer(self.gold, texts, b, columns, "gold scorer")
        first = self.rng.random(len(prompts)) < self.prefer_first_probability(gold_a, gold_b)
        return [
            PreferencePair.of(e, x, y) if f else PreferencePair.of(e, y, x)
            for e, x, y, f in zip(examples, a, b, first, strict=True)
        ]


class HumanAnnotator:
    """Asks a person in the terminal which completion is better (``1``, ``2``, or ``s`` to skip a pair).

    :param ask: the input function (``input`` by default; tests pass their own).
    """

    def __init__(self, ask: Callable[[str], str] = input) -> None:
        self.ask = ask

    def label(self, prompts: Sequence[str | Example], a: Sequence[str], b: Sequence[str]) -> list[PreferencePair]:
        """Ask about each ``(prompt, a, b)``, showing the example's references when it has them."""
        pairs = []
        examples = load_examples(list(prompts)) if len(prompts) else []
        for example, x, y in zip(examples, a, b, strict=True):
            shown = "".join(f"\nREFERENCE: {r}" for r in example.references)
            question = f"\nPROMPT: {example.prompt}{shown}\n  [1] {x}\n  [2] {y}\nWhich is better? [1/2/s(kip)] "
            while (answer := self.ask(question).strip().lower()) not in ("1", "2", "s"):
                print("please answer 1, 2 or s")
            if answer != "s":
                pairs.append(PreferencePair.of(example, x, y) if answer == "1" else PreferencePair.of(example, y, x))
        return pairs
