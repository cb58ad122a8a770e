"""What the single env and the batched vector env share: the spaces, the prompt pool, the sequence layout,
action checks and batched scoring. One place, so that both envs give the same episodes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from text_env.models import DEFAULT_MODEL, load_config, load_tokenizer
from text_env.prompts import Example, PromptSource, as_example, columns_of, encode_prompt, load_examples
from text_env.rewards import Scorer, call_scorer
from text_env.rewards.composite import CompositeReward, WordCount, parse_reward
from text_env.tasks import Task, get_task

__all__ = ["RESET_OPTIONS", "TextGenCore", "check_options", "resolve_reward"]

DEFAULT_TASK = "positive-review"
RESET_OPTIONS = ("prompt",)
"""The keys ``reset(options=...)`` understands."""


def check_options(options: object) -> dict:
    """Return ``options`` as a dict (``None``: empty); raise on anything but a dict of :data:`RESET_OPTIONS` keys.

    A mistyped key would otherwise be ignored silently and the episode would run on a drawn prompt.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"reset options must be a dict (keys {list(RESET_OPTIONS)}) or None, not {options!r}")
    unknown = sorted(set(options) - set(RESET_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; the allowed keys are {list(RESET_OPTIONS)}")
    return options


def resolve_reward(
    reward_model: Scorer | str | os.PathLike[str] | None,
    task: Task,
    reward_kwargs: dict[str, Any] | None = None,
    composite: str | None = None,
) -> Scorer:
    """Turn the env's ``reward_model`` argument into a scorer.

    ``None``: the task's default (its learned reward model if it ships one, else its gold scorer); ``"gold"``: the
    task's gold scorer; a path: a saved reward model directory; any object with ``score(prompts, completions)``
    (and optionally keyword columns, see :func:`~text_env.rewards.call_scorer`) is used as it is.

    :param reward_kwargs: keyword arguments of :meth:`RewardModel.load <text_env.rewards.reward_model.RewardModel.load>`
        for a learned reward model, e.g. ``{"aggregate": "min"}`` or ``{"aggregate": "mean_minus_var", "lam": 1.0}``
        for an ensemble; an error for ``"gold"`` or a scorer object, which have nothing to load.
    :param composite: a weighted sum of named components, e.g. ``"rm + 0.3*gold"``, where ``rm`` is the scorer
        ``reward_model`` names (:func:`text_env.rewards.composite.parse_reward`).
    """
    if composite is not None:
        scorers = {
            "rm": lambda: resolve_reward(reward_model, task, reward_kwargs), "gold": lambda: task.gold,
            "words": WordCount, **task.components,
        }  # fmt: skip
        return parse_reward(composite, scorers)
    if reward_model is None:
        reward_model = task.reward_model or "gold"
    if reward_kwargs and (reward_model == "gold" or not isinstance(reward_model, (str, os.PathLike))):
        shown = reward_model if isinstance(reward_model, str) else type(reward_model).__name__
        raise ValueError(
            f"reward_kwargs {reward_kwargs} apply to a reward-model directory (RewardModel.load's keywords), but the "
            f"reward model is {shown!r}: drop reward_kwargs, or pass RewardModel.load(dir, ...) as reward_model"
        )
    if reward_model == "gold":
        return task.gold
    if isinstance(reward_model, (str, os.PathLike)):
        from text_env.rewards.reward_model import RewardModel

        return RewardModel.load(reward_model, **(reward_kwargs or {}))
    if not callable(getattr(reward_model, "score", None)):
        raise TypeError(
            f"reward_model must be None, 'gold', a reward-model directory, or an object with a batched "
            f"score(prompts, completions) method; got {type(reward_model).__name__}"
        )
    return reward_model


class TextGenCore:
    """``n`` token sequences in the observation layout, plus everything needed to step them.

    Layout of a row (length ``L = max_prompt_tokens + max_new_tokens``): the rendered prompt is **left-padded**
    into the first ``max_prompt_tokens`` slots, generated tokens fill the rest from the left, unused slots hold
    the pad id with attention mask 0. The prompt therefore always ends at slot ``max_prompt_tokens - 1`` and
    generated token ``t`` sits at slot ``max_prompt_tokens + t`` in every row: the layout of a left-padded batch
    in ``model.generate``.
    """

    def __init__(
        self,
        n: int = 1,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        task: str | Task = DEFAULT_TASK,
        prompts: PromptSource | None = None,
        reward_model: Scorer | str | os.PathLike[str] | None = None,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        split: str = "train",
        stop_strings: Sequence[str] | None = None,
        chat: bool | None = None,
        trust_remote_code: bool = False,
        reward_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.task = get_task(task)
        self.model_name = os.fspath(model)
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        config = load_config(model, trust_remote_code=trust_remote_code)
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))
        self.max_new_tokens = int(max_new_tokens if max_new_tokens is not None else self.task.max_new_tokens)
        self.max_prompt_tokens = int(
            max_prompt_tokens if max_prompt_tokens is not None else self.task.max_prompt_tokens
        )
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError("max_new_tokens and max_prompt_tokens must be at least 1")
        self.length = self.max_prompt_tokens + self.max_new_tokens
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and self.length > positions:  # else the first forward pass fails with an IndexError
            raise ValueError(
                f"max_prompt_tokens + max_new_tokens = {self.max_prompt_tokens} + {self.max_new_tokens} = "
                f"{self.length} is more than model {self.model_name!r} can attend to (max_position_embeddings="
                f"{positions}); lower one of them so that their sum is at most {positions}"
            )
        self.stop_strings = tuple(stop_strings if stop_strings is not None else self.task.stop_strings)
        self.chat = chat
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [int(eos)])

        self.examples = load_examples(prompts) if prompts is not None else list(self.task.examples(split))
        self.prompts = [e.prompt for e in self.examples]
        self.prompt_ids = [self.encode(p) for p in self.prompts]  # validates every length up front
        self.reward_model = resolve_reward(reward_model, self.task, reward_kwargs)
        self.gold = self.task.gold

        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, (self.length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (self.length,), np.int64),
            }
        )
        self.action_space = spaces.Discrete(self.vocab_size)

        self.n = n
        self.input_ids = np.full((n, self.length), self.pad_id, dtype=np.int64)
        self.attention_mask = np.zeros((n, self.length), dtype=np.int64)
        self.n_new = np.zeros(n, dtype=np.int64)
        self.current_example: list[Example | None] = [None] * n  # the record each row's episode runs on
        self.current_prompt = [""] * n
        self.completion = [""] * n

    # --- prompts ---------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt; raises if it does not fit (prompts are never silently cut)."""
        ids = encode_prompt(self.tokenizer, prompt, self.task.instruction, self.chat)
        if not ids:  # the policy needs at least one token to condition on
            raise ValueError(f"prompt {prompt!r} renders to no tokens at all; give a prompt with some text")
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"prompt is {len(ids)} tokens once rendered, more than max_prompt_tokens={self.max_prompt_tokens}: "
                f"{prompt[:80]!r}... Raise max_prompt_tokens or shorten the prompt."
            )
        return ids

    def start(self, i: int, rng: np.random.Generator, options: dict | None = None) -> None:
        """Begin an episode in row ``i``: the prompt (a string or an :class:`Example`) in ``options["prompt"]``, else
        one drawn with ``rng``."""
        options = check_options(options)
        if "prompt" in options:
            example = as_example(options["prompt"], "options['prompt']")
            ids = self.encode(example.prompt)
        else:
            k = int(rng.integers(len(self.examples)))
            example, ids = self.examples[k], self.prompt_ids[k]
        prompt = example.prompt
        self.input_ids[i] = self.pad_id
        self.attention_mask[i] = 0
        self.input_ids[i, self.max_prompt_tokens - len(ids) : self.max_prompt_tokens] = ids
        self.attention_mask[i, self.max_prompt_tokens - len(ids) : self.max_prompt_tokens] = 1
        self.n_new[i] = 0
        self.current_example[i] = example
        self.current_prompt[i] = prompt
        self.completion[i] = ""

    # --- actions ---------------------------------------------------------------------------------------------
    def check_action(self, action: object) -> int:
        """Return ``action`` as a token id; raise a clear error for non-integers and ids outside the vocabulary."""
        arr = np.asarray(action)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"action must be one integer token id in [0, {self.vocab_size}), "
                f"got {action!r} ({type(action).__name__})"
            )
        token = int(arr.reshape(()))
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"action {token} is outside the vocabulary: token ids are in [0, {self.vocab_size})")
        return token

    def append(self, i: int, token: int) -> tuple[bool, bool]:
        """Append ``token`` to row ``i``; return ``(terminated, truncated)``.

        The episode terminates at EOS, at a stop string, and at ``max_new_tokens``: the length limit is the MDP's own
        end (the reward is paid there and a full row has no next step), not a truncation whose value an algorithm
        should bootstrap. So no policy adds ``γ·V(s)`` after a finished completion (SB3 bootstraps on
        ``TimeLimit.truncated``, RLlib on ``truncated``). ``truncated`` is left for wrappers such as ``TimeLimit``.
        """
        slot = self.max_prompt_tokens + int(self.n_new[i])
        self.input_ids[i, slot] = token
        self.attention_mask[i, slot] = 1
        self.n_new[i] += 1
        start = self.max_prompt_tokens
        self.completion[i] = self.tokenizer.decode(
            self.input_ids[i, start : start + self.n_new[i]], skip_special_tokens=True
        )
        # Python bools, not numpy ones: they end up in infos ("TimeLimit.truncated") as well as in step()'s return.
        terminated = bool(
            token in self.eos_ids
            or any(s in self.completion[i] for s in self.stop_strings)
            or self.n_new[i] >= self.max_new_tokens
        )
        return terminated, False

    # --- observations and rewards ----------------------------------------------------------------------------
    def obs(self, i: int) -> dict[str, np.ndarray]:
        """A copy of row ``i`` as an observation."""
        return {"input_ids": self.input_ids[i].copy(), "attention_mask": self.attention_mask[i].copy()}

    def score(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Reward-model and gold scores of the finished rows, each in one batched call (with the rows' columns)."""
        prompts = [self.current_prompt[i] for i in rows]
        completions = [self.completion[i] for i in rows]
        columns = columns_of([e for i in rows if (e := self.current_example[i]) is not None])  # every row started
        rewards = call_scorer(self.reward_model, prompts, completions, columns, "reward_model")
        composite = isinstance(self.reward_model, CompositeReward)
        self.last_components = self.reward_model.last if composite else None  # type: ignore[union-attr]
        if self.reward_model is self.gold:
            return rewards, rewards
        return rewards, call_scorer(self.gold, prompts, completions, columns, "gold scorer")

    def components(self, k: int) -> dict[str, float] | None:
        """The ``k``-th scored row's score from each component of a composite reward (``None``: not composite)."""
        last = getattr(self, "last_components", None)
        return None if last is None else {name: float(scores[k]) for name, scores in last.items()}

    def info(self, i: int) -> dict:
        """``prompt`` and ``completion``; also the example's ``references`` and ``meta`` when it has them."""
        info: dict[str, Any] = {"prompt": self.current_prompt[i], "completion": self.completion[i]}
        example = self.current_example[i]
        if example is not None and example.references:
            info["references"] = example.references
        if example is not None and example.meta:
            info["meta"] = dict(example.meta)
        return info
