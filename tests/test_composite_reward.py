"""Composite rewards: a weighted sum of named scorers, each part in the episode's info, logged, and boundable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PROMPTS, LengthReward

from agents.cli import main
from agents.run import TrainConfig, build_run
from text_env.core import resolve_reward
from text_env.rewards.composite import CompositeReward, WordCount, parse_reward, reward_terms
from text_env.rewards.gold import EchoPenalty
from text_env.tasks import get_task
from text_env.vec_env import make_text_vec_env


def test_terms_are_read_with_their_signs_and_weights() -> None:
    assert reward_terms("rm + 0.3*gold - 1e-2 * words") == {"rm": 1.0, "gold": 0.3, "words": -0.01}
    assert reward_terms("-2*words") == {"words": -2.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rm + x", "unknown component 'x'; allowed: rm, gold, words"),
        ("rm gold", "a + or - is missing before 'gold'"),
        ("rm + rm", "'rm' appears twice"),
        ("rm +", "cannot read '+'"),
        ("", "cannot read '(nothing)'"),
        ("0.3*", "cannot read '0.3*'"),
    ],
)
def test_bad_specifications_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]*$") as refused:
        reward_terms(spec, ("rm", "gold", "words"))
    assert message in str(refused.value)


def test_the_sum_and_its_parts() -> None:
    reward = parse_reward("2*a - 0.5*words", {"a": LengthReward, "words": WordCount})
    scores = reward.score(["p", "q"], ["aaaa", "a b c d"])
    assert reward.last["a"] == pytest.approx([1.0, 1 / 7]) and reward.last["words"] == pytest.approx([1.0, 4.0])
    assert scores == pytest.approx([2 * 1.0 - 0.5, 2 / 7 - 2.0])
    assert reward.name == "2*a -0.5*words"


def test_each_episode_info_carries_the_parts(tiny_model: Path) -> None:
    task = get_task("positive-review")
    reward = resolve_reward("gold", task, composite="rm + 0.1*words")
    assert isinstance(reward, CompositeReward)
    env = make_text_vec_env(2, model=str(tiny_model), reward_model=reward, prompts=TINY_PROMPTS, max_new_tokens=3,
                            max_prompt_tokens=24)  # fmt: skip
    env.reset()
    for _ in range(3):
        _, rewards, dones, infos = env.step(np.array([5, 6]))
    assert dones.all()
    for info, paid in zip(infos, rewards, strict=True):
        parts = info["reward_components"]
        assert set(parts) == {"rm", "words"}
        assert paid == pytest.approx(parts["rm"] + 0.1 * parts["words"])
        assert parts["words"] == len(info["completion"].split())


def test_the_dialogue_task_names_its_own_parts() -> None:
    task = get_task("dialogue")
    assert set(task.components) == {"chrf", "echo"}
    echo = EchoPenalty()
    got = echo.score(["How are you?"] * 3, ["How are you?", "I am fine, thanks.", " "], references=[["I am fine."]] * 3)
    assert got.tolist() == [1.0, 0.0, 1.0]  # an echo, a reply, an empty reply: counts, to subtract
    plain = task.components["chrf"]()
    prompts, replies, refs = ["How are you?"] * 3, ["How are you?", "I am fine, thanks.", " "], [["I am fine."]] * 3
    gold = task.gold.score(prompts, replies, references=refs)
    chrf = plain.score(prompts, replies, references=refs)
    assert gold.tolist() == pytest.approx((chrf - got).tolist())  # chrf - echo is the gold
    assert plain.score(["How are you?"], ["How are you?"], references=[["I am fine."]])[0] >= 0  # no penalty in it


def test_a_run_logs_each_part_and_bounds_one(tiny_model: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        model=str(tiny_model), reward_model="gold", reward="gold - 0.1*words", constraints=["words<=1"],
        total_timesteps=64, n_envs=4, n_steps=8, batch_size=32, eval_prompts=2, bf16=False, max_new_tokens=8,
        max_prompt_tokens=128, out=str(tmp_path),
    )  # fmt: skip
    assert config.scales_rewards  # a weighted sum has no normalised scale
    run = build_run(config, verbose=0)
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    rows = run.metrics.history
    assert rows and all("reward/gold" in r and "reward/words" in r for r in rows)
    assert run.kl.constraints is not None and all("words<=1/mean" in h for h in run.kl.constraints.history)


def test_the_command_line_refuses_a_bad_reward_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in (
        (["--reward", "rm + x"], "unknown component 'x'"),  # known only once the task is: dialogue's chrf is not here
        (["--reward", "gold + chrf"], "unknown component 'chrf'; allowed: rm, gold, words"),
        (["--reward", "gold", "--constraint", "wordz<=3"], "unknown quantity 'wordz'"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["train", *args, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "runs")])
        assert exited.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
