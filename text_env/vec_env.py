"""``TextGenVecEnv``: ``n_envs`` text episodes in one array, rewards scored in one batched call.

SB3's ``DummyVecEnv`` steps envs one by one and calls the reward model once per finished episode; here a step
appends ``n_envs`` tokens at once and every episode that ends in that step is scored together. Semantics match
``DummyVecEnv`` (auto-reset, ``terminal_observation``, ``TimeLimit.truncated``, seeds ``seed + i``), so for the
same seed both give the same episodes. Finished episodes also carry Monitor's ``info["episode"]``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvObs, VecEnvStepReturn

from text_env.core import TextGenCore, check_options

__all__ = ["TextGenVecEnv", "check_prompt_group", "make_text_vec_env"]


def check_prompt_group(n_envs: int, prompt_group: int) -> None:
    """Raise unless ``prompt_group`` divides ``n_envs`` (a run's config checks it before any model loads)."""
    if prompt_group < 1 or n_envs % prompt_group:
        raise ValueError(f"prompt_group must divide n_envs={n_envs} (1: no groups), got {prompt_group}")


class TextGenVecEnv(VecEnv):
    """A native SB3 ``VecEnv`` of ``n_envs`` :class:`~text_env.env.TextGenEnv` episodes.

    :param n_envs: number of parallel episodes.
    :param render_mode: ``"human"`` prints the texts on ``render()``; otherwise ``render()`` returns them.
    :param prompt_group: envs ``i`` with the same ``i // prompt_group`` draw their prompts from one seed, so that the
        k-th episodes of a group answer the same prompt: several samples of a prompt, from which a learner can take a
        per-prompt baseline (RLOO's, GRPO's). 1: every env draws its own.
    :param env_kwargs: the keyword arguments of :class:`~text_env.env.TextGenEnv` (``model``, ``task``, ...).
    """

    def __init__(
        self, n_envs: int = 1, render_mode: str | None = None, prompt_group: int = 1, **env_kwargs: Any
    ) -> None:
        check_prompt_group(n_envs, prompt_group)
        self.prompt_group = prompt_group
        self.core = TextGenCore(n_envs, **env_kwargs)
        # Set before VecEnv.__init__, which reads it through get_attr (else it warns and drops the render mode).
        self.render_mode = render_mode
        super().__init__(n_envs, self.core.observation_space, self.core.action_space)
        group_seeds = [seeding.np_random(None)[1] for _ in range(n_envs // prompt_group)]
        self._rngs = [seeding.np_random(group_seeds[i // prompt_group])[0] for i in range(n_envs)]
        self._actions = np.zeros(n_envs, dtype=np.int64)
        self._started = time.time()

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    def _obs(self) -> VecEnvObs:
        return {"input_ids": self.core.input_ids.copy(), "attention_mask": self.core.attention_mask.copy()}

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Env ``i`` draws its prompts from ``seed + i // prompt_group`` (SB3's ``seed + i`` without groups)."""
        seeds = super().seed(seed)
        self._seeds = [seeds[0] + i // self.prompt_group for i in range(self.num_envs)]  # type: ignore[operator]
        return self._seeds

    def reset(self) -> VecEnvObs:
        for i in range(self.num_envs):
            if self._seeds[i] is not None:
                self._rngs[i] = seeding.np_random(self._seeds[i])[0]
            self.core.start(i, self._rngs[i], self._options[i] or None)
            self.reset_infos[i] = self.core.info(i)
        self._reset_seeds()
        self._reset_options()
        return self._obs()

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        """Options for the next ``reset()``: a dict for every env or one per env; keys from ``RESET_OPTIONS``."""
        for opts in options if isinstance(options, list) else [options]:
            check_options(opts)
        super().set_options(options)

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) and actions.shape != (self.num_envs, 1):
            raise ValueError(f"expected {self.num_envs} actions (one token id per env), got shape {actions.shape}")
        self._actions = np.array([self.core.check_action(a) for a in actions.reshape(self.num_envs)], dtype=np.int64)

    def step_wait(self) -> VecEnvStepReturn:
        """Append the actions; score every episode that ended in one batched call, then auto-reset those rows.

        If scoring raises, the finished rows start their next episodes before the error propagates (their scores are
        lost), so that the env stays usable: the next ``step`` or ``reset`` works.
        """
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float32)
        dones = np.zeros(n, dtype=bool)
        infos: list[dict[str, Any]] = []
        finished = []
        for i in range(n):
            terminated, truncated = self.core.append(i, int(self._actions[i]))
            info = self.core.info(i)
            info["TimeLimit.truncated"] = truncated and not terminated
            if terminated or truncated:
                dones[i] = True
                finished.append(i)
            infos.append(info)
        if finished:
            try:
                scores, gold = self.core.score(finished)
            except Exception:
                # The finished rows are full (or ended): stepping them again would write past the row. Start their
                # next episodes, as a successful step would have, so that the env stays usable; their scores are lost.
                for i in finished:
                    self.core.start(i, self._rngs[i])
                    self.reset_infos[i] = self.core.info(i)
                raise
            for k, i in enumerate(finished):
                rewards[i] = scores[k]
                infos[i]["reward_model_score"], infos[i]["gold_score"] = float(scores[k]), float(gold[k])
                if (components := self.core.components(k)) is not None:
                    infos[i]["reward_components"] = components
                # What SB3's Monitor wrapper adds, so that `rollout/ep_rew_mean` and `ep_len_mean` get logged.
                infos[i]["episode"] = {
                    "r": float(scores[k]), "l": int(self.core.n_new[i]), "t": round(time.time() - self._started, 6)
                }  # fmt: skip
                infos[i]["terminal_observation"] = self.core.obs(i)
                self.core.start(i, self._rngs[i])
                self.reset_infos[i] = self.core.info(i)
        return self._obs(), rewards, dones, infos

    def close(self) -> None:
        pass

    def render(self, mode: str | None = None) -> Any:
        """``"ansi"``/``None``: the list of current texts; ``"human"``: print them."""
        texts = [p + c for p, c in zip(self.core.current_prompt, self.core.completion, strict=True)]
        if (mode or self.render_mode) == "human":
            print("\n---\n".join(texts), flush=True)
            return None
        return texts

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # Attribute access on the (virtual) sub-envs: they all share one core, so every index sees the same value.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        if attr_name in ("render_mode", "prompt_group"):  # the vector env's own
            value = getattr(self, attr_name)
        else:
            value = getattr(self.core, attr_name)  # may raise
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.core, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        method = getattr(self.core, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def make_text_vec_env(
    n_envs: int = 1, seed: int | None = None, prompt_group: int = 1, **env_kwargs: Any
) -> TextGenVecEnv:
    """Like SB3's ``make_vec_env("TextGen-v0", n_envs, seed)``, but batched: one :class:`TextGenVecEnv`.

    :param n_envs: number of parallel episodes (the batch size of rollouts).
    :param seed: env ``i`` draws its prompts from seed ``seed + i``, as in ``make_vec_env`` (``seed + i //
        prompt_group`` with groups).
    :param prompt_group: envs that answer the same prompts (:class:`TextGenVecEnv`).
    :param env_kwargs: the keyword arguments of :class:`~text_env.env.TextGenEnv`.
    """
    venv = TextGenVecEnv(n_envs, prompt_group=prompt_group, **env_kwargs)
    if seed is not None:
        venv.seed(seed)
    return venv
