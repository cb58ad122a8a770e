"""The summarize-docstring task: its data from the installed standard library, its split, and its ROUGE-L gold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from text_env.env import TextGenEnv
from text_env.prompts import Example
from text_env.tasks import get_task, list_tasks
from text_env.tasks.summarize_docstring import make_task, split_docstring

pytest.importorskip("rouge_score")


def test_split_docstring_follows_pep_257() -> None:
    assert split_docstring("Return x.\n\n    More about x.\n") == ("Return x.", "More about x.")
    assert split_docstring("Return x.") is None  # no description
    assert split_docstring("Return x\nover two lines.\n\nMore.") is None  # no one-line summary


def test_task_is_fixed_and_split_by_module() -> None:
    assert "summarize-docstring" in list_tasks()
    task = get_task("summarize-docstring")
    train, held_out = task.examples("train"), task.examples("eval")
    assert len(train) > 200 and len(held_out) > 50
    assert {e.meta["top_module"] for e in train}.isdisjoint(e.meta["top_module"] for e in held_out)
    for example in train + held_out:
        (summary,) = example.references
        assert summary not in example.prompt and example.meta["name"] in example.prompt
    rebuilt = make_task()  # read again: the same records in the same order and split
    assert rebuilt.examples("train") == train and rebuilt.examples("eval") == held_out


def test_rouge_l_gold_takes_the_references_column() -> None:
    gold = get_task("summarize-docstring").gold
    assert gold.name == "ROUGE-L F1"
    refs = [["Return the sum of two numbers."], ["Open a file.", "Open the file for reading."]]
    scores = gold.score(["p", "q"], ["return the sum of two numbers", "open the file"], references=refs)
    assert scores[0] == pytest.approx(1.0)  # stemming and case do not count
    assert 0.0 < scores[1] < 1.0 and scores[1] == pytest.approx(2 * 1 * 0.6 / 1.6)  # the 2nd: LCS 3 of 3 and 5
    with pytest.raises(ValueError, match="needs references"):
        gold.score(["p"], ["x"], references=[None])


def test_env_scores_the_task_with_its_references(tiny_model: Path) -> None:
    """On the tiny model: the env checker passes, and the gold score of an episode is ROUGE-L against the record's
    reference (a completion equal to the reference would score 1)."""
    example = Example("Summarize: adds two numbers and returns the result.", ("Return the sum.",))
    env = TextGenEnv(
        model=str(tiny_model), task="summarize-docstring", prompts=[example], reward_model="gold",
        max_new_tokens=4, max_prompt_tokens=64,
    )  # fmt: skip
    gym_check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    assert info["references"] == ("Return the sum.",)
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    expected = get_task("summarize-docstring").gold.score([example.prompt], [info["completion"]], [["Return the sum."]])
    assert reward == info["gold_score"] == pytest.approx(float(expected[0]))
    assert np.isfinite(reward) and 0.0 <= reward <= 1.0
