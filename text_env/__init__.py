"""TextGen's environment side: text generation as a token-level Gymnasium MDP, its tasks, prompts and rewards.

Importing the package registers ``TextGen-v0``; ``gym.make("text_env:TextGen-v0")`` imports it for you.
"""

from __future__ import annotations

import gymnasium as gym

from text_env.env import TextGenEnv
from text_env.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, make_tiny_model
from text_env.prompts import Example, load_examples
from text_env.rewards import Scorer
from text_env.tasks import Task, get_task, list_tasks, register_task
from text_env.vec_env import TextGenVecEnv, make_text_vec_env

__all__ = [
    "DEFAULT_MODEL",
    "Example",
    "Scorer",
    "Task",
    "TextGenEnv",
    "TextGenVecEnv",
    "get_task",
    "list_tasks",
    "load_causal_lm",
    "load_examples",
    "load_tokenizer",
    "make_text_vec_env",
    "make_tiny_model",
    "register_task",
]

if "TextGen-v0" not in gym.registry:
    # No TimeLimit wrapper: the env truncates at its own ``max_new_tokens`` (a keyword argument of gym.make).
    gym.register(id="TextGen-v0", entry_point="text_env.env:TextGenEnv")
