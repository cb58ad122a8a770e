"""Rewards: anything with a batched ``score(prompts, completions) -> np.ndarray`` is a reward.

A scorer that judges against references takes them as keyword columns, TRL's reward-function shape:
``score(prompts, completions, references=[...], **other_columns)``; :func:`call_scorer` passes each scorer only the
columns its ``score`` names (all of them to one with ``**kwargs``), so scorers without columns work unchanged. A
scorer's ``name`` labels it in plots and reports (:func:`scorer_name`).

Gold scorers (:mod:`text_env.rewards.gold`) stand in for human judgement; learned reward models
(:mod:`text_env.rewards.reward_model`) are what RLHF optimises.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Scorer", "call_scorer", "check_scores", "scorer_name"]


@runtime_checkable
class Scorer(Protocol):
    """The reward interface: one float per (prompt, completion) pair, higher is better."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Score a batch. :return: float array of shape ``(len(prompts),)``."""
        ...


def scorer_name(scorer: object) -> str:
    """A scorer's ``name`` for plots and reports (its class name when it has none)."""
    return str(getattr(scorer, "name", None) or type(scorer).__name__)


def call_scorer(
    scorer: Scorer,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, list[Any]] | None = None,
    role: str = "scorer",
) -> np.ndarray:
    """``scorer.score(prompts, completions, **columns)``, passing only the columns its ``score`` accepts, checked
    with :func:`check_scores` (errors name the scorer).

    :param columns: one list per column, aligned with ``prompts`` (e.g. ``{"references": [["a summary"], ...]}``).
    :param role: what the scorer is here (``"reward_model"``, ``"gold scorer"``), for error messages.
    """
    params = inspect.signature(scorer.score).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        wanted = dict(columns or {})
    else:
        names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
        wanted = {k: v for k, v in (columns or {}).items() if k in names}
    scores = scorer.score(prompts, completions, **wanted)
    return check_scores(scores, prompts, f"{role} {type(scorer).__name__}.score")


def check_scores(scores: object, prompts: Sequence[str], what: str = "reward") -> np.ndarray:
    """Return ``scores`` as a float64 array of shape ``(len(prompts),)``; raise if it is not numbers, has the wrong
    shape, or holds a NaN/inf.

    A scorer's mistakes would otherwise surface far from it (strings parse as floats, ``None`` becomes NaN) or
    silently poison an RL run, so they stop here, naming the scorer (``what``) and, for a bad value, the prompt.
    """
    expected = f"it must return one finite number per prompt ({len(prompts)} here), as an array or list"
    if scores is None:
        raise TypeError(f"{what} returned None; {expected}")
    if isinstance(scores, (str, bytes)):
        raise TypeError(f"{what} returned a {type(scores).__name__} ({scores!r:.60}); {expected}")
    try:
        raw = np.asarray(scores)
        flat = raw.reshape(-1)
        if raw.dtype == object:  # Python objects: numbers (floats, torch scalars) convert, None and text must not
            wrong = [x for x in flat if x is None or isinstance(x, (str, bytes))]
            if wrong:
                raise TypeError(f"it holds a {type(wrong[0]).__name__}")
        elif raw.dtype.kind not in "biuf":
            raise TypeError(f"its values are {raw.dtype}")
        arr = flat.astype(np.float64)
    except (TypeError, ValueError) as err:  # ValueError: ragged nesting, or an object float() rejects
        raise TypeError(f"{what} returned {scores!r:.80} ({type(scores).__name__}; {err}); {expected}") from err
    if arr.shape != (len(prompts),):
        raise ValueError(f"{what} returned {arr.shape[0]} scores for {len(prompts)} prompts; {expected}")
    bad_rows = np.flatnonzero(~np.isfinite(arr))
    if bad_rows.size:
        i = int(bad_rows[0])
        raise ValueError(
            f"{what} returned a non-finite score ({arr[i]}) for prompt {prompts[i]!r}; scores must be finite"
        )
    return arr
