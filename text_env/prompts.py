"""Prompt sets: where prompts come from, the example record each becomes, and how a prompt becomes the token ids of
an observation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from text_env.extras import require

__all__ = [
    "Example",
    "PromptSource",
    "as_example",
    "check_prompt",
    "columns_of",
    "encode_prompt",
    "load_examples",
    "load_prompts",
    "read_jsonl",
    "read_text",
    "render_prompt",
]

RESERVED_COLUMNS = frozenset(
    {"prompt", "prompts", "completion", "completions", "chosen", "rejected", "margin", "references"}
)
"""Names a ``meta`` key may not take: the scorer's own arguments and the preference pair's own fields."""


@dataclass(frozen=True)
class Example:
    """One example of a task: the prompt text plus what a judge may need besides the completion.

    The env carries the record through the episode; a scorer whose ``score`` takes extra keyword arguments gets
    them as columns (:func:`columns_of`), TRL's reward-function shape; preference pairs store them.

    :param prompt: the text the model continues (rendered with the task instruction and chat template).
    :param references: reference outputs (a summary, a reply) that reference-based metrics compare against.
    :param meta: any other fields (e.g. ``{"module": "json"}``), one keyword column each.
    """

    prompt: str
    references: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_prompt(self.prompt, "Example.prompt")
        if isinstance(self.references, str) or not all(isinstance(r, str) for r in self.references):
            raise TypeError(f"Example.references must be a sequence of strings, got {self.references!r:.80}")
        object.__setattr__(self, "references", tuple(self.references))
        clash = sorted(RESERVED_COLUMNS.intersection(self.meta))
        if clash:
            raise ValueError(f"Example.meta keys {clash} clash with the scorer's or the pair's own fields; rename them")

    def columns(self) -> dict[str, Any]:
        """The example's keyword columns: ``references`` (when it has any) and each ``meta`` key."""
        return ({"references": list(self.references)} if self.references else {}) | dict(self.meta)


def as_example(prompt: str | Example, where: str = "prompt") -> Example:
    """A prompt string as a record without references or metadata (a record passes through as it is)."""
    return prompt if isinstance(prompt, Example) else Example(check_prompt(prompt, where))


def columns_of(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """One list per column over a batch (``None`` where an example lacks it): what a column-taking scorer gets."""
    rows = [e.columns() for e in examples]
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


PromptSource = Sequence[str | Example] | str | os.PathLike[str]
"""A list of strings or :class:`Example` records, a ``.txt`` file (one prompt a line), a ``.jsonl`` file (a
``prompt`` or ``text`` field a line), or ``"hf:NAME"`` for a Hugging Face ``datasets`` dataset (a hub id or a local
directory of data files). ``.jsonl`` files and datasets may carry a reference column (see :func:`load_examples`)."""


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


def _from_jsonl(path: Path, column: str, reference_column: str | None) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for where, record in read_jsonl(path, "prompt file"):
        keys = [k for k in (column, "text") if isinstance(record, dict) and k in record]
        if not keys or not isinstance(record[keys[0]], str):
            raise ValueError(f"{where}: expected an object with a string field {column!r} or 'text'")
        if reference_column is not None and reference_column not in record:
            raise ValueError(f"{where}: no reference field {reference_column!r}")
        reference = {} if reference_column is None else {reference_column: record[reference_column]}
        rows.append((where, {column: record[keys[0]]} | reference))
    return rows


def _references(value: object, where: str) -> tuple[str, ...]:
    """A reference column's value as a tuple: one string, or a list of them (several valid outputs)."""
    refs = (value,) if isinstance(value, str) else value
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{where}: a reference must be a string or a list of strings, got {value!r:.80}")
    return tuple(refs)


def check_prompt(prompt: object, where: str) -> str:
    """Return ``prompt`` if it is a non-blank string; else raise, naming ``where`` it came from.

    An empty prompt gives an observation with no token to condition on, which the policy cannot score.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"{where} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: the prompt is empty or only whitespace ({prompt!r}); every prompt needs text")
    return prompt


def load_examples(
    source: PromptSource, column: str = "prompt", split: str = "train", reference_column: str | None = None
) -> list[Example]:
    """Turn any prompt source (see :data:`PromptSource`) into :class:`Example` records: the one place that does.

    :param column: the field holding the prompt in ``.jsonl`` files and datasets.
    :param split: the dataset split, for ``"hf:"`` specs.
    :param reference_column: the field of ``.jsonl`` files and datasets holding each prompt's reference (a string or
        a list of strings), e.g. ``"summary"``; ``None``: no references.
    :raises ValueError: an empty set, an empty prompt or a malformed line (with where it is), a file that is not
        UTF-8, or an unknown file type.
    """
    located: list[tuple[str, Example | dict[str, Any] | object]]
    if isinstance(source, str) and source.startswith("hf:"):
        require("datasets", f"prompts from {source}")
        import datasets

        name = source[3:]
        dataset = datasets.load_dataset(name, split=split)
        for needed in (column, reference_column):
            if needed is not None and needed not in dataset.column_names:
                raise ValueError(f"dataset {name!r} has no column {needed!r}; its columns are {dataset.column_names}")
        wanted = {c: dataset[c] for c in (column, reference_column) if c is not None}
        rows = [dict(zip(wanted, values, strict=True)) for values in zip(*wanted.values(), strict=True)]
        located = [(f"dataset {name!r} row {i}", row) for i, row in enumerate(rows)]
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise IsADirectoryError(
                f"prompt file {path} is a directory; give a .txt or .jsonl file, or 'hf:{path}' for a directory of "
                "dataset files"
            )
        if path.suffix == ".jsonl":
            located = list(_from_jsonl(path, column, reference_column))
        elif path.suffix == ".txt":  # one prompt a line; blank lines are skipped
            if reference_column is not None:
                raise ValueError(f"prompt file {path} is plain text and has no {reference_column!r} column; use .jsonl")
            lines = read_text(path, "prompt file").split("\n")
            located = [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            raise ValueError(f"prompt file {path} must end in .txt or .jsonl")
    else:
        located = [(f"prompt {i} of the list", p) for i, p in enumerate(source)]
        if not all(isinstance(p, (str, Example)) for _, p in located):
            raise TypeError("a prompt list must hold only strings or Example records")
    examples = []
    for where, item in located:
        if isinstance(item, dict):  # a file line or dataset row
            refs = () if reference_column is None else _references(item[reference_column], where)
            examples.append(Example(check_prompt(item[column], where), refs))
        else:
            examples.append(as_example(item, where))  # type: ignore[arg-type]
    if not examples:
        raise ValueError(f"no prompts in {source!r}")
    return examples


def load_prompts(source: PromptSource, column: str = "prompt", split: str = "train") -> list[str]:
    """The prompt texts of :func:`load_examples` (same sources and errors)."""
    return [e.prompt for e in load_examples(source, column, split)]


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
