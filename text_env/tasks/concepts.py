"""concepts: write one sentence using every word of a 3-5 word set from wordfreq's list (CommonGen's idea).

The concepts are common English content words from the word list the ``wordfreq`` wheel ships
(``top_n_list("en", ...)``, most frequent first): alphabetic ASCII words of three letters or more, minus a small
stop-word list (:data:`STOP_WORDS`) and minus any word that is an inflection of another listed word
("dogs" of "dog"), so the set is the same for a given wordfreq version. Sets of 3 to 5 words are drawn with a
fixed-seed RNG (no set holds two words whose inflections overlap); each distinct set goes to train or eval by a
CRC32 hash of its sorted words, so no eval set is also a train set. The concepts are the record's ``meta``
(``{"concepts": [...]}``); the gold scorer is :class:`Coverage`. No learned reward model ships.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from text_env.prompts import Example
from text_env.rewards.gold import score_rows
from text_env.tasks import Task, shipped_reward_model

__all__ = ["STOP_WORDS", "Coverage", "concept_sets", "concept_vocabulary", "inflections", "make_task", "prompt_of"]

# Function words, pronouns, auxiliaries, numerals and fillers: nothing to build a sentence around.
_FUNCTION_WORDS = """
the and for that you with this was are have not but from your all his they one can will just like about out
what has when more were who had their there her which get been would she how some also them now other its our
than only after him into then could these because well said most much very where even should may here did too
off why still those say down through while such every both same another does own under during again each
without against must might until let yet once though within along others anyone else ago per however already
anything nothing everything someone everyone something enough maybe probably actually really any many few
several least less lot whole sure able due including based following using via upon onto whether although
unless toward towards among across behind beyond above below ever never always often thing things stuff way
ways yes yeah okay please thank thanks hey etc two three four five six seven eight nine ten first second
third last next got gets getting goes going gone went come came comes coming make made makes making take took
taken says saying tell told want wanted wants need needs needed mean means meant seem seems seemed being
doing having done use used uses know known think thought see seen look looks looking myself yourself himself
themselves itself whose whatever cannot either rather quite perhaps especially currently simply usually
finally exactly sometimes instead almost according further since later together alone sorry guess shall sir
ones mine lol gonna wanna non anti
"""
# Proper names, demonyms and dates, which a word list ranks high but a concept set should not hold.
_NAMES = """
john american america york united states english british london china chinese india trump obama david james
michael paul george washington england australia europe european french jesus california russian january
february march april june july august september october november december monday tuesday wednesday thursday
friday saturday sunday christmas god
"""
# Profanity, which social-media text ranks high.
_PROFANITY = """
shit fuck fucking damn ass hell sex sexy porn dick crap bitch
"""
STOP_WORDS = frozenset((_FUNCTION_WORDS + _NAMES + _PROFANITY).split())
"""Words never used as concepts (wordfreq ranks them high, but they are function words, names or profanity)."""

_VOWELS = frozenset("aeiou")


def inflections(word: str) -> frozenset[str]:
    """``word`` and the regular inflections a concept may appear as: plural ``-s``/``-es``/``-ies``, ``-ed``, ``-ing``
    and ``-er`` (with a final ``e`` dropped, ``y`` to ``i``, or a final consonant doubled after a short vowel).
    Irregular forms ("ran", "mice") are not counted: a suffix rule needs no morphology dependency."""
    forms = {word, word + "s", word + "es", word + "ed", word + "ing", word + "er"}
    if word.endswith("e"):
        forms |= {word + "d", word + "r", word[:-1] + "ing"}
    if len(word) > 2 and word.endswith("y") and word[-2] not in _VOWELS:
        forms |= {word[:-1] + "ies", word[:-1] + "ied", word[:-1] + "ier"}
    if len(word) > 2 and word[-1] not in _VOWELS | {"w", "x", "y"} and word[-2] in _VOWELS and word[-3] not in _VOWELS:
        forms |= {word + word[-1] + suffix for suffix in ("ed", "ing", "er")}  # run -> running, runner
    return frozenset(forms)


def concept_vocabulary(n_words: int = 600, top_n: int = 3000) -> list[str]:
    """The ``n_words`` most frequent concept candidates among wordfreq's ``top_n`` English words, most frequent first
    (alphabetic, three letters or more, not in :data:`STOP_WORDS`, not an inflection of another listed word)."""
    from wordfreq import top_n_list

    candidates = [w for w in top_n_list("en", top_n) if w.isascii() and w.isalpha() and len(w) >= 3]
    inflected = set().union(*(inflections(w) - {w} for w in candidates))  # "dogs", "happened": the stem is listed
    return [w for w in candidates if w not in STOP_WORDS and w not in inflected][:n_words]


def _in_eval(concepts: Sequence[str], eval_fraction: float) -> bool:
    """A fixed, seed-free split of a concept set by the CRC32 of its sorted words: a set is on one side only."""
    return zlib.crc32(" ".join(sorted(concepts)).encode()) % 1000 < eval_fraction * 1000


def prompt_of(concepts: Sequence[str]) -> str:
    """The task's prompt for a concept set (the user turn; the model answers with the sentence)."""
    return f"Write one sentence using all of these words: {', '.join(concepts)}."


