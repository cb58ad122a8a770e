"""Tasks: a set of example records with a train/eval split, a gold scorer and default generation settings.

One module per task (:mod:`text_env.tasks.positive_review`, ...), each with a ``make_task()``; this module owns the
registry, which builds a task on first :func:`get_task`.

Example:
    >>> from text_env.tasks import get_task
    >>> task = get_task("positive-review")
    >>> len(task.train_prompts), len(task.eval_prompts)
    (320, 80)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from text_env.prompts import Example, load_examples
from text_env.rewards import Scorer

__all__ = ["Task", "get_task", "list_tasks", "register_task", "shipped_reward_model"]


@dataclass
class Task:
    """What to generate and how it is judged.

    :param name: registry name.
    :param train_prompts: prompts episodes are drawn from during training: strings or :class:`Example` records
        (with references or metadata for the gold scorer); stored as records, see :meth:`examples`.
    :param eval_prompts: held-out prompts for evaluation (never used to train the policy or the reward model).
    :param make_gold: builds the gold scorer, the stand-in for a human judge (built lazily: it may be slow).
    :param instruction: the user turn when the model has a chat template; the prompt then pre-fills the reply.
    :param max_new_tokens: default episode length in generated tokens.
    :param max_prompt_tokens: default room for the rendered prompt, in tokens.
    :param stop_strings: texts that end an episode (besides EOS) once they appear in the completion.
    :param reward_model: directory of the task's default learned reward model (``None``: the gold scorer).
    :param description: what is asked and where the data comes from, one line (``textgen tasks`` lists it).
    :param components: the task's own named scorers (name -> a function that builds one), which a composite reward
        (``--reward "chrf - 0.5*echo"``, :mod:`text_env.rewards.composite`) may weigh beside ``rm``, ``gold`` and
        ``words``.
    :param recommended: which training path to take (PPO, or SFT + PPO) and the measurement that says so, one line
        for ``textgen tasks`` (empty: not measured).
    """

    name: str
    train_prompts: Sequence[str | Example]
    eval_prompts: Sequence[str | Example]
    make_gold: Callable[[], Scorer]
    instruction: str | None = None
    max_new_tokens: int = 32
    max_prompt_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    reward_model: str | None = None
    description: str = ""
    components: dict[str, Callable[[], Scorer]] = field(default_factory=dict)
    recommended: str = ""
    _gold: Scorer | None = field(default=None, init=False, repr=False)
    _examples: dict[str, list[Example]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        # The records are the task's data; the prompt lists stay plain strings for code that only needs the text.
        for split, source in (("train", self.train_prompts), ("eval", self.eval_prompts)):
            self._examples[split] = load_examples(list(source)) if len(source) else []
        self.train_prompts = [e.prompt for e in self._examples["train"]]
        self.eval_prompts = [e.prompt for e in self._examples["eval"]]

    @property
    def gold(self) -> Scorer:
        """The task's gold scorer (built on first use, then shared)."""
        if self._gold is None:
            self._gold = self.make_gold()
        return self._gold

    def examples(self, split: str) -> list[Example]:
        """Example records of ``split`` (``"train"`` or ``"eval"``): prompts with their references and metadata."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        return self._examples[split]

    def prompts(self, split: str) -> list[str]:
        """Prompt texts of ``split`` (``"train"`` or ``"eval"``)."""
        return [e.prompt for e in self.examples(split)]


_PRETRAINED = Path(__file__).parents[1] / "rewards" / "pretrained"  # reward models shipped with the package


def shipped_reward_model(task: str) -> str | None:
    """The directory of the reward model shipped for ``task`` (``text_env/rewards/pretrained/<task>``, with the
    ``HOW_MADE.md`` that re-makes it), or ``None`` when none ships: a task's default ``reward_model``."""
    path = _PRETRAINED / task
    return str(path) if (path / "reward_model.json").is_file() else None


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
    """Return a registered task by name (a :class:`Task` passes through).

    ``"module:name"`` first imports ``module``, which registers ``name`` (gymnasium's ``gym.make("module:Env-v0")``
    convention): how a task of one's own, e.g. :func:`text_env.tasks.translation.make_task` on one's parallel data,
    reaches ``textgen train --task`` and every other place that takes a task name.
    """
    if isinstance(task, Task):
        return task
    if task not in _REGISTRY and ":" in task:
        module, _, name = task.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"task {task!r}: cannot import {module!r} to register {name!r} ({e})") from e
        if name not in _REGISTRY:
            raise ValueError(
                f"task {task!r}: importing {module!r} registered no task {name!r}; registered tasks: "
                f"{', '.join(list_tasks())}"
            )
        task = name
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; registered tasks: {', '.join(list_tasks())}")
    if task not in _BUILT:
        _BUILT[task] = _REGISTRY[task]()
    return _BUILT[task]


def _builtin(module: str) -> Callable[[], Task]:
    """A factory that imports ``text_env.tasks.<module>`` only when the task is first asked for."""
    return lambda: importlib.import_module(f"text_env.tasks.{module}").make_task()


register_task("positive-review", _builtin("positive_review"))
register_task("summarize-docstring", _builtin("summarize_docstring"))
register_task("dialogue", _builtin("dialogue"))
register_task("concepts", _builtin("concepts"))
register_task("code", _builtin("code"))
