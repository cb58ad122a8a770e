"""TextGenEnv: registration, both env checkers, the MDP semantics, chat rendering, rendering and error messages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import TINY_PROMPTS, LengthReward, ReferenceLength
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import text_env
from text_env.env import TextGenEnv
from text_env.models import ModelLoadError, make_tiny_model
from text_env.prompts import Example
from text_env.rewards.gold import VaderSentiment
from text_env.tasks import Task, get_task

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT, MAX_NEW = 24, 6  # as in the tiny_env_kwargs fixture
INSTRUCTION = get_task("positive-review").instruction


class ConstReward:
    """A reward model returning ``value`` for every pair."""

    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.full(len(prompts), self.value)


class FailingReward:
    """A reward model whose first ``failures`` calls raise, like a flaky remote judge; then it scores 1.0."""

    def __init__(self, failures: int = 1) -> None:
        self.failures = failures

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("judge unreachable")
        return np.ones(len(prompts))


class ReturnsReward:
    """A broken reward model returning ``value`` whatever it is asked."""

    def __init__(self, value: object) -> None:
        self.value = value

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> object:
        return self.value


class WrongCountReward:
    """A broken reward model returning ``len(prompts) + extra`` scores."""

    def __init__(self, extra: int) -> None:
        self.extra = extra

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.zeros(len(prompts) + self.extra)


@pytest.fixture
def env(tiny_env_kwargs: dict) -> gym.Env:
    return gym.make("TextGen-v0", **tiny_env_kwargs)


def ids_of(env: gym.Env, text: str) -> list[int]:
    """Token ids of ``text`` (the tiny tokenizer adds no special tokens)."""
    return env.unwrapped.tokenizer(text, add_special_tokens=False)["input_ids"]


def run_episode(env: gym.Env, actions: Sequence[int]) -> list[tuple]:
    """Step ``actions`` until the episode ends; return every step's ``(obs, reward, terminated, truncated, info)``."""
    steps = []
    for action in actions:
        steps.append(env.step(action))
        if steps[-1][2] or steps[-1][3]:
            break
    return steps


# --- registration --------------------------------------------------------------------------------------------


def test_make_registered_env(tiny_env_kwargs: dict) -> None:
    env = gym.make("TextGen-v0", **tiny_env_kwargs)
    assert "TextGen-v0" in gym.registry
    assert isinstance(env.unwrapped, TextGenEnv)
    assert isinstance(env.unwrapped, text_env.TextGenEnv)
    assert env.spec is not None and env.spec.max_episode_steps is None  # the env truncates by itself
    vocab = len(env.unwrapped.tokenizer)
    assert env.action_space == gym.spaces.Discrete(vocab)
    for key in ("input_ids", "attention_mask"):
        space = env.observation_space[key]
        assert space.shape == (MAX_PROMPT + MAX_NEW,)
        assert space.dtype == np.int64
    assert env.observation_space["input_ids"].high.max() == vocab - 1
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert info["prompt"] in TINY_PROMPTS and info["completion"] == ""


def test_make_with_module_prefix_in_fresh_process(tiny_model: Path) -> None:
    """``gym.make("text_env:TextGen-v0")`` imports the package, which registers the env."""
    code = f"""
import sys
import gymnasium as gym
assert "text_env" not in sys.modules
env = gym.make("text_env:TextGen-v0", model={str(tiny_model)!r}, prompts=["the movie was"], reward_model="gold",
               max_new_tokens=3, max_prompt_tokens=24)
obs, info = env.reset(seed=0)
print(type(env.unwrapped).__name__, obs["input_ids"].shape[0], info["prompt"])
"""
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "TextGenEnv 27 the movie was"


# --- env checkers and return types ---------------------------------------------------------------------------


