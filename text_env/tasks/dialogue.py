"""dialogue: reply to a conversation turn of chatterbot-corpus's English YAML, judged against its recorded replies.

The conversations are the English YAML files of the ``chatterbot-corpus`` wheel (real exchanges collected by the
ChatterBot project, one file per category: greetings, emotion, tech support, ...), read with PyYAML in sorted file
order, so the set is the same for a given corpus version. Each turn after the first is an example: the prompt is the
preceding turn (or turns, one a line), the reference the turn itself; when a category answers the same prompt
several ways, the replies are one example's references. Train and eval are split by category, not by line, so a
held-out topic is unseen; an eval prompt whose text also occurs in train is dropped. Gold: chrF from ``sacrebleu``
(:class:`~text_env.rewards.gold.ChrF`), with penalties for empty and echoed replies. No learned reward model ships.
"""

from __future__ import annotations

from pathlib import Path

from text_env.prompts import Example
from text_env.tasks import Task, shipped_reward_model

__all__ = ["EVAL_CATEGORIES", "dialogue_examples", "make_task"]

EVAL_CATEGORIES = ("computers", "emotion", "food", "humor", "money", "movies", "politics", "science")
"""Held-out categories (325 of the 1042 examples of corpus 1.3.3, the multi-turn emotion talks among them): chosen
once and fixed, so the eval split does not move when the corpus is read again."""


def _corpus_dir(language: str) -> Path:
    """The wheel's YAML directory for ``language``; an ImportError says how to install the corpus."""
    try:
        from chatterbot_corpus.corpus import DATA_DIRECTORY
    except ImportError as err:
        raise ImportError("the dialogue task reads the chatterbot-corpus wheel: pip install chatterbot-corpus") from err
    return Path(DATA_DIRECTORY) / language


def dialogue_examples(context_turns: int = 1, language: str = "english") -> list[Example]:
    """Every reply of the corpus as a record: prompt = the ``context_turns`` turns before it (one a line), references =
    every reply its category gives that prompt, ``meta`` = ``category``; in corpus order, first occurrence first.

    :param context_turns: preceding turns in the prompt (1: the turn being answered; more: earlier ones above it).
    :param language: a directory of the corpus's ``data`` (only English has the categories of the split).
    """
    import yaml  # PyYAML: the wheel ships YAML files, not a reader

    if context_turns < 1:
        raise ValueError(f"context_turns must be at least 1, got {context_turns}")
    replies: dict[tuple[str, str], list[str]] = {}  # (category, prompt) -> replies, in insertion (corpus) order
    for path in sorted(_corpus_dir(language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        category = str((data.get("categories") or [path.stem])[0])
        for conversation in data.get("conversations") or []:
            turns = [" ".join(str(turn).split()) for turn in conversation]
            for i in range(1, len(turns)):
                context = [t for t in turns[max(0, i - context_turns) : i] if t]
                if context and turns[i]:
                    replies.setdefault((category, "\n".join(context)), []).append(turns[i])
    return [
        Example(prompt, tuple(dict.fromkeys(refs)), {"category": category})
        for (category, prompt), refs in replies.items()
    ]


def make_task(context_turns: int = 1, eval_categories: tuple[str, ...] = EVAL_CATEGORIES) -> Task:
    """The dialogue task: chatterbot-corpus replies, split by category, gold chrF with empty/echo penalties."""
    from text_env.rewards.gold import ChrF, EchoPenalty

    examples = dialogue_examples(context_turns)
    train = [e for e in examples if e.meta["category"] not in eval_categories]
    seen = {e.prompt for e in train}
    held_out = [e for e in examples if e.meta["category"] in eval_categories and e.prompt not in seen]
    return Task(
        name="dialogue",
        reward_model=shipped_reward_model("dialogue"),
        description=__doc__.strip().splitlines()[0],  # the module docstring's summary line
        recommended="PPO for the gold (SFT + PPO stayed below base on 3 seeds); SFT + PPO for reference-length replies",
        train_prompts=train,
        eval_prompts=held_out,
        make_gold=ChrF,
        instruction=None,  # the turn is the user's message; the model answers it
        max_new_tokens=32,
        max_prompt_tokens=96,  # the longest one-turn prompt is 65 tokens in SmolLM2's chat template
        stop_strings=("\n",),  # a reply is one turn
        components={"chrf": lambda: ChrF(empty_penalty=0.0, copy_penalty=0.0), "echo": EchoPenalty},
    )
