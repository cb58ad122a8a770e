"""Prompt sets: where prompts come from, and how a prompt becomes the token ids of an observation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = ["PromptSource", "encode_prompt", "load_prompts", "read_jsonl", "render_prompt"]

PromptSource = Sequence[str] | str | os.PathLike[str]
"""A list of strings, a ``.txt`` file (one prompt a line), a ``.jsonl`` file (a ``prompt`` or ``text`` field a
line), or ``"hf:NAME"`` for a Hugging Face ``datasets`` dataset (a hub id or a local directory of data files)."""


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", record)`` for each non-blank line; a line that is not JSON raises, naming its place."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def _from_jsonl(path: Path, column: str) -> list[str]:
    prompts = []
    for where, record in read_jsonl(path):
        keys = [k for k in (column, "text") if isinstance(record, dict) and k in record]
        if not keys or not isinstance(record[keys[0]], str):
            raise ValueError(f"{where}: expected an object with a string field {column!r} or 'text'")
        prompts.append(record[keys[0]])
    return prompts


def load_prompts(source: PromptSource, column: str = "prompt", split: str = "train") -> list[str]:
    """Load prompts from a list, a file or a ``datasets`` spec (see :data:`PromptSource`).

    :param column: the field holding the prompt in ``.jsonl`` files and datasets.
    :param split: the dataset split, for ``"hf:"`` specs.
    :raises ValueError: an empty set, a malformed line (with its line number), or an unknown file type.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        import datasets

        name = source[3:]
        dataset = datasets.load_dataset(name, split=split)
        if column not in dataset.column_names:
            raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {dataset.column_names}")
        prompts = list(dataset[column])
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist (give a .txt, a .jsonl, 'hf:NAME' or a list)")
        if path.suffix == ".jsonl":
            prompts = _from_jsonl(path, column)
        elif path.suffix == ".txt":
            prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise ValueError(f"prompt file {path} must end in .txt or .jsonl")
    else:
        prompts = list(source)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("a prompt list must hold only strings")
    if not prompts:
        raise ValueError(f"no prompts in {source!r}")
    return prompts


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, instruction: str | None = None, chat: bool | None = None
) -> str:
    """Return the text the model sees before its first generated token.

    With a chat template (``chat=None`` means: when the tokenizer has one), a task ``instruction`` becomes the user
    turn and the prompt is pre-filled as the start of the assistant turn, so the model *continues* it; without an
    instruction the prompt is the user turn. Without a chat template the prompt is used as it is.
    """
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    if not chat:
        return prompt
    user = instruction if instruction is not None else prompt
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompt if instruction is not None else text


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, instruction: str | None = None, chat: bool | None = None
) -> list[int]:
    """Token ids of :func:`render_prompt` (a chat template already holds its special tokens)."""
    rendered = render_prompt(tokenizer, prompt, instruction, chat)
    add_special = rendered == prompt
    return list(tokenizer(rendered, add_special_tokens=add_special)["input_ids"])
