"""Tasks: a prompt set with a train/eval split, a gold scorer and default generation settings.

Example:
    >>> from text_env.tasks import get_task
    >>> task = get_task("positive-review")
    >>> len(task.train_prompts), len(task.eval_prompts)
    (320, 80)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from text_env.rewards import Scorer

__all__ = ["Task", "get_task", "list_tasks", "register_task"]


@dataclass
class Task:
    """What to generate and how it is judged.

    :param name: registry name.
    :param train_prompts: prompts episodes are drawn from during training.
    :param eval_prompts: held-out prompts for evaluation (never used to train the policy or the reward model).
    :param make_gold: builds the gold scorer, the stand-in for a human judge (built lazily: it may be slow).
    :param instruction: the user turn when the model has a chat template; the prompt then pre-fills the reply.
    :param max_new_tokens: default episode length in generated tokens.
    :param max_prompt_tokens: default room for the rendered prompt, in tokens.
    :param stop_strings: texts that end an episode (besides EOS) once they appear in the completion.
    :param reward_model: directory of the task's default learned reward model (``None``: the gold scorer).
    """

    name: str
    train_prompts: list[str]
    eval_prompts: list[str]
    make_gold: Callable[[], Scorer]
    instruction: str | None = None
    max_new_tokens: int = 32
    max_prompt_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    reward_model: str | None = None
    _gold: Scorer | None = field(default=None, init=False, repr=False)

    @property
    def gold(self) -> Scorer:
        """The task's gold scorer (built on first use, then shared)."""
        if self._gold is None:
            self._gold = self.make_gold()
        return self._gold

    def prompts(self, split: str) -> list[str]:
        """Prompts of ``split`` (``"train"`` or ``"eval"``)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        return self.train_prompts if split == "train" else self.eval_prompts


_REGISTRY: dict[str, Callable[[], Task]] = {}
_BUILT: dict[str, Task] = {}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Register a task factory under ``name`` (it is called once, on first :func:`get_task`)."""
    _REGISTRY[name] = factory
    _BUILT.pop(name, None)


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_REGISTRY)


def get_task(task: str | Task) -> Task:
    """Return a registered task by name (a :class:`Task` passes through)."""
    if isinstance(task, Task):
        return task
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; registered tasks: {', '.join(list_tasks())}")
    if task not in _BUILT:
        _BUILT[task] = _REGISTRY[task]()
    return _BUILT[task]


_PRETRAINED = Path(__file__).parent / "rewards" / "pretrained"  # reward models shipped with the package

# --- positive-review: the offline counterpart of the IMDB positive-continuation task -------------------------

_TITLES = [
    "The Last Harbor",
    "Midnight in Ashford",
    "Glass Mountains",
    "The Quiet Engineer",
    "Red Sky Over Dunmore",
    "Paper Lanterns",
    "The Long Winter",
    "Operation Nightfall",
    "A House by the River",
    "Saltwater",
    "The Clockmaker's Daughter",
    "Iron Orchard",
    "Before the Storm",
    "The Velvet Room",
    "Northbound",
    "Second Chances",
    "The Hollow Crown of Elm Street",
    "Starlight Diner",
    "The Forgotten Coast",
    "Wild Horses",
]
_GENRES = [
    "thriller",
    "romantic comedy",
    "war drama",
    "science fiction film",
    "family movie",
    "horror film",
    "documentary",
    "crime drama",
    "musical",
    "period piece",
]
_OPENINGS = [
    # neutral lead-ins
    "I watched {title} last night, and",
    "{title} is a {genre} that runs just over two hours. The story",
    "I went into {title} knowing almost nothing about it. The first scene",
    "My friend recommended {title}, a {genre}, so I gave it a try. The acting",
    "{title} follows a small-town family over one long summer. The direction",
    "I saw {title} at a late screening with a half-empty theater. The plot",
    "The new {genre} {title} opened this weekend. As for the script,",
    "{title} is the director's third feature. Visually,",
    "I rented {title} on a rainy Sunday afternoon. The soundtrack",
    "{title}, a {genre} set in the 1970s, tells the story of two brothers. Overall,",
    # mixed lead-ins
    "I had mixed feelings going into {title}, and honestly",
    "The trailer for {title} promised a lot, but the actual {genre}",
    "Some critics loved {title} while others hated it. In my view,",
    "{title} has a strong cast, although the pacing",
    "Parts of {title} drag, yet the final act",
    "I expected more from {title}, a {genre} with a big budget. Still,",
    "{title} is uneven: the first half is slow, and the second half",
    "The reviews for {title} were lukewarm, so my expectations were low. The {genre}",
    # negative lead-ins
    "I almost walked out of {title} in the first twenty minutes, but",
    "{title} was a disappointment for most of the audience. The dialogue",
    "After the boring opening of {title}, I was ready to give up. Then",
    "The worst thing about {title} is the runtime. The characters",
    "I was tired and grumpy when I sat down to watch {title}. The {genre}",
    "{title} got terrible reviews, and the first scenes explain why. However,",
    "The sound in the theater was awful during {title}, and the film itself",
]


def _positive_review() -> Task:
    from text_env.rewards.gold import VaderSentiment

    combos = [
        opening.format(title=title, genre=genre)
        for opening, title, genre in itertools.product(_OPENINGS, _TITLES, _GENRES)
    ]
    openings = list(dict.fromkeys(combos))  # openings without {genre} repeat across genres
    rng = np.random.default_rng(20261124)
    picked = [openings[i] for i in rng.permutation(len(openings))[:400]]
    return Task(
        name="positive-review",
        train_prompts=picked[:320],
        eval_prompts=picked[320:],
        make_gold=VaderSentiment,
        instruction="Write a short review of a movie you watched.",
        max_new_tokens=32,
        max_prompt_tokens=72,  # the longest opening is 69 tokens inside SmolLM2's chat template
        reward_model=str(_PRETRAINED / "positive-review") if (_PRETRAINED / "positive-review").is_dir() else None,
    )


register_task("positive-review", _positive_review)
