"""``TextGenEnv``: text generation as a token-level Gymnasium environment."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from text_env.core import DEFAULT_TASK, TextGenCore
from text_env.models import DEFAULT_MODEL
from text_env.prompts import PromptSource
from text_env.rewards import Scorer
from text_env.tasks import Task

__all__ = ["RenderModeError", "TextGenEnv"]


class RenderModeError(ValueError, TypeError):
    """A ``render_mode`` the env does not support.

    Also a ``TypeError`` on purpose: SB3's ``make_vec_env("TextGen-v0", ...)`` asks ``gym.make`` for
    ``render_mode="rgb_array"`` and makes the env again without it when that raises ``TypeError``. A text env has no
    frame to draw, so declining is the honest answer; an "rgb_array" mode that returned no image would only break
    video recorders later.
    """


class TextGenEnv(gym.Env[dict[str, np.ndarray], int]):
    """Generate a completion for a prompt, one token per step; the reward judges the finished text.

    **Episode.** One episode is one example record (:class:`~text_env.prompts.Example`: a prompt, optionally with
    references and metadata), drawn from the prompt set with ``self.np_random`` at ``reset`` (or given as
    ``reset(options={"prompt": ...})``, a string or an ``Example``; ``"prompt"`` is the only option key, an empty
    prompt or another key raises ``ValueError``).

    **Observation.** ``Dict(input_ids=Box(0, V-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`` with
    ``L = max_prompt_tokens + max_new_tokens``: the prompt (rendered with the tokenizer's chat template when it has
    one) left-padded into the first ``max_prompt_tokens`` slots, then the tokens generated so far; unused slots
    hold the pad id and mask 0. Generated token ``t`` is always at slot ``max_prompt_tokens + t``.

    **Action.** ``Discrete(V)``, ``V`` the model's vocabulary size: the next token id, appended to the sequence.

    **Termination.** ``terminated`` when the token is EOS, the completion contains a stop string, or
    ``max_new_tokens`` tokens are generated: the length limit is part of the MDP (the reward is paid there, a full
    row has no next step), so no algorithm bootstraps a value after it. ``truncated`` is never set by the env itself
    (it is registered without ``TimeLimit``).

    **Reward.** 0 at every step but the last; at the last step, the reward model's score of
    ``(prompt, completion)``. A reward model is any object with a batched ``score(prompts, completions)``; one whose
    ``score`` also takes keyword columns (``references=...``, a ``meta`` key, or ``**kwargs``) gets the example's.
    A NaN or infinite score raises ``ValueError`` naming the prompt. When scoring raises, the episode is over:
    ``step`` asks for a ``reset``, saying why.

    **Info.** ``prompt`` and ``completion`` (decoded text so far) at every step, with the example's ``references``
    and ``meta`` when it has them; at the last step also
    ``reward_model_score`` and ``gold_score`` (the task's gold scorer, the stand-in for a human judge).

    **Render.** ``"ansi"``: ``render()`` returns prompt + completion; ``"human"``: the text is streamed to stdout.

    **Prompts longer than** ``max_prompt_tokens`` raise ``ValueError`` (when the env is made, for a prompt set;
    at ``reset`` for a given prompt): they are never cut silently.

    Args:
        model: ``"default"`` (embedded SmolLM2-135M-Instruct), a local directory or a hub id. The env needs only
            its tokenizer and vocabulary size; the policy loads the weights.
        task: a registered task name or a :class:`~text_env.tasks.Task`.
        prompts: prompts replacing the task's (a list of strings or ``Example`` records, a ``.txt``/``.jsonl`` file or
            ``"hf:NAME"``; for references, pass ``load_examples(path, reference_column="summary")``).
        reward_model: ``None`` (the task's default), ``"gold"``, a reward-model directory, or a scorer object.
        reward_kwargs: keyword arguments of ``RewardModel.load`` for a learned reward model, e.g. an ensemble's
            ``{"aggregate": "min"}`` or ``{"aggregate": "mean_minus_var", "lam": 0.5}`` (default: mean).
        max_new_tokens: episode length limit (default: the task's).
        max_prompt_tokens: room for the rendered prompt (default: the task's).
        split: ``"train"`` or ``"eval"`` prompts of the task.
        stop_strings: texts that end the episode (default: the task's).
        chat: render prompts with the chat template (``None``: when the tokenizer has one).
        render_mode: ``"ansi"`` returns the text, ``"human"`` prints it; any other raises :class:`RenderModeError`.

    Example:
        >>> import gymnasium as gym
        >>> import text_env
        >>> env = gym.make("TextGen-v0")
        >>> obs, info = env.reset(seed=0)
        >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "human"]}

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        task: str | Task = DEFAULT_TASK,
        prompts: PromptSource | None = None,
        reward_model: Scorer | str | os.PathLike[str] | None = None,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        split: str = "train",
        stop_strings: Sequence[str] | None = None,
        chat: bool | None = None,
        render_mode: str | None = None,
        trust_remote_code: bool = False,
        reward_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise RenderModeError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, not {render_mode!r}"
            )
        self.core = TextGenCore(
            1, model, task, prompts, reward_model, max_new_tokens, max_prompt_tokens, split, stop_strings, chat,
            trust_remote_code, reward_kwargs,
        )  # fmt: skip
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self.render_mode = render_mode
        self._done = True
        self._failure = ""  # why the last episode ended without a reward, for the next step()'s error
        self._shown = 0

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (what the policy must share)."""
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        """The LM whose tokens are the actions: the reference that KL penalties and top-p masks default to."""
        return self.core.model_name

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._done = True  # until the new episode has started: a failed reset needs another one
        self.core.start(0, self.np_random, options)
        self._done, self._failure = False, ""
        self._shown = 0
        if self.render_mode == "human":
            print(self.core.current_prompt[0], end="", flush=True)
        return self.core.obs(0), self.core.info(0)

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._done:
            raise RuntimeError(f"the episode is over{self._failure}: call reset() before step()")
        token = self.core.check_action(action)
        terminated, truncated = self.core.append(0, token)
        info = self.core.info(0)
        reward = 0.0
        if terminated or truncated:
            self._done = True
            try:
                rewards, gold = self.core.score([0])
            except Exception as err:
                self._failure = f" (scoring it raised {type(err).__name__}: {err})"
                raise
            reward = float(rewards[0])
            info["reward_model_score"], info["gold_score"] = reward, float(gold[0])
            if (components := self.core.components(0)) is not None:
                info["reward_components"] = components
        if self.render_mode == "human":  # stream the new text, like a chat UI
            text = info["completion"]
            # A byte-level token can end inside a UTF-8 character, which decodes as U+FFFD until the rest arrives:
            # hold such a tail back, or the stream would show the placeholder instead of the character.
            ready = len(text) if self._done else len(text.rstrip("\ufffd"))
            print(text[self._shown : ready], end="\n" if self._done else "", flush=True)
            self._shown = max(self._shown, ready)
        return self.core.obs(0), reward, bool(terminated), bool(truncated), info

    def render(self) -> str | None:
        """``"ansi"``: return prompt + completion so far. ``"human"``: the text is streamed by ``reset``/``step``."""
        if self.render_mode == "ansi":
            return self.core.current_prompt[0] + self.core.completion[0]
        return None
