"""Prompt sets: where prompts come from, and how a prompt becomes the token ids of an observation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = ["PromptSource", "check_prompt", "encode_prompt", "load_prompts", "read_jsonl", "read_text", "render_prompt"]

PromptSource = Sequence[str] | str | os.PathLike[str]
"""A list of strings, a ``.txt`` file (one prompt a line), a ``.jsonl`` file (a ``prompt`` or ``text`` field a
line), or ``"hf:NAME"`` for a Hugging Face ``datasets`` dataset (a hub id or a local directory of data files)."""


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped), with ``\\n`` line ends.

    :param what: what the file is, for error messages (``"prompt file"``).
    :raises FileNotFoundError: there is no such file. ``IsADirectoryError``: ``path`` is a directory.
    :raises ValueError: the file is not UTF-8, naming the line and byte.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # editors on Windows often start UTF-8 files with a BOM
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            f"save the {what} as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: Path, what: str = "JSONL file") -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", record)`` for each non-blank line; a line that is not JSON raises, naming its place."""
    for lineno, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def _from_jsonl(path: Path, column: str) -> list[tuple[str, str]]:
    prompts = []
    for where, record in read_jsonl(path, "prompt file"):
        keys = [k for k in (column, "text") if isinstance(record, dict) and k in record]
        if not keys or not isinstance(record[keys[0]], str):
            raise ValueError(f"{where}: expected an object with a string field {column!r} or 'text'")
        prompts.append((where, record[keys[0]]))
    return prompts


def check_prompt(prompt: object, where: str) -> str:
    """Return ``prompt`` if it is a non-blank string; else raise, naming ``where`` it came from.

    An empty prompt gives an observation with no token to condition on, which the policy cannot score.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"{where} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty or only whitespace ({prompt!r}); every prompt needs text")
    return prompt


def load_prompts(source: PromptSource, column: str = "prompt", split: str = "train") -> list[str]:
    """Load prompts from a list, a file or a ``datasets`` spec (see :data:`PromptSource`).

    :param column: the field holding the prompt in ``.jsonl`` files and datasets.
    :param split: the dataset split, for ``"hf:"`` specs.
    :raises ValueError: an empty set, an empty prompt or a malformed line (with where it is), a file that is not
        UTF-8, or an unknown file type.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        import datasets

        name = source[3:]
        dataset = datasets.load_dataset(name, split=split)
        if column not in dataset.column_names:
            raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {dataset.column_names}")
        located = [(f"dataset {name!r} row {i}", p) for i, p in enumerate(dataset[column])]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(
                f"prompt file {path} is a directory; give a .txt or .jsonl file, or 'hf:{path}' for a directory of "
                "dataset files"
            )
        if path.suffix == ".jsonl":
            located = _from_jsonl(path, column)
        elif path.suffix == ".txt":  # one prompt a line; blank lines are skipped
            lines = read_text(path, "prompt file").split("\n")
            located = [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            raise ValueError(f"prompt file {path} must end in .txt or .jsonl")
    else:
        located = [(f"prompt {i} of the list", p) for i, p in enumerate(source)]
        if not all(isinstance(p, str) for _, p in located):
            raise TypeError("a prompt list must hold only strings")
    prompts = [check_prompt(p, where) for where, p in located]
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
