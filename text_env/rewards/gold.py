"""Gold scorers: fixed, programmatic judges that simulate a human's preference.

RLHF research needs a ground truth that the learned reward model only approximates, so that reward hacking
shows up as a gap between reward-model score and gold score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RougeL", "VaderSentiment"]


class VaderSentiment:
    """VADER compound sentiment of the completion, in ``[-1, 1]`` (the prompt is ignored).

    VADER is a lexicon and rule-based sentiment model whose lexicon ships in the ``vaderSentiment`` wheel, so it
    runs offline; it plays the role of the IMDB sentiment classifier of the classic positive-review task.
    """

    name = "VADER sentiment"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """:return: compound sentiment of each completion, shape ``(len(completions),)``."""
        return np.array([self._analyzer.polarity_scores(c)["compound"] for c in completions], dtype=np.float64)


class RougeL:
    """ROUGE-L F1 of the completion against the example's references (the best over them), in ``[0, 1]``.

    Computed by the ``rouge-score`` package (Porter stemming on), the implementation summarisation papers report, never
    a hand-written one. It takes the ``references`` column; a prompt without references is an error, not a 0.
    """

    name = "ROUGE-L F1"

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[Sequence[str] | None]
    ) -> np.ndarray:
        """:return: the best ROUGE-L F1 of each completion over its references, shape ``(len(completions),)``."""
        scores = []
        for prompt, completion, refs in zip(prompts, completions, references, strict=True):
            if not refs:
                raise ValueError(f"ROUGE-L needs references, and prompt {prompt[:60]!r} has none")
            scores.append(max(self._scorer.score(ref, completion)["rougeL"].fmeasure for ref in refs))
        return np.array(scores, dtype=np.float64)