@pytest.mark.parametrize("render_mode", [None, "ansi"])
def test_env_checkers(tiny_env_kwargs: dict, render_mode: str | None) -> None:
    env = gym.make("TextGen-v0", render_mode=render_mode, **tiny_env_kwargs)
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
    # the checkers leave the env usable, and every step returns Python scalars
    env.reset(seed=1)
    a = ids_of(env, "a")[0]
    steps = run_episode(env, [a] * MAX_NEW)
    assert len(steps) == MAX_NEW
    for obs, reward, terminated, truncated, _ in steps:
        assert obs in env.observation_space
        assert type(reward) is float
        assert type(terminated) is bool and type(truncated) is bool


# --- MDP semantics ---------------------------------------------------------------------------------------------


def test_observation_layout(env: gym.Env) -> None:
    prompt = "the movie was"
    prompt_ids = ids_of(env, prompt)
    pad = env.unwrapped.core.pad_id
    n = len(prompt_ids)
    obs, _ = env.reset(options={"prompt": prompt})
    first_obs = {k: v.copy() for k, v in obs.items()}
    assert obs["input_ids"].dtype == np.int64 and obs["attention_mask"].dtype == np.int64
    assert obs["input_ids"][MAX_PROMPT - n : MAX_PROMPT].tolist() == prompt_ids  # left-padded
    assert (obs["input_ids"][: MAX_PROMPT - n] == pad).all()
    assert (obs["input_ids"][MAX_PROMPT:] == pad).all()
    expected_mask = np.zeros(MAX_PROMPT + MAX_NEW, dtype=np.int64)
    expected_mask[MAX_PROMPT - n : MAX_PROMPT] = 1
    np.testing.assert_array_equal(obs["attention_mask"], expected_mask)

    generated = ids_of(env, " good film")[: MAX_NEW - 1]
    for t, token in enumerate(generated):
        obs, *_ = env.step(token)
        assert obs["input_ids"][MAX_PROMPT + t] == token
        np.testing.assert_array_equal(obs["input_ids"][MAX_PROMPT : MAX_PROMPT + t + 1], generated[: t + 1])
        assert obs["input_ids"][MAX_PROMPT - n : MAX_PROMPT].tolist() == prompt_ids  # the prompt never moves
        assert (obs["input_ids"][MAX_PROMPT + t + 1 :] == pad).all()
        expected_mask[MAX_PROMPT + t] = 1
        np.testing.assert_array_equal(obs["attention_mask"], expected_mask)
    # observations are copies: later steps do not change what was returned earlier
    assert (first_obs["attention_mask"][MAX_PROMPT:] == 0).all()


@pytest.mark.parametrize("reward_model", ["gold", LengthReward()], ids=["gold", "length"])
def test_reward_only_at_last_step(tiny_env_kwargs: dict, reward_model: object) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": reward_model})
    _, info = env.reset(seed=3)
    prompt = info["prompt"]
    actions = ids_of(env, "a good film")[:MAX_NEW]
    steps = run_episode(env, actions)
    assert len(steps) == MAX_NEW
    for _, reward, _, _, info in steps[:-1]:
        assert reward == 0.0
        assert info["prompt"] == prompt and "completion" in info
        assert "reward_model_score" not in info and "gold_score" not in info
    _, reward, _, _, info = steps[-1]
    completion = env.unwrapped.tokenizer.decode(actions)
    assert info["prompt"] == prompt and info["completion"] == completion
    assert reward == info["reward_model_score"]
    expected_gold = VaderSentiment().score([prompt], [completion])[0]
    assert info["gold_score"] == pytest.approx(expected_gold)
    if reward_model == "gold":
        assert reward == pytest.approx(expected_gold)
    else:
        assert reward == pytest.approx(LengthReward().score([prompt], [completion])[0])
        assert reward > 0  # "a good film" has 'a's


@pytest.mark.parametrize("max_new_tokens", [1, 3, 6])
def test_the_length_limit_terminates(tiny_env_kwargs: dict, max_new_tokens: int) -> None:
    """``max_new_tokens`` is the MDP's own end (the reward is paid there): terminated, not truncated, so no algorithm
    bootstraps a value after a finished completion."""
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "max_new_tokens": max_new_tokens})
    env.reset(seed=0)
    b = ids_of(env, "b")[0]
    for _ in range(max_new_tokens - 1):
        _, _, terminated, truncated, _ = env.step(b)
        assert not terminated and not truncated
    _, _, terminated, truncated, info = env.step(b)
    assert terminated is True and truncated is False
    assert info["completion"] == "b" * max_new_tokens
    assert "reward_model_score" in info


