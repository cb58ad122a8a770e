"""Preference data: ``(prompt, chosen, rejected)`` pairs in JSONL, the format of TRL's RewardTrainer.

One JSON object a line: ``{"prompt": str, "chosen": str, "rejected": str}`` with an optional numeric ``margin``, and
the prompt's example record: an optional ``references`` list and any other field (kept as the example's ``meta``), so
that a reference-based gold scorer can judge the pair again.
Writers append a line at a time, so an interrupted labelling run loses nothing and resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from text_env.extras import require
from text_env.models import DEFAULT_BF16
from text_env.prompts import RESERVED_COLUMNS, Example, as_example, encode_prompt, read_jsonl

__all__ = [
    "PreferencePair",
    "append_pairs",
    "drop_torn_last_line",
    "generate_pairs",
    "load_preferences",
    "prompt_order",
    "sample_completions",
]


@dataclass(frozen=True)
class PreferencePair:
    """One human (or simulated) judgement: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``.

    ``references`` and ``meta`` are those of the prompt's :class:`~text_env.prompts.Example` (see :attr:`example`).
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    references: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example: Example, chosen: str, rejected: str, margin: float | None = None) -> PreferencePair:
        """A pair for ``example``'s prompt that keeps its references and metadata."""
        return cls(example.prompt, chosen, rejected, margin, example.references, dict(example.meta))

    @property
    def example(self) -> Example:
        """The prompt's example record (what a column-taking gold scorer needs)."""
        return Example(self.prompt, self.references, self.meta)

    def to_json(self) -> str:
        record = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "margin": self.margin}
        record = {k: v for k, v in record.items() if v is not None} | self.example.columns()
        return json.dumps(record, ensure_ascii=False)


def _parse(record: Any, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt/chosen/rejected, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (need prompt, chosen, rejected)")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    margin = record.get("margin")
    numeric = isinstance(margin, (int, float)) and not isinstance(margin, bool)
    if margin is not None and (not numeric or not math.isfinite(margin)):
        raise ValueError(f"{where}: 'margin' must be a finite number, got {margin!r}")
    margin = None if margin is None else float(margin)
    references = record.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where}: 'references' must be a list of strings, got {references!r:.80}")
    meta = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS}
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], margin, tuple(references), meta)


def load_preferences(source: str | os.PathLike[str], split: str = "train") -> list[PreferencePair]:
    """Read preference pairs from a JSONL file or ``"hf:NAME"`` (a ``datasets`` dataset with those columns).

    :raises ValueError: on the first malformed line, naming the file, the line number and what is wrong; on a file
        that is not UTF-8 (a UTF-8 byte-order mark is fine), naming the line and byte.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        require("datasets", f"preference pairs from {source}")
        import datasets

        dataset = datasets.load_dataset(source[3:], split=split)
        return [_parse(row, f"{source} row {i}") for i, row in enumerate(dataset)]
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(
            f"preference file {path} is a directory; give a .jsonl file, or 'hf:{path}' for a directory of dataset "
            "files"
        )
    pairs = [_parse(record, where) for where, record in read_jsonl(path, "preference file")]
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


def append_pairs(path: str | os.PathLike[str], pairs: Iterable[PreferencePair]) -> None:
    """Append pairs to a JSONL file (its directory is created), flushing each line (safe to interrupt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for pair in pairs:
            f.write(pair.to_json() + "\n")
            f.flush()


def drop_torn_last_line(path: str | os.PathLike[str]) -> int | None:
    """Cut a last line left without its newline (a hard kill mid-write): it holds no whole record, and the next
    append would join it. :return: its line number, or ``None`` when the file ends cleanly (or does not exist)."""
    path = Path(path)
    if not path.is_file() or not (data := path.read_bytes()) or data.endswith(b"\n"):
        return None
    keep = data.rfind(b"\n") + 1
    path.write_bytes(data[:keep])
    return data.count(b"\n", 0, keep) + 1


def prompt_order(n_prompts: int, n: int, seed: int) -> np.ndarray:
    """The first ``n`` prompt indices of successive seeded shuffles of ``range(n_prompts)``: the first ``k`` do not
    depend on ``n``, so a resumed or extended run continues the very sequence an uninterrupted run would have used."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n_prompts) for _ in range(max(1, -(-n // n_prompts)))])[:n]


@torch.no_grad()
def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    instruction: str | None = None,
    max_new_tokens: int = 32,
    n: int = 2,
    batch_size: int = 32,
    temperature: float = 1.0,
    bf16: bool = DEFAULT_BF16,
    progress: bool = True,
) -> list[list[str]]:
    """``n`` sampled completions per prompt from a causal LM (batched ``generate``, left padding).

    Prompts are rendered as the env renders them (chat template and task instruction), so the samples come
    from the same distribution a policy starts from.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    bar = tqdm(total=len(jobs), desc="sampling completions", unit="text", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        encoded = [encode_prompt(tokenizer, p, instruction) for p in jobs[start : start + batch_size]]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # (b, width) left-padded
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True, top_k=0,
                top_p=1.0, temperature=temperature, max_new_tokens=max_new_tokens, pad_token_id=pad,
            )  # fmt: skip
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        bar.update(len(encoded))
    bar.close()
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def generate_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Example],
    annotator: Any,
    out: str | os.PathLike[str],
    n_pairs: int,
    instruction: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> list[PreferencePair]:
    """Sample two completions per prompt, have ``annotator`` choose, append to ``out``; resume if it exists.

    Prompts (strings or example records, whose references and metadata the pairs keep) cycle through ``prompts``
    in a seeded order. Lines already in ``out`` count toward ``n_pairs``.
    Completions are sampled in chunks, but the annotator is asked one pair at a time and each label is appended
    at once, so an interrupted run (a person who stops labelling) loses no label and repeats none.
    """
    if not prompts:
        raise ValueError("generate_pairs needs at least one prompt")
    out = Path(out)
    done = load_preferences(out) if out.is_file() and out.stat().st_size else []
    todo = [prompts[i] for i in prompt_order(len(prompts), n_pairs, seed)[len(done) :]]
    torch.manual_seed(seed + len(done))
    for start in range(0, len(todo), batch_size * 4):
        chunk = todo[start : start + batch_size * 4]
        texts = [as_example(p).prompt for p in chunk]
        samples = sample_completions(model, tokenizer, texts, instruction, max_new_tokens, 2, batch_size)
        for prompt, (a, b) in zip(chunk, samples, strict=True):
            pairs = annotator.label([prompt], [a], [b])  # empty when a person skips the pair
            append_pairs(out, pairs)
            done += pairs
    return done
