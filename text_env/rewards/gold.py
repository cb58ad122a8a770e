"""Gold scorers: fixed, programmatic judges that simulate a human's preference.

RLHF research needs a ground truth that the learned reward model only approximates, so that reward hacking
shows up as a gap between reward-model score and gold score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["VaderSentiment"]


class VaderSentiment:
    """VADER compound sentiment of the completion, in ``[-1, 1]`` (the prompt is ignored).

    VADER is a lexicon and rule-based sentiment model whose lexicon ships in the ``vaderSentiment`` wheel, so it
    runs offline; it plays the role of the IMDB sentiment classifier of the classic positive-review task.
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """:return: compound sentiment of each completion, shape ``(len(completions),)``."""
        return np.array([self._analyzer.polarity_scores(c)["compound"] for c in completions], dtype=np.float64)
