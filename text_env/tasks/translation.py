"""translation: translate each sentence of one's own parallel data, judged by chrF against its reference translations.

No parallel corpus comes with TextGen (none installs offline from PyPI), so this task is built from the user's data
and is not registered by default: :func:`make_task` reads a train and an eval source, each a ``.jsonl`` file or an
``hf:`` dataset with a source column and a reference column (a string, or a list of valid translations), through
:func:`~text_env.prompts.load_examples`. Each record asks for the translation as the user turn ("Translate from
English to French:" and the sentence on the next line), keeps the source sentence as ``meta["source"]`` and the
translations as ``references``; the gold is :class:`~text_env.rewards.gold.ChrF` (sacrebleu's chrF, the usual
sentence-level translation metric), whose echo penalty also stops a model scoring by copying the source sentence.

Example:
    >>> from text_env.tasks import register_task
    >>> from text_env.tasks.translation import make_task
    >>> register_task("en-fr", lambda: make_task("train.jsonl", "eval.jsonl", "English", "French"))  # doctest: +SKIP

then ``gym.make("TextGen-v0", task="en-fr")`` or ``build_run(TrainConfig(task="en-fr"))``. From the command line,
with that registration in a module of one's own: ``textgen train --task my_tasks:en-fr`` (see
:func:`~text_env.tasks.get_task`).
"""

from __future__ import annotations

from text_env.prompts import Example, PromptSource, load_examples
from text_env.tasks import Task

__all__ = ["make_task", "request", "translation_examples"]


def request(sentence: str, source_language: str, target_language: str) -> str:
    """The prompt for one sentence: the request on the first line, the sentence alone on the second."""
    return f"Translate from {source_language} to {target_language}:\n{sentence}"


def translation_examples(
    source: PromptSource,
    source_language: str,
    target_language: str,
    source_column: str = "source",
    reference_column: str = "target",
    split: str = "train",
) -> list[Example]:
    """Records of a parallel data source: prompt = :func:`request` of the sentence, references = its translations,
    ``meta = {"source": sentence}``.

    :param source: a ``.jsonl`` file or ``"hf:NAME"`` (a hub id or a local directory of data files) with flat
        columns; a dataset that nests its pairs (``{"translation": {"en": ..., "fr": ...}}``) needs flattening first.
    :param split: the dataset split, for ``hf:`` sources.
    :raises ValueError: a row without a translation, or a source with no reference column (``.txt`` files have none).
    """
    rows = load_examples(source, column=source_column, split=split, reference_column=reference_column)
    for row in rows:
        if not any(r.strip() for r in row.references):
            raise ValueError(
                f"the sentence {row.prompt[:60]!r} of {source!r} has no translation in {reference_column!r}"
            )
    return [
        Example(request(row.prompt, source_language, target_language), row.references, {"source": row.prompt})
        for row in rows
    ]


def make_task(
    train: PromptSource,
    held_out: PromptSource,
    source_language: str,
    target_language: str,
    source_column: str = "source",
    reference_column: str = "target",
    train_split: str = "train",
    eval_split: str = "train",
    name: str = "translation",
    max_new_tokens: int = 64,
    max_prompt_tokens: int = 128,
) -> Task:
    """A translation task on one's own parallel data (see the module docstring).

    :param train: sentences to train on (a ``.jsonl`` file or ``"hf:NAME"``); ``held_out``: sentences to evaluate on.
    :param source_language: named in the prompt, e.g. ``"English"``; ``target_language``: e.g. ``"French"``.
    :param source_column: the field holding the sentence; ``reference_column``: its translation(s).
    :param train_split: the dataset split of ``train`` for ``hf:`` sources; ``eval_split``: of ``held_out``.
    :param max_new_tokens: episode length (64 SmolLM2 tokens: a sentence of about 40 words).
    :param max_prompt_tokens: room for the rendered request.
    """
    from text_env.rewards.gold import ChrF

    if not source_language.strip() or not target_language.strip():
        raise ValueError("source_language and target_language name the languages in the prompt; give both")
    columns = dict(source_column=source_column, reference_column=reference_column)
    return Task(
        name=name,
        description=__doc__.strip().splitlines()[0].replace("translation:", f"{name}:", 1),
        train_prompts=translation_examples(train, source_language, target_language, split=train_split, **columns),
        eval_prompts=translation_examples(held_out, source_language, target_language, split=eval_split, **columns),
        make_gold=ChrF,
        instruction=None,  # the request is the user turn; the model answers with the translation
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        stop_strings=("\n",),  # one sentence, one line
    )
