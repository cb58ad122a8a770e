"""Composite rewards: a weighted sum of named scorers, ``"rm + 0.3*gold"``, each component kept for logging.

A component is ``rm`` (the run's reward model: ``--reward-model``, else the task's learned one, else its gold),
``gold`` (the task's gold scorer), ``words`` (the completion's length in words), or one of the task's own named
scorers (:attr:`text_env.tasks.Task.components`, e.g. dialogue's plain ``chrf`` and its ``echo`` penalty). The env
pays the sum; every episode's info carries each component's score under ``reward_components``, so that the learner
logs them one by one and can bound any of them (``--constraint "words<=20"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from text_env.rewards import Scorer, call_scorer

__all__ = ["CompositeReward", "WordCount", "parse_reward", "reward_terms"]

_TERM = re.compile(r"\s*([+-])?\s*(?:((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*")


class WordCount:
    """The completion's length in words (whitespace-separated)."""

    name = "words"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([len(c.split()) for c in completions], dtype=np.float64)


class CompositeReward:
    """``Σ weight · scorer``; :attr:`last` holds each component's scores of the last batch.

    :param components: ``(name, weight, scorer)`` per term.
    """

    def __init__(self, components: Sequence[tuple[str, float, Scorer]]) -> None:
        if not components:
            raise ValueError("a composite reward needs at least one component")
        self.components = list(components)
        self.name = " ".join(f"{w:+g}*{n}" for n, w, _ in self.components).removeprefix("+")
        self.last: dict[str, np.ndarray] = {}

    def score(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> np.ndarray:
        self.last = {
            name: call_scorer(scorer, prompts, completions, columns, f"reward component {name!r}")
            for name, _, scorer in self.components
        }
        return np.sum([w * self.last[n] for n, w, _ in self.components], axis=0)


def parse_reward(spec: str, scorers: dict[str, Callable[[], Scorer]]) -> CompositeReward:
    """``"rm + 0.3*gold - 0.01*words"`` -> a :class:`CompositeReward` over ``scorers`` (name -> a function that
    builds it), or a one-line ``ValueError`` naming what is wrong and what is allowed."""
    weights = reward_terms(spec, tuple(scorers))
    return CompositeReward([(name, weight, scorers[name]()) for name, weight in weights.items()])


def reward_terms(spec: str, allowed_names: tuple[str, ...] | None = None) -> dict[str, float]:
    """The weight of each component of ``spec``, read without building any scorer; ``allowed_names=None`` accepts
    any name (the task's own are checked once the task is known)."""
    allowed = ", ".join(allowed_names) if allowed_names is not None else "rm, gold, words or a task's component"
    weights: dict[str, float] = {}
    pos = 0
    while pos < len(spec) or not weights:
        match = _TERM.match(spec, pos)
        if match is None or match.end() == pos:
            rest = spec[pos:].strip() or "(nothing)"
            raise ValueError(f"--reward {spec!r}: cannot read {rest!r}; write terms WEIGHT*NAME joined by + or -, NAME "
                             f"one of {allowed}")  # fmt: skip
        sign, number, name = match.groups()
        if sign is None and weights:
            raise ValueError(f"--reward {spec!r}: a + or - is missing before {name!r}")
        if allowed_names is not None and name not in allowed_names:
            raise ValueError(f"--reward {spec!r}: unknown component {name!r}; allowed: {allowed}")
        if name in weights:
            raise ValueError(f"--reward {spec!r}: {name!r} appears twice; give it one weight")
        weights[name] = (-1.0 if sign == "-" else 1.0) * (float(number) if number is not None else 1.0)
        pos = match.end()
    return weights