def concept_sets(
    n_train: int = 800, n_eval: int = 200, eval_fraction: float = 0.2, seed: int = 20261201
) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` records of distinct 3- to 5-word concept sets drawn from :func:`concept_vocabulary` with a
    fixed-seed RNG; each set goes to the side its hash picks (:func:`_in_eval`) until both sides are full.

    :param eval_fraction: share of the hash space that is eval (sets are drawn until each side has its count).
    :param seed: the RNG seed: the same seed and wordfreq version give the same records in the same order.
    """
    vocabulary = concept_vocabulary()
    forms = {word: inflections(word) for word in vocabulary}
    rng = np.random.default_rng(seed)
    train: list[Example] = []
    held_out: list[Example] = []
    seen: set[frozenset[str]] = set()
    while len(train) < n_train or len(held_out) < n_eval:
        size = int(rng.integers(3, 6))
        concepts = [vocabulary[i] for i in rng.choice(len(vocabulary), size=size, replace=False)]
        union = set().union(*(forms[c] for c in concepts))
        if frozenset(concepts) in seen or len(union) < sum(len(forms[c]) for c in concepts):
            continue  # a set drawn before, or two concepts that share an inflection ("car" and "care": "cares")
        seen.add(frozenset(concepts))
        side = held_out if _in_eval(concepts, eval_fraction) else train
        if len(side) < (n_eval if side is held_out else n_train):
            side.append(Example(prompt_of(concepts), (), {"concepts": concepts}))
    return train, held_out


class Coverage:
    """Concept coverage (CommonGen's constrained generation): the fraction of the example's ``concepts`` that the
    sentence uses, in ``[0, 1]``, with penalties for the two cheap ways to cover them without writing a sentence.

    A concept counts when a word of the completion is the concept or a regular inflection of it (plural ``-s``,
    ``-es``, ``-ies``, ``-ed``, ``-ing``, ``-er``: :func:`inflections`), case-insensitively;
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
        return score_rows(self.name, "concepts", prompts, completions, concepts, self.score_one)

    def score_one(self, prompt: str, completion: str, concepts: list[str]) -> float:
        """The penalised coverage of one completion, in ``[-1, 1]`` (the concepts say it all, not the prompt)."""
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


def make_task() -> Task:
    """The concepts task: 800 train and 200 eval concept sets from wordfreq, split by set hash, gold coverage."""
    train, held_out = concept_sets()
    return Task(
        name="concepts",
        reward_model=shipped_reward_model("concepts"),
        description=__doc__.strip().splitlines()[0],  # the module docstring's summary line
        recommended="PPO: no references, so no supervised step",
        train_prompts=train,
        eval_prompts=held_out,
        make_gold=Coverage,
        instruction=None,  # the request is the user turn; the model answers with the sentence
        max_new_tokens=32,
        max_prompt_tokens=64,  # the longest prompt is 49 tokens in SmolLM2's chat template
        stop_strings=("\n",),  # one sentence, one line
    )