@pytest.mark.parametrize("eos_step", [0, 2, MAX_NEW - 1])
def test_termination_on_eos(env: gym.Env, eos_step: int) -> None:
    eos = env.unwrapped.tokenizer.eos_token_id
    assert eos is not None
    env.reset(seed=0)
    a = ids_of(env, "a")[0]
    steps = run_episode(env, [a] * eos_step + [eos] + [a] * MAX_NEW)
    assert len(steps) == eos_step + 1
    obs, _, terminated, truncated, info = steps[-1]
    assert terminated is True and truncated is False  # EOS on the last allowed step terminates, not truncates
    assert obs["input_ids"][MAX_PROMPT + eos_step] == eos
    assert info["completion"] == "a" * eos_step  # special tokens are not part of the text
    assert all(not s[2] and not s[3] for s in steps[:-1])


@pytest.mark.parametrize(("stop", "text", "n_steps"), [(".", "ok. more", 3), ("ab", "xaab", 4), ("\n", "a\nb", 2)])
def test_stop_strings_terminate(tiny_env_kwargs: dict, stop: str, text: str, n_steps: int) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "stop_strings": [stop]})
    env.reset(seed=0)
    steps = run_episode(env, ids_of(env, text))
    assert len(steps) == n_steps
    _, reward, terminated, truncated, info = steps[-1]
    assert terminated is True and truncated is False
    assert info["completion"].endswith(stop)
    assert reward == info["reward_model_score"]


def test_step_after_episode_end_raises(env: gym.Env) -> None:
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    assert env.step(eos)[2]
    with pytest.raises(RuntimeError, match=r"episode is over.*reset\(\)"):
        env.step(eos)
    env.reset()  # a reset makes it usable again
    assert env.step(eos)[2]


def test_step_before_reset_raises(tiny_env_kwargs: dict) -> None:
    env = TextGenEnv(**tiny_env_kwargs)  # unwrapped: no OrderEnforcing, the env's own check
    with pytest.raises(RuntimeError, match=r"reset\(\)"):
        env.step(5)


def test_reset_seed_is_deterministic(tiny_env_kwargs: dict) -> None:
    env_a = gym.make("TextGen-v0", **tiny_env_kwargs)
    env_b = gym.make("TextGen-v0", **tiny_env_kwargs)
    prompts = set()
    for seed in range(12):
        obs_a, info_a = env_a.reset(seed=seed)
        obs_b, info_b = env_b.reset(seed=seed)
        assert info_a["prompt"] == info_b["prompt"]
        np.testing.assert_array_equal(obs_a["input_ids"], obs_b["input_ids"])
        assert env_a.reset(seed=seed)[1]["prompt"] == info_a["prompt"]
        prompts.add(info_a["prompt"])
    assert len(prompts) > 1  # the seed does choose the prompt
    # unseeded resets continue the seeded stream reproducibly
    env_a.reset(seed=5)
    env_b.reset(seed=5)
    assert [env_a.reset()[1]["prompt"] for _ in range(8)] == [env_b.reset()[1]["prompt"] for _ in range(8)]


def test_reset_with_prompt_option(env: gym.Env) -> None:
    prompt = "a fine , funny film"
    assert prompt not in TINY_PROMPTS
    obs, info = env.reset(seed=0, options={"prompt": prompt})
    assert info == {"prompt": prompt, "completion": ""}
    ids = ids_of(env, prompt)
    assert obs["input_ids"][MAX_PROMPT - len(ids) : MAX_PROMPT].tolist() == ids
    assert obs["attention_mask"].sum() == len(ids)
    _, _, _, _, info = env.step(ids_of(env, "x")[0])
    assert info["prompt"] == prompt and info["completion"] == "x"


