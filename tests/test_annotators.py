"""Annotators: Bradley–Terry statistics of the simulated annotator, and the terminal annotator's dialogue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from text_env.rewards.annotators import HumanAnnotator, SimulatedAnnotator
from text_env.rewards.preferences import PreferencePair


class TableGold:
    """A gold scorer with known scores: the number after the last ``:`` of the completion."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([float(c.rsplit(":", 1)[-1]) for c in completions], dtype=np.float64)


def fraction_first_preferred(annotator: SimulatedAnnotator, gold_a: float, gold_b: float, n: int) -> float:
    a, b = f"a:{gold_a!r}", f"b:{gold_b!r}"  # distinct texts even when the gold scores are equal
    pairs = annotator.label(["p"] * n, [a] * n, [b] * n)
    assert len(pairs) == n and all(p.prompt == "p" and {p.chosen, p.rejected} == {a, b} for p in pairs)
    return float(np.mean([p.chosen == a for p in pairs]))


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("diff", [-0.6, -0.1, 0.0, 0.25, 1.0])
def test_simulated_annotator_matches_bradley_terry(beta: float, diff: float) -> None:
    n = 4000
    annotator = SimulatedAnnotator(TableGold(), beta=beta, seed=123)
    observed = fraction_first_preferred(annotator, 0.3 + diff, 0.3, n)
    expected = 1.0 / (1.0 + np.exp(-beta * diff))
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) <= 4 * sigma + 1e-9, (observed, expected)
    assert annotator.prefer_first_probability(np.array([0.3 + diff]), np.array([0.3]))[0] == pytest.approx(expected)


def test_simulated_annotator_beta_inf_is_noise_free() -> None:
    annotator = SimulatedAnnotator(TableGold(), beta=float("inf"), seed=0)
    a = ["0.1", "0.9", "0.5", "-1.0", "0.30001"]
    b = ["0.2", "0.0", "0.4", "-2.0", "0.3"]
    for _ in range(20):  # no label noise whatever the random draws
        pairs = annotator.label(["p"] * len(a), a, b)
        assert [p.chosen for p in pairs] == ["0.2", "0.9", "0.5", "-1.0", "0.30001"]
    assert annotator.prefer_first_probability(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5])).tolist() == [
        1.0,
        0.0,
        0.5,
    ]


def test_simulated_annotator_beta_zero_is_a_coin_flip() -> None:
    n = 4000
    observed = fraction_first_preferred(SimulatedAnnotator(TableGold(), beta=0.0, seed=7), 1.0, -1.0, n)
    assert abs(observed - 0.5) <= 4 * np.sqrt(0.25 / n)


def test_simulated_annotator_seeded() -> None:
    a, b = [str(x) for x in np.linspace(0, 1, 50)], [str(x) for x in np.linspace(1, 0, 50)]
    prompts = [f"p{i}" for i in range(50)]
    first = SimulatedAnnotator(TableGold(), beta=2.0, seed=5).label(prompts, a, b)
    again = SimulatedAnnotator(TableGold(), beta=2.0, seed=5).label(prompts, a, b)
    other = SimulatedAnnotator(TableGold(), beta=2.0, seed=6).label(prompts, a, b)
    assert first == again
    assert first != other
    assert [p.prompt for p in first] == prompts  # order kept
    assert all(p.margin is None for p in first)  # a human does not report a margin


@pytest.mark.parametrize("beta", [-0.1, -float("inf"), float("nan")])
def test_simulated_annotator_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be >= 0"):
        SimulatedAnnotator(TableGold(), beta=beta)


def test_simulated_annotator_rejects_non_finite_gold() -> None:
    with pytest.raises(ValueError, match=r"gold scorer TableGold\.score returned a non-finite score"):
        SimulatedAnnotator(TableGold()).label(["p"], ["nan"], ["0.0"])


def test_human_annotator_scripted(capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(["x", " 2 ", "1", "S"])
    questions: list[str] = []

    def ask(question: str) -> str:
        questions.append(question)
        return next(answers)

    pairs = HumanAnnotator(ask=ask).label(["p1", "p2", "p3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"])
    assert pairs == [PreferencePair("p1", "b1", "a1"), PreferencePair("p2", "a2", "b2")]  # p3 skipped
    assert len(questions) == 4  # the invalid answer was asked again
    assert questions[0] == questions[1]
    assert "PROMPT: p1" in questions[0] and "[1] a1" in questions[0] and "[2] b1" in questions[0]
    assert "please answer 1, 2 or s" in capsys.readouterr().out
    with pytest.raises(StopIteration):  # every scripted answer was consumed, no more asked
        next(answers)
