"""Gold scorers: fixed, programmatic judges that simulate a human's preference.

RLHF research needs a ground truth that the learned reward model only approximates, so that reward hacking
shows up as a gap between reward-model score and gold score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from text_env.sandbox import Sandbox, TestReport

__all__ = ["ChrF", "Coverage", "RougeL", "TestsPassed", "VaderSentiment"]


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


def _score_rows(
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
        return _score_rows(self.name, "references", prompts, completions, references, self.score_one)

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
        turns = [prompt.strip(), *(line.strip() for line in prompt.splitlines() if line.strip())]
        echo = self._chrf.sentence_score(reply, turns).score / 100  # the whole prompt or one of its lines
        return chrf - self.copy_penalty if echo >= self.copy_threshold and echo > chrf else chrf


class Coverage:
    """Concept coverage (CommonGen's constrained generation): the fraction of the example's ``concepts`` that the
    sentence uses, in ``[0, 1]``, with penalties for the two cheap ways to cover them without writing a sentence.

    A concept counts when a word of the completion is the concept or a regular inflection of it (plural ``-s``,
    ``-es``, ``-ies``, ``-ed``, ``-ing``, ``-er``: :func:`text_env.tasks.concepts.inflections`), case-insensitively;
    irregular forms ("ran") do not. A **list** (at least half of the comma-, semicolon- or newline-separated parts
    are bare concept words, joined at most by "and"/"or", and they hold two concept words or more, as in "dog,
    frisbee, catch" or an echo of the prompt) loses ``list_penalty``; every use of a concept beyond ``max_repeats``
    loses ``repeat_penalty``, at most 1 in all. The score is clipped to ``[-1, 1]``; an empty (whitespace-only)
    completion scores -1, the floor. It takes the ``concepts`` column; a prompt without concepts is an error.

    :param list_penalty: subtracted from a list's coverage (default 1: a list scores at most 0).
    :param repeat_penalty: subtracted per use of a concept beyond ``max_repeats``.
    :param max_repeats: uses of one concept that cost nothing (a sentence may name a thing twice).
    """

    name = "concept coverage"

    _CONNECTORS = frozenset({"and", "or"})

    def __init__(self, list_penalty: float = 1.0, repeat_penalty: float = 0.25, max_repeats: int = 2) -> None:
        self.list_penalty, self.repeat_penalty, self.max_repeats = list_penalty, repeat_penalty, max_repeats

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], concepts: Sequence[Sequence[str] | None]
    ) -> np.ndarray:
        """:return: :meth:`score_one` of each row, shape ``(len(completions),)``."""
        return _score_rows(self.name, "concepts", prompts, completions, concepts, self.score_one)

    def score_one(self, prompt: str, completion: str, concepts: list[str]) -> float:
        """The penalised coverage of one completion, in ``[-1, 1]`` (the concepts say it all, not the prompt)."""
        from text_env.tasks.concepts import inflections

        if not completion.strip():
            return -1.0
        forms = {concept: inflections(concept.lower()) for concept in concepts}
        words = re.findall(r"[a-z]+", completion.lower())
        uses = {concept: sum(word in forms[concept] for word in words) for concept in concepts}
        coverage = sum(n > 0 for n in uses.values()) / len(concepts)
        any_form = set().union(*forms.values())
        parts = [re.findall(r"[a-z]+", part) for part in re.split(r"[,;\n]", completion.lower())]
        parts = [part for part in parts if part]
        bare = [part for part in parts if all(w in any_form or w in self._CONNECTORS for w in part)]
        is_list = 2 * len(bare) >= len(parts) and sum(w in any_form for part in bare for w in part) >= 2
        excess = sum(max(0, n - self.max_repeats) for n in uses.values())
        penalty = self.list_penalty * is_list + min(1.0, self.repeat_penalty * excess)
        return float(np.clip(coverage - penalty, -1.0, 1.0))


class TestsPassed:
    """The fraction of the example's unit tests that the completed function passes, in ``[0, 1]`` (code generation).

    The program is :func:`text_env.tasks.code.program` of the ``stub`` column (imports, signature and docstring;
    without one, the prompt itself, HumanEval's base-model format) and the completion: the function the completion
    writes, or its lines as the stub's body. It runs in a :class:`~text_env.sandbox.Sandbox` child, never in this
    process, and each test counts on its own, so a function that gets half the cases right scores 0.5. A program
    that does not compile, lacks the entry point, or runs past its time scores 0 for the tests it did not pass. It
    takes the ``tests`` column (and ``entry_point``, the function bound to ``candidate``, and ``stub``); a prompt
    without tests is an error, not a 0. :meth:`pass_at_1` turns scores into the fraction of problems solved,
    HumanEval's pass@1 for one sample per problem.

    :param stop_strings: where a bare body ends (default: :data:`text_env.tasks.code.CODE_STOP_STRINGS`).
    :param sandbox: the sandbox to run in (default: ``Sandbox()``, 5 s and 1 GiB per program, 1 s per test).
    """

    name = "tests passed"
    __test__ = False  # not a pytest test class despite its name

    def __init__(self, stop_strings: Sequence[str] | None = None, sandbox: Sandbox | None = None) -> None:
        from text_env.sandbox import Sandbox
        from text_env.tasks.code import CODE_STOP_STRINGS

        self.stop_strings = tuple(CODE_STOP_STRINGS if stop_strings is None else stop_strings)
        self.sandbox = sandbox if sandbox is not None else Sandbox()

    def reports(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tests: Sequence[Sequence[str] | None],
        entry_point: Sequence[str | None] | None = None,
        stub: Sequence[str | None] | None = None,
    ) -> list[TestReport]:
        """What each program did: tests passed, of how many, and how the child ended."""
        from text_env.tasks.code import program

        entry_points = list(entry_point) if entry_point is not None else [None] * len(prompts)
        stubs = [s or p for s, p in zip(stub, prompts, strict=True)] if stub is not None else list(prompts)
        for prompt, row in zip(prompts, tests, strict=True):
            if not row:
                raise ValueError(f"{self.name} needs tests, and prompt {prompt[:60]!r} has none")
        rows = zip(stubs, completions, entry_points, strict=True)
        programs = [program(s, c, e, self.stop_strings) for s, c, e in rows]
        return self.sandbox.run_batch(programs, [list(t or ()) for t in tests], entry_points)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tests: Sequence[Sequence[str] | None],
        entry_point: Sequence[str | None] | None = None,
        stub: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """:return: the fraction of each row's tests passed, shape ``(len(completions),)``."""
        reports = self.reports(prompts, completions, tests, entry_point, stub)
        return np.array([r.fraction for r in reports], dtype=np.float64)

    @staticmethod
    def pass_at_1(scores: Sequence[float] | np.ndarray) -> float:
        """The fraction of problems whose every test passes (score 1), from one completion each."""
        return float(np.mean(np.asarray(scores) >= 1.0)) if len(scores) else 0.0