def test_reset_with_non_string_prompt_option(env: gym.Env) -> None:
    with pytest.raises(TypeError, match=r"options\['prompt'\] must be a string, got int"):
        env.reset(options={"prompt": 3})


@pytest.mark.parametrize("prompt", ["", "  \n"], ids=["empty", "whitespace"])
def test_reset_with_empty_prompt_option(env: gym.Env, prompt: str) -> None:
    with pytest.raises(ValueError, match=r"options\['prompt'\]: the prompt is empty or only whitespace"):
        env.reset(options={"prompt": prompt})


@pytest.mark.parametrize("options", [{"promt": "a film"}, {"prompt": "a film", "seed": 3}])
def test_reset_with_unknown_option(env: gym.Env, options: dict) -> None:
    env.reset(seed=0)
    message = r"unknown reset option\(s\) \['(promt|seed)'\]; the allowed keys are \['prompt'\]"
    with pytest.raises(ValueError, match=message):
        env.reset(options=options)
    with pytest.raises(RuntimeError, match=r"reset\(\)"):  # a failed reset does not continue the old episode
        env.step(5)
    with pytest.raises(TypeError, match=r"reset options must be a dict"):
        env.reset(options=["prompt"])  # type: ignore[arg-type]


@pytest.mark.parametrize("prompts", [["the movie was", ""], ["the movie was", " \t"]], ids=["empty", "whitespace"])
def test_empty_prompt_in_list_rejected_at_make(tiny_env_kwargs: dict, prompts: list[str]) -> None:
    with pytest.raises(ValueError, match=r"prompt 1 of the list: the prompt is empty or only whitespace"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": prompts})


def test_observation_longer_than_model_positions(tiny_env_kwargs: dict) -> None:
    """The tiny model attends to 256 positions: an observation of 200 + 100 tokens could never be scored."""
    kwargs = {**tiny_env_kwargs, "max_prompt_tokens": 200, "max_new_tokens": 100}
    message = r"200 \+ 100 = 300 is more than model .* can attend to \(max_position_embeddings=256\)"
    with pytest.raises(ValueError, match=message):
        gym.make("TextGen-v0", **kwargs)
    gym.make("TextGen-v0", **{**kwargs, "max_new_tokens": 56})  # exactly 256 fits


def test_render_ansi(tiny_env_kwargs: dict) -> None:
    env = gym.make("TextGen-v0", render_mode="ansi", **tiny_env_kwargs)
    _, info = env.reset(seed=0)
    assert env.render() == info["prompt"]
    for token in ids_of(env, " so go"):
        _, _, terminated, _, info = env.step(token)
        assert env.render() == info["prompt"] + info["completion"]
    assert terminated
    assert info["completion"] == " so go"  # ended after MAX_NEW tokens


def test_render_human_prints(tiny_env_kwargs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    env = gym.make("TextGen-v0", render_mode="human", **tiny_env_kwargs)
    _, info = env.reset(seed=0)
    assert capsys.readouterr().out == info["prompt"]
    steps = run_episode(env, ids_of(env, " nice!!"))
    info = steps[-1][4]
    assert env.render() is None
    assert capsys.readouterr().out == info["completion"] + "\n"  # streamed piece by piece, newline at the end
    assert info["completion"] == " nice!"


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose vocabulary holds all 256 byte symbols, so non-ASCII text is split inside characters."""
    return make_tiny_model(tmp_path_factory.mktemp("byte-lm"), vocab_size=256 + 3, hidden_size=16, num_layers=1)


def test_render_human_holds_back_partial_characters(byte_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = gym.make(
        "TextGen-v0", model=str(byte_model), prompts=["x"], reward_model="gold", max_new_tokens=5, render_mode="human"
    )
    env.reset(seed=0)
    text = "é!ü"  # 5 byte-level tokens: a 2-byte character, '!', a 2-byte character
    pieces = []
    for token in ids_of(env, text):
        _, _, terminated, _, info = env.step(token)
        pieces.append(capsys.readouterr().out)
    assert terminated and info["completion"] == text
    assert pieces == ["x", "é", "!", "", "ü\n"]  # never the U+FFFD placeholder of a half character
    assert "\ufffd" not in "".join(pieces)


def test_no_render_mode_renders_nothing(env: gym.Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.reset(seed=0)
    env.step(ids_of(env, "a")[0])
    assert env.unwrapped.render() is None
    assert capsys.readouterr().out == ""


# --- chat templates ------------------------------------------------------------------------------------------


def chat_env(tiny_chat_model: Path, **kwargs: object) -> gym.Env:
    kwargs = {"prompts": TINY_PROMPTS, "reward_model": "gold", "max_new_tokens": 4, "max_prompt_tokens": 96, **kwargs}
    return gym.make("TextGen-v0", model=str(tiny_chat_model), **kwargs)


def prompt_part(obs: dict[str, np.ndarray], max_prompt: int) -> list[int]:
    """The prompt's token ids in an observation (its masked-in slots before ``max_prompt``)."""
    mask = obs["attention_mask"][:max_prompt].astype(bool)
    return obs["input_ids"][:max_prompt][mask].tolist()


def test_chat_template_with_task_instruction(tiny_chat_model: Path) -> None:
    env = chat_env(tiny_chat_model)  # the default task has an instruction: the prompt pre-fills the reply
    tok = env.unwrapped.tokenizer
    obs, info = env.reset(seed=0)
    rendered = f"<s>user: {INSTRUCTION}</s><s>assistant:{info['prompt']}"
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    assert prompt_part(obs, 96) == expected
    assert obs["input_ids"][95] == expected[-1]  # the prompt ends right before the first generated slot
    assert expected.count(tok.bos_token_id) == 2 and tok.eos_token_id in expected  # template tokens are special
    assert tok.decode(expected) == rendered


def test_chat_template_without_instruction(tiny_chat_model: Path) -> None:
    task = Task(name="no-instruction", train_prompts=["the movie was"], eval_prompts=["x"], make_gold=VaderSentiment)
    env = chat_env(tiny_chat_model, task=task, prompts=None)
    tok = env.unwrapped.tokenizer
    obs, info = env.reset(seed=0)
    assert info["prompt"] == "the movie was"
    expected = tok("<s>user: the movie was</s><s>assistant:", add_special_tokens=False)["input_ids"]
    assert prompt_part(obs, 96) == expected


@pytest.mark.parametrize("chat", [False, None])
def test_chat_template_switch(tiny_chat_model: Path, tiny_model: Path, chat: bool | None) -> None:
    """``chat=False`` uses the raw prompt; ``chat=None`` uses the template only when the tokenizer has one."""
    model = tiny_chat_model if chat is False else tiny_model
    env = chat_env(model, chat=chat)
    obs, _ = env.reset(seed=0, options={"prompt": "the movie was"})
    assert prompt_part(obs, 96) == ids_of(env, "the movie was")


def test_chat_prompt_too_long_is_reported(tiny_chat_model: Path) -> None:
    """The limit applies to the rendered prompt, template included."""
    with pytest.raises(ValueError, match=r"tokens once rendered, more than max_prompt_tokens=40"):
        chat_env(tiny_chat_model, max_prompt_tokens=40)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["negative", "vocab_size"])
def test_action_out_of_range(env: gym.Env, which: str) -> None:
    vocab = env.action_space.n
    action = -1 if which == "negative" else vocab
    env.reset(seed=0)
    message = rf"action {action} is outside the vocabulary: token ids are in \[0, {vocab}\)"
    with pytest.raises(ValueError, match=message):
        env.step(action)


@pytest.mark.parametrize(
    "action", [3.5, "a", np.array([1, 2]), None, np.float32(2.0)], ids=["float", "str", "pair", "none", "np.float32"]
)
def test_action_not_an_integer(env: gym.Env, action: object) -> None:
    env.reset(seed=0)
    with pytest.raises(TypeError, match=r"action must be one integer token id in \[0, \d+\), got"):
        env.step(action)


@pytest.mark.parametrize(
    "action", [5, np.int64(5), np.int32(5), np.array(5), np.array([5])], ids=["int", "int64", "int32", "0d", "1d"]
)
def test_integer_like_actions_are_accepted(env: gym.Env, action: object) -> None:
    env.reset(seed=0)
    obs, *_ = env.step(action)
    assert obs["input_ids"][MAX_PROMPT] == 5


def test_bad_action_does_not_advance_episode(env: gym.Env) -> None:
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        env.step(10**6)
    obs, *_ = env.step(7)
    assert obs["input_ids"][MAX_PROMPT] == 7 and obs["attention_mask"][MAX_PROMPT + 1 :].sum() == 0


LONG_PROMPT = "the movie was good . " * 10


def test_long_prompt_rejected_at_make(tiny_env_kwargs: dict) -> None:
    with pytest.raises(ValueError, match=rf"more than max_prompt_tokens={MAX_PROMPT}: 'the movie was good"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": ["ok", LONG_PROMPT]})


def test_long_prompt_rejected_at_reset(env: gym.Env) -> None:
    with pytest.raises(ValueError, match=rf"more than max_prompt_tokens={MAX_PROMPT}.*Raise max_prompt_tokens"):
        env.reset(options={"prompt": LONG_PROMPT})
    _, info = env.reset(seed=0)  # nothing was cut or half-written: the env still works
    assert info["prompt"] in TINY_PROMPTS


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_reward_names_the_prompt(tiny_env_kwargs: dict, value: float) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": ConstReward(value)})
    env.reset(options={"prompt": "i loved the film and"})
    eos = env.unwrapped.tokenizer.eos_token_id
    with pytest.raises(ValueError, match=r"non-finite score \(-?(nan|inf)\) for prompt 'i loved the film and'"):
        env.step(eos)


@pytest.mark.parametrize("extra", [1, -1])
def test_reward_with_wrong_number_of_scores(tiny_env_kwargs: dict, extra: int) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": WrongCountReward(extra)})
    env.reset(seed=0)
    message = rf"reward_model WrongCountReward\.score returned {1 + extra} scores for 1 prompts; it must return one"
    with pytest.raises(ValueError, match=message):
        env.step(env.unwrapped.tokenizer.eos_token_id)


@pytest.mark.parametrize(
    ("value", "what"),
    [(None, "None"), ("0.5", "a str"), (["0.5"], "values are <U3"), ([None], "holds a NoneType"), ({}, "dict")],
    ids=["none", "str", "str-list", "none-list", "dict"],
)
def test_reward_of_wrong_type(tiny_env_kwargs: dict, value: object, what: str) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": ReturnsReward(value)})
    env.reset(seed=0)
    with pytest.raises(TypeError, match=rf"reward_model ReturnsReward\.score returned .*{what}.*one finite number"):
        env.step(env.unwrapped.tokenizer.eos_token_id)


def test_failing_reward_model_ends_the_episode_cleanly(tiny_env_kwargs: dict) -> None:
    env = gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": FailingReward(failures=1)})
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    with pytest.raises(ConnectionError, match="judge unreachable"):
        env.step(eos)
    message = r"episode is over \(scoring it raised ConnectionError: judge unreachable\): call reset\(\)"
    with pytest.raises(RuntimeError, match=message):
        env.step(eos)
    env.reset()  # a reset makes it usable again
    _, reward, terminated, _, info = env.step(eos)
    assert terminated and reward == 1.0 == info["reward_model_score"]
    env.reset()
    env.step(eos)
    with pytest.raises(RuntimeError, match=r"^the episode is over: call reset"):  # the failure is forgotten
        env.step(eos)


@pytest.mark.parametrize(
    "reward_model", [object(), 3.0, type("NotCallable", (), {"score": 1.0})()], ids=["object", "float", "attribute"]
)
def test_reward_model_without_score(tiny_env_kwargs: dict, reward_model: object) -> None:
    name = type(reward_model).__name__
    with pytest.raises(TypeError, match=rf"score\(prompts, completions\) method; got {name}"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "reward_model": reward_model})


def test_unknown_task(tiny_env_kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'no-such-task'; registered tasks: .*positive-review"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "task": "no-such-task"})


@pytest.mark.parametrize("render_mode", ["rgb_array", "ANSI", "text"])
def test_invalid_render_mode(tiny_env_kwargs: dict, render_mode: str) -> None:
    message = re.escape(f"render_mode must be one of ['ansi', 'human'] or None, not {render_mode!r}")
    with pytest.raises(ValueError, match=message):
        TextGenEnv(render_mode=render_mode, **tiny_env_kwargs)
    # also a TypeError, on which SB3's make_vec_env retries gym.make without its render_mode="rgb_array"
    with pytest.raises(TypeError, match=message), pytest.warns(UserWarning, match="not in the possible render_modes"):
        gym.make("TextGen-v0", render_mode=render_mode, **tiny_env_kwargs)


def test_missing_local_model_directory(tiny_env_kwargs: dict) -> None:
    with pytest.raises(ModelLoadError, match=r"model directory './does-not-exist' does not exist"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "model": "./does-not-exist"})


def test_malformed_jsonl_prompt_file(tiny_env_kwargs: dict, tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the movie was"}\n\n{"prompt": "ok"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts\.jsonl:3: not valid JSON"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": path})


@pytest.mark.parametrize("prompts", [[], ()], ids=["list", "tuple"])
def test_empty_prompt_list(tiny_env_kwargs: dict, prompts: Sequence[str]) -> None:
    with pytest.raises(ValueError, match=r"no prompts in"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": prompts})


@pytest.mark.parametrize("key", ["max_new_tokens", "max_prompt_tokens"])
def test_lengths_must_be_positive(tiny_env_kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=r"must be at least 1"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, key: 0})


def test_unknown_split(tiny_env_kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"split must be 'train' or 'eval', not 'test'"):
        gym.make("TextGen-v0", **{**tiny_env_kwargs, "prompts": None, "max_prompt_tokens": 128, "split": "test"})


# --- the embedded default model --------------------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_env() -> None:
    env = gym.make("TextGen-v0")
    tok = env.unwrapped.tokenizer
    task = get_task("positive-review")
    assert env.observation_space["input_ids"].shape == (task.max_prompt_tokens + task.max_new_tokens,)
    assert env.action_space.n >= len(tok) > 1000
    obs, info = env.reset(seed=0)
    assert info["prompt"] in task.train_prompts
    assert obs["attention_mask"][: task.max_prompt_tokens].sum() > 0
    for t, token in enumerate(tok(" It was great", add_special_tokens=False)["input_ids"]):
        obs, reward, terminated, truncated, info = env.step(token)
        assert obs["input_ids"][task.max_prompt_tokens + t] == token
        assert reward == 0.0 and not terminated and not truncated
    assert info["completion"] == " It was great"
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)
    gym.make("TextGen-v0", split="eval")  # every eval prompt fits the task's max_prompt_tokens too


def test_example_record_reaches_a_column_taking_scorer_and_info(tiny_env_kwargs: dict) -> None:
    """The episode's record rides along: ``info`` shows its references and meta, the scorer gets them as columns,
    and a plain gold scorer (VADER) on the same episode still works without them."""
    example = Example("the movie was", ("a fine reference",), {"bonus": 100})
    kwargs = tiny_env_kwargs | {"prompts": [example], "reward_model": ReferenceLength()}
    env = TextGenEnv(**kwargs)
    _, info = env.reset(seed=0)
    assert info["prompt"] == "the movie was"
    assert info["references"] == ("a fine reference",) and info["meta"] == {"bonus": 100}
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert reward == info["reward_model_score"] == len("a fine reference") + 100
    assert info["references"] == ("a fine reference",) and -1.0 <= info["gold_score"] <= 1.0  # VADER: no columns
    _, info = env.reset(options={"prompt": Example("i loved the film and", ("ab",))})  # a record as the option
    assert info["references"] == ("ab",) and "meta" not in info
    _, info = env.reset(options={"prompt": "a sad , dull"})  # a bare string: no references, none shown
    assert "references" not in info
