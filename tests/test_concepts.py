"""The concepts task: its concept sets from wordfreq, its split by set, and its coverage gold with penalties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from text_env.env import TextGenEnv
from text_env.prompts import Example
from text_env.tasks import get_task, list_tasks
from text_env.tasks.concepts import (
    STOP_WORDS,
    Coverage,
    concept_sets,
    concept_vocabulary,
    inflections,
    make_task,
    prompt_of,
)

pytest.importorskip("wordfreq")


def test_sets_are_fixed_and_split_by_set() -> None:
    assert "concepts" in list_tasks()
    task = get_task("concepts")
    train, held_out = task.examples("train"), task.examples("eval")
    assert (len(train), len(held_out)) == (800, 200)
    train_sets = {frozenset(e.meta["concepts"]) for e in train}
    eval_sets = {frozenset(e.meta["concepts"]) for e in held_out}
    assert len(train_sets) == 800 and len(eval_sets) == 200  # distinct sets
    assert train_sets.isdisjoint(eval_sets)  # no eval set is a train set
    for e in train + held_out:
        words = e.meta["concepts"]
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
        assert e.prompt == prompt_of(words) and e.references == ()
    rebuilt = make_task()  # drawn again: the same records in the same order and split
    assert rebuilt.examples("train") == train and rebuilt.examples("eval") == held_out
    assert concept_sets(n_train=5, n_eval=2, seed=1) != concept_sets(n_train=5, n_eval=2, seed=2)


def test_vocabulary_is_content_words_without_inflected_duplicates() -> None:
    vocabulary = concept_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) == 600
    assert {"water", "dog", "food", "car"} <= set(vocabulary)
    assert not STOP_WORDS.intersection(vocabulary)
    assert all(w.isalpha() and len(w) >= 3 for w in vocabulary)
    assert "friend" in vocabulary and "friends" not in vocabulary  # an inflection of a listed word is dropped


def test_inflections_follow_the_suffix_rule() -> None:
    assert {"dogs", "dogged", "dogging"} <= inflections("dog")
    assert {"boxes", "boxed", "boxing", "boxer"} <= inflections("box")  # no doubled x
    assert {"babies", "babied"} <= inflections("baby")
    assert {"baked", "baking", "baker", "bakes"} <= inflections("bake")
    assert {"running", "runner", "runs"} <= inflections("run")
    assert "ran" not in inflections("run")  # irregular forms do not count


def test_coverage_gold_with_list_and_repetition_penalties() -> None:
    gold = get_task("concepts").gold
    assert isinstance(gold, Coverage) and gold.name == "concept coverage"
    concepts = ["dog", "frisbee", "catch"]
    cases = {
        "The dog catches a frisbee.": 1.0,
        "The Dogs were catching Frisbees in the park.": 1.0,  # inflections, any case
        "A dog ran after a ball.": 1 / 3,  # two concepts missing
        "The dog, the frisbee and the catch.": 1.0,  # commas inside a sentence are not a list
        "dog, frisbee, catch": 0.0,  # a list: coverage 1 minus the list penalty
        "dog frisbee and catch": 0.0,  # bare concept words without commas are a list too
        prompt_of(concepts): 0.0,  # an echo of the prompt ends in the list
        "dog dog dog dog dog catches a frisbee": 1.0 - 3 * 0.25,  # three uses of "dog" beyond two
        "The dog and the dog catch a frisbee.": 1.0,  # two uses are free
        "dog " * 20 + "frisbee": -1.0,  # list and repetition, clipped to the floor
        "   ": -1.0,  # empty
    }
    scores = gold.score(list(cases), list(cases), concepts=[concepts] * len(cases))
    assert scores == pytest.approx(list(cases.values()))
    assert scores.min() >= -1.0 and scores.max() <= 1.0
    assert Coverage(list_penalty=0.5).score(["p"], ["dog, frisbee"], concepts=[concepts])[0] == pytest.approx(
        2 / 3 - 0.5
    )
    with pytest.raises(ValueError, match="needs concepts"):
        gold.score(["p"], ["x"], concepts=[None])


def test_env_scores_the_task_with_its_concepts(tiny_model: Path) -> None:
    """On the tiny model: the env checker passes, and an episode's gold is the coverage of the record's concepts."""
    concepts = ["dog", "frisbee", "catch"]
    example = Example(prompt_of(concepts), (), {"concepts": concepts})
    env = TextGenEnv(
        model=str(tiny_model), task="concepts", prompts=[example], reward_model="gold", max_new_tokens=4,
        max_prompt_tokens=128,
    )  # fmt: skip
    gym_check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    assert info["meta"] == {"concepts": concepts} and "references" not in info
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    expected = get_task("concepts").gold.score([example.prompt], [info["completion"]], concepts=[concepts])
    assert reward == info["gold_score"] == pytest.approx(float(expected[0]))
    assert np.isfinite(reward) and -1.0 <= reward <= 1.0
