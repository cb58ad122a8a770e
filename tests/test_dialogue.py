"""The dialogue task: its records from chatterbot-corpus, its split by category, and its chrF gold with penalties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from text_env.env import TextGenEnv
from text_env.prompts import Example
from text_env.tasks import get_task, list_tasks
from text_env.tasks.dialogue import EVAL_CATEGORIES, dialogue_examples, make_task

pytest.importorskip("chatterbot_corpus")
CHRF = pytest.importorskip("sacrebleu.metrics").CHRF


def test_task_is_fixed_and_split_by_category() -> None:
    assert "dialogue" in list_tasks()
    task = get_task("dialogue")
    train, held_out = task.examples("train"), task.examples("eval")
    assert len(train) > 500 and len(held_out) > 200
    train_categories = {e.meta["category"] for e in train}
    assert train_categories.isdisjoint(e.meta["category"] for e in held_out)
    assert {e.meta["category"] for e in held_out} == set(EVAL_CATEGORIES)
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in held_out)
    assert all(e.references and all(r.strip() for r in e.references) for e in train + held_out)
    rebuilt = make_task()  # read again: the same records in the same order and split
    assert rebuilt.examples("train") == train and rebuilt.examples("eval") == held_out


def test_replies_to_one_prompt_are_its_references() -> None:
    by_prompt = {(e.meta["category"], e.prompt): e for e in dialogue_examples()}
    going = by_prompt["greetings", "Hi, How is it going?"]  # the corpus answers it six ways
    assert going.references[:2] == ("Good", "Fine") and len(going.references) == 6
    two_turns = {e.prompt: e for e in dialogue_examples(context_turns=2)}
    assert two_turns["Hello\nHi"].references[0] == "How are you doing?"  # conversations.yml, 2nd talk
    with pytest.raises(ValueError, match="context_turns"):
        dialogue_examples(context_turns=0)


def test_chrf_gold_with_empty_and_echo_penalties() -> None:
    gold = get_task("dialogue").gold
    assert gold.name == "chrF (sacrebleu)"
    prompts = ["How are you?"] * 4 + ["Hello"]
    completions = ["I am well.", "I am doing well, thanks", "   ", "How are you?", "Hello"]
    refs = [["I am well."], ["I am well.", "Fine."], ["Fine."], ["Fine."], ["Hello", "Hi"]]
    scores = gold.score(prompts, completions, references=refs)
    assert scores[0] == pytest.approx(1.0)  # the reference itself
    assert 0.0 < scores[1] < 1.0  # partial character overlap with the best reference
    assert scores[2] == -1.0  # empty: below every reply
    chrf = CHRF().sentence_score("How are you?", ["Fine."]).score / 100  # sacrebleu's defaults, as the gold's
    assert scores[3] == pytest.approx(chrf - 1.0) and scores[3] < 0.0  # an echo of the prompt
    assert scores[4] == pytest.approx(1.0)  # an echo that the corpus itself gives is not penalised
    with pytest.raises(ValueError, match="needs references"):
        gold.score(["p"], ["x"], references=[None])


def test_env_scores_the_task_with_its_references(tiny_model: Path) -> None:
    """On the tiny model: the env checker passes, and an episode's gold is the penalised chrF against the record's
    references."""
    example = Example("How are you doing?", ("I am doing well.", "Fine, thanks."), {"category": "greetings"})
    env = TextGenEnv(
        model=str(tiny_model), task="dialogue", prompts=[example], reward_model="gold", max_new_tokens=4,
        max_prompt_tokens=64,
    )  # fmt: skip
    gym_check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    assert info["references"] == example.references
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    expected = get_task("dialogue").gold.score([example.prompt], [info["completion"]], [list(example.references)])
    assert reward == info["gold_score"] == pytest.approx(float(expected[0]))
    assert np.isfinite(reward) and -1.0 <= reward <= 1.0
