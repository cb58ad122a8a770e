"""Gold scorers: fixed, programmatic judges that simulate a human's preference.

RLHF research needs a ground truth that the learned reward model only approximates, so that reward hacking
shows up as a gap between reward-model score and gold score. The judges here serve several tasks (sentiment, and
reference metrics for summaries, replies and translations); a judge that only one task uses lives with its task
(:class:`text_env.tasks.concepts.Coverage`, :class:`text_env.tasks.code.TestsPassed`), which imports this module,
never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ChrF", "RougeL", "VaderSentiment", "score_rows"]


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


def score_rows(
    name: str,
    column: str,
    prompts: Sequence[str],
    completions: Sequence[str],
    values: Sequence[Sequence[str] | None],
    score_one: Callable[[str, str, list[str]], float],
) -> np.ndarray:
    """``score_one(prompt, completion, value)`` of each row, for a scorer that needs a list ``column`` on every row:
    a row without it is an error, not a 0 (the task, not the policy, is wrong)."""
    scores = []
    for prompt, completion, value in zip(prompts, completions, values, strict=True):
        if not value:
            raise ValueError(f"{name} needs {column}, and prompt {prompt[:60]!r} has none")
        scores.append(score_one(prompt, completion, list(value)))
    return np.array(scores, dtype=np.float64)


class _ReferenceScorer:
    """A gold scorer that judges each completion against its example's ``references`` column, one row at a time; a
    prompt without references is an error, not a 0 (the task, not the policy, is wrong)."""

    name = "reference metric"

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[Sequence[str] | None]
    ) -> np.ndarray:
        """:return: :meth:`score_one` of each row, shape ``(len(completions),)``."""
        return score_rows(self.name, "references", prompts, completions, references, self.score_one)

    def score_one(self, prompt: str, completion: str, references: list[str]) -> float:
        """The score of one completion (``references`` is not empty)."""
        raise NotImplementedError


class RougeL(_ReferenceScorer):
    """ROUGE-L F1 of the completion against the example's references (the best over them), in ``[0, 1]``.

    Computed by the ``rouge-score`` package (Porter stemming on), the implementation summarisation papers report, never
    a hand-written one. It takes the ``references`` column; a prompt without references is an error, not a 0.
    """

    name = "ROUGE-L F1"

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score_one(self, prompt: str, completion: str, references: list[str]) -> float:
        """The best ROUGE-L F1 of the completion over its references."""
        return max(self._scorer.score(ref, completion)["rougeL"].fmeasure for ref in references)


class ChrF(_ReferenceScorer):
    """chrF (character n-gram F-score, Popović 2015) of the reply against the example's references, in ``[0, 1]``,
    with penalties that close the two cheap ways to score without replying.

    chrF is computed by ``sacrebleu`` (``sacrebleu.metrics.CHRF``, its defaults: character 6-grams, beta 2; the best
    over the references), never by hand. Character n-grams give partial credit for inflections and near-misses,
    which word-level BLEU gives a one-line reply almost never. An empty (whitespace-only) reply scores
    ``-empty_penalty``; a reply that matches the prompt or one of its lines (chrF) at least ``copy_threshold`` and
    better than any reference is an echo and loses ``copy_penalty``. An echo the corpus itself gives ("Hello" to
    "Hello") is not penalised. It takes the ``references`` column; a prompt without references is an error.

    :param empty_penalty: score of an empty reply, negated (default 1: below every non-empty reply).
    :param copy_penalty: subtracted from an echo's chrF (default 1: an echo scores at most 0).
    :param copy_threshold: chrF against the prompt, in ``[0, 1]``, from which a reply counts as a copy.
    """

    name = "chrF (sacrebleu)"

    def __init__(self, empty_penalty: float = 1.0, copy_penalty: float = 1.0, copy_threshold: float = 0.6) -> None:
        from sacrebleu.metrics import CHRF

        self._chrf = CHRF()
        self.empty_penalty, self.copy_penalty, self.copy_threshold = empty_penalty, copy_penalty, copy_threshold

    def score_one(self, prompt: str, completion: str, references: list[str]) -> float:
        """The reply's penalised chrF, in ``[-max(penalties), 1]``."""
        reply = completion.strip()
        if not reply:
            return -self.empty_penalty
        chrf = self._chrf.sentence_score(reply, references).score / 100
        return chrf - self.copy_penalty if self.echoes(prompt, reply, chrf) else chrf

    def echoes(self, prompt: str, reply: str, chrf: float) -> bool:
        """Whether ``reply`` (of chrF ``chrf`` against the references) copies the prompt or one of its lines."""
        turns = [prompt.strip(), *(line.strip() for line in prompt.splitlines() if line.strip())]
        echo = self._chrf.sentence_score(reply, turns).score / 100  # the whole prompt or one of its lines
        return echo >= self.copy_threshold and echo > chrf


class EchoPenalty(ChrF):
    """1 for a reply that :class:`ChrF` counts as an echo of the prompt or an empty one, else 0: the penalties of the
    dialogue gold as a component of their own, a count to subtract, so that a reward reads as it is meant
    (``--reward "chrf - echo"`` is the gold; ``--constraint "echo<=0.05"`` allows one reply in twenty to echo). It
    was -1 once, and ``chrf - echo`` then paid +1 for every echo: a measured run's reward rose while its gold fell."""

    name = "echo penalty"

    def score_one(self, prompt: str, completion: str, references: list[str]) -> float:
        reply = completion.strip()
        if not reply:
            return 1.0
        return 1.0 if self.echoes(prompt, reply, self._chrf.sentence_score(reply, references).score / 100) else 0.0
